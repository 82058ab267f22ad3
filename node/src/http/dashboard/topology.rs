//! The tiers as the entry node knows them: itself (its configuration), each parent (the
//! `Hello` it sent on connecting and the health of the link to it), the tiers beyond as the
//! parent in use reported them (protocol 3: [`flow_protocol::Upstream`], each peer's
//! `Hello` and link health as its child sees them), and — from a protocol-2 parent, which
//! reports nothing — the tier beyond it inferred from the layers of the family that no
//! known node hosts (id and health unknown). Pure: [`nodes`] takes what the handler
//! gathered.

use flow_protocol::{HostedLayers, Role, UpstreamLink};
use serde::Serialize;

/// One tier as the page draws it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Node {
    /// Node id (`None` for an inferred tier or a parent never reached).
    pub id: Option<String>,
    /// `device`, `edge` or `cloud` (`None` when unknown).
    pub role: Option<&'static str>,
    /// How the entry node knows it: `self`, `hello` (a parent's handshake), `reported` (by
    /// the parent in use, protocol 3), `inferred`.
    pub seen: &'static str,
    /// `serving` (the entry node), `up` / `failing` / `down` / `idle` (a parent link, see
    /// [`crate::parent::upstream::link_state`]), `unseen` (inferred).
    pub health: &'static str,
    /// Hosted layers `[start, end)`, when known.
    pub layers: Option<[usize; 2]>,
    /// The exit points it answers at (the family's exit at the end of its layers).
    pub exits: Vec<usize>,
    /// New requests go through it (the entry node itself, the parent in use and beyond).
    pub active: bool,
}

/// What the entry node knows of one parent.
#[derive(Debug, Clone)]
pub struct ParentView {
    /// The parent's id, role and hosted layers from its `Hello` (`None`: not connected).
    pub hello: Option<(String, Role, Vec<HostedLayers>)>,
    /// [`crate::parent::ParentLink::state`] of the link to it.
    pub health: &'static str,
    /// The parent in use.
    pub active: bool,
}

/// The tier above a node of `role` (the role whose nodes take it as a child).
fn tier_above(role: Role) -> Option<Role> {
    [Role::Device, Role::Edge, Role::Cloud]
        .into_iter()
        .find(|r| r.default_children().contains(&role))
}

/// The exit a node hosting layers up to `end` answers at: the family's exit at `end`, if
/// there is one (a tier hosts the exit at the end of its layers, not those inside them).
fn exit_at(exits: &[usize], end: usize) -> Vec<usize> {
    exits.iter().copied().filter(|&e| e == end).collect()
}

fn layers_of(hosted: &[HostedLayers]) -> Option<[usize; 2]> {
    let start = hosted.iter().map(|h| h.start as usize).min();
    let end = hosted.iter().map(|h| h.end as usize).max();
    start.zip(end).map(|(s, e)| [s, e])
}

/// The tiers from the entry node `me` up: its parents in preference order, then what the
/// parent in use reported of the tiers beyond it (`reported`), else the tier beyond that
/// parent when the family's deepest exit (`exits`' largest) lies past the layers it hosts.
pub fn nodes(
    me: Node,
    parents: &[ParentView],
    reported: &[UpstreamLink],
    exits: &[usize],
) -> Vec<Node> {
    let deepest = exits.iter().copied().max().unwrap_or(0);
    let mut out = vec![me];
    let mut beyond = None;
    for p in parents {
        let Some((id, role, hosted)) = &p.hello else {
            out.push(Node {
                id: None,
                role: None,
                seen: "hello",
                health: p.health,
                layers: None,
                exits: Vec::new(),
                active: p.active,
            });
            continue;
        };
        let layers = layers_of(hosted);
        if p.active && reported.is_empty() {
            if let (Some([_, e]), Some(above)) = (layers, tier_above(*role)) {
                if e < deepest {
                    beyond = Some(Node {
                        id: None,
                        role: Some(above.as_str()),
                        seen: "inferred",
                        health: "unseen",
                        layers: Some([e, deepest]),
                        exits: exit_at(exits, deepest),
                        active: true,
                    });
                }
            }
        }
        out.push(Node {
            id: Some(id.clone()),
            role: Some(role.as_str()),
            seen: "hello",
            health: p.health,
            layers,
            exits: layers.map_or_else(Vec::new, |[_, e]| exit_at(exits, e)),
            active: p.active,
        });
    }
    for l in reported {
        let layers = l.to.as_ref().and_then(|p| layers_of(&p.hosted));
        out.push(Node {
            id: l.to.as_ref().map(|p| p.node_id.clone()),
            role: l.to.as_ref().map(|p| p.role.as_str()),
            seen: "reported",
            health: l.state.as_str(),
            layers,
            exits: layers.map_or_else(Vec::new, |[_, e]| exit_at(exits, e)),
            active: l.active,
        });
    }
    out.extend(beyond);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn me() -> Node {
        Node {
            id: Some("device".into()),
            role: Some("device"),
            seen: "self",
            health: "serving",
            layers: Some([0, 10]),
            exits: vec![10],
            active: true,
        }
    }

    /// A parent that said hello as `id` (`role`, layers `[start, end)`).
    fn said_hello(id: &str, role: Role, start: u32, end: u32) -> ParentView {
        let hosted = vec![HostedLayers {
            start,
            end,
            digest: [0; 32],
        }];
        ParentView {
            hello: Some((id.into(), role, hosted)),
            health: "up",
            active: true,
        }
    }

    /// A parent never reached.
    fn silent(health: &'static str, active: bool) -> ParentView {
        ParentView {
            hello: None,
            health,
            active,
        }
    }

    #[test]
    fn an_edge_parent_short_of_the_deepest_exit_implies_a_cloud_beyond() {
        let n = nodes(
            me(),
            &[said_hello("edge", Role::Edge, 10, 20)],
            &[],
            &[10, 20, 30],
        );
        let roles: Vec<_> = n.iter().map(|n| n.role).collect();
        assert_eq!(roles, [Some("device"), Some("edge"), Some("cloud")]);
        assert_eq!(n[1].exits, [20]);
        assert_eq!(
            (n[2].seen, n[2].health, n[2].layers, n[2].exits.clone()),
            ("inferred", "unseen", Some([20, 30]), vec![30])
        );
        assert_eq!(n[2].id, None);
    }

    #[test]
    fn a_cloud_parent_or_an_unconnected_one_implies_nothing_beyond() {
        let cloud = said_hello("cloud", Role::Cloud, 10, 30);
        let n = nodes(me(), &[cloud, silent("idle", false)], &[], &[10, 20, 30]);
        assert_eq!(n.len(), 3);
        assert_eq!(n[1].exits, [30]);
        assert_eq!((n[2].role, n[2].health, n[2].active), (None, "idle", false));
        assert_eq!(
            nodes(me(), &[silent("down", true)], &[], &[10, 20, 30]).len(),
            2
        );
    }

    #[test]
    fn the_tiers_the_parent_reports_replace_the_inferred_one() {
        use flow_protocol::{LinkState, UpstreamPeer};
        let to_cloud = |id: &str, active: bool, state: LinkState| UpstreamLink {
            from: "edge".into(),
            to: Some(UpstreamPeer {
                node_id: id.into(),
                role: Role::Cloud,
                hosted: vec![HostedLayers {
                    start: 20,
                    end: 30,
                    digest: [0; 32],
                }],
            }),
            addr: "10.0.0.9:7000".into(),
            active,
            state,
            rtt_ms: 20.0,
            goodput_bps: 1e7,
            confidence: 1.0,
            probes: 5,
            quic: None,
        };
        let reported = [
            to_cloud("cloud-a", true, LinkState::Up),
            to_cloud("cloud-b", false, LinkState::Idle),
        ];
        let n = nodes(
            me(),
            &[said_hello("edge", Role::Edge, 10, 20)],
            &reported,
            &[10, 20, 30],
        );
        let got: Vec<_> = n
            .iter()
            .map(|n| {
                (
                    n.id.as_deref(),
                    n.seen,
                    n.health,
                    n.layers,
                    n.exits.clone(),
                    n.active,
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                (
                    Some("device"),
                    "self",
                    "serving",
                    Some([0, 10]),
                    vec![10],
                    true
                ),
                (Some("edge"), "hello", "up", Some([10, 20]), vec![20], true),
                (
                    Some("cloud-a"),
                    "reported",
                    "up",
                    Some([20, 30]),
                    vec![30],
                    true
                ),
                (
                    Some("cloud-b"),
                    "reported",
                    "idle",
                    Some([20, 30]),
                    vec![30],
                    false
                ),
            ]
        );
    }
}
