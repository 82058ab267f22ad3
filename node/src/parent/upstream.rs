//! Telling children what lies beyond this node (protocol 3, [`flow_protocol::Upstream`]).
//!
//! A node with parents builds a report of its links every second ([`report`]): each
//! parent's id, role and layers from its `Hello`, the link's health, estimates and QUIC
//! counters, then what its own active parent reported (so every tier of a longer chain
//! reaches the entry node). [`publish`] hands it to the child connections through a
//! `watch` channel when it changed in a way a reader would notice (a link's health, the
//! parent in use, a peer) or [`REPORT_EVERY`] after the last one, so an idle child link
//! carries a few hundred bytes every few seconds. [`answer_probes`] serves a child's
//! control stream: probe replies, and the reports for a child on protocol 3 or later.

use std::sync::{Arc, Weak};
use std::time::Duration;

use flow_protocol::transport::SessionStream;
use flow_protocol::upstream::{MAX_UPSTREAM_LINKS, MAX_UPSTREAM_RANGES, MAX_UPSTREAM_TEXT};
use flow_protocol::{
    LinkState, Message, Upstream, UpstreamLink, UpstreamPeer, UpstreamQuic, UPSTREAM_SINCE_VERSION,
};
use tokio::sync::watch;
use tokio::time::Instant;

use super::Parents;

/// A report goes at least this often while it changes only in its numbers.
pub const REPORT_EVERY: Duration = Duration::from_secs(5);
/// How often the report is rebuilt and compared.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// The health of a link: `Up` (connected, no failure since), `Failing` (a request failed
/// on it since it was dialled), `Down` (dial or probes failed) or `Idle` (a fall-back
/// parent not dialled yet).
pub fn link_state(reachable: bool, failed: bool, down: bool) -> LinkState {
    match (reachable, failed, down) {
        (_, true, _) => LinkState::Failing,
        (true, false, _) => LinkState::Up,
        (false, false, true) => LinkState::Down,
        (false, false, false) => LinkState::Idle,
    }
}

fn bounded(s: &str) -> String {
    if s.len() <= MAX_UPSTREAM_TEXT {
        return s.to_string();
    }
    let mut end = MAX_UPSTREAM_TEXT;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

fn finite(v: f64) -> f32 {
    let v = v as f32;
    if v.is_finite() && v >= 0.0 {
        v
    } else {
        0.0
    }
}

/// This node's report: its links to `parents` (in fail-over order), then its active
/// parent's own report, at most [`MAX_UPSTREAM_LINKS`] links in all.
pub async fn report(from: &str, parents: &Parents) -> Upstream {
    let active = parents.active();
    let mut links = Vec::new();
    for l in parents.all() {
        let to = l.hello().await.map(|h| UpstreamPeer {
            node_id: bounded(&h.node_id),
            role: h.role,
            hosted: h.hosted.into_iter().take(MAX_UPSTREAM_RANGES).collect(),
        });
        let est = l.estimate();
        let quic = l.stats().await.map(|s| UpstreamQuic {
            rtt_ms: finite(s.rtt.as_secs_f64() * 1e3),
            bytes_sent: s.bytes_sent,
            bytes_received: s.bytes_received,
            lost_packets: s.lost_packets,
        });
        links.push(UpstreamLink {
            from: bounded(from),
            to,
            addr: bounded(&l.addr().to_string()),
            active: Arc::ptr_eq(l, &active),
            state: l.state(),
            rtt_ms: finite(est.rtt_ms),
            goodput_bps: finite(est.goodput_bps),
            confidence: finite(est.confidence).min(1.0),
            probes: l.probe_rounds(),
            quic,
        });
    }
    if let Some(beyond) = active.upstream() {
        links.extend(beyond.links);
    }
    links.truncate(MAX_UPSTREAM_LINKS);
    Upstream { links }
}

/// What a reader would notice changing: the links, their peers, health and which is in use
/// (not the numbers, which move every round).
fn shape(u: &Upstream) -> Vec<(String, Option<String>, String, bool, LinkState)> {
    u.links
        .iter()
        .map(|l| {
            (
                l.from.clone(),
                l.to.as_ref().map(|p| p.node_id.clone()),
                l.addr.clone(),
                l.active,
                l.state,
            )
        })
        .collect()
}

/// Rebuild this node's report every second and publish it on `tx` when its shape changed
/// or [`REPORT_EVERY`] passed; ends when the parents are gone.
pub async fn publish(from: String, parents: Weak<Parents>, tx: watch::Sender<Upstream>) {
    let mut last_sent: Option<Instant> = None;
    let mut tick = tokio::time::interval(CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(ps) = parents.upgrade() else { return };
        let now = report(&from, &ps).await;
        drop(ps);
        let due = last_sent.is_none_or(|t| t.elapsed() >= REPORT_EVERY);
        let changed = shape(&tx.borrow()) != shape(&now);
        if due || changed {
            // stored even with no child connected: the next one starts from it
            tx.send_replace(now);
            last_sent = Some(Instant::now());
        }
    }
}

/// What woke [`answer_probes`].
enum Wake {
    Frame(Box<flow_protocol::Result<Option<Message>>>),
    /// A report was published (`false`: the publisher is gone).
    Report(bool),
}

/// Serves a child's control stream until it closes: answers its probes, and sends it the
/// `reports` as they are published (the current one first) when it speaks protocol
/// [`UPSTREAM_SINCE_VERSION`] or later (`child_version`: the newest its `Hello` named).
pub async fn answer_probes(
    mut control: SessionStream,
    limits: flow_protocol::Limits,
    child_version: u16,
    reports: Option<watch::Receiver<Upstream>>,
) {
    let mut reports = reports.filter(|_| child_version >= UPSTREAM_SINCE_VERSION);
    let mut pending = reports.as_mut().map(|rx| rx.borrow_and_update().clone());
    loop {
        if let Some(u) = pending.take().filter(|u| !u.links.is_empty()) {
            if control.send(&Message::Upstream(u)).await.is_err() {
                return;
            }
        }
        let next = async {
            match reports.as_mut() {
                Some(rx) => rx.changed().await.is_ok(),
                None => std::future::pending().await,
            }
        };
        // both are cancel-safe: a frame read in part stays in the stream's decoder
        let wake = tokio::select! {
            m = control.recv() => Wake::Frame(Box::new(m)),
            alive = next => Wake::Report(alive),
        };
        let frame = match wake {
            Wake::Report(true) => {
                pending = reports.as_mut().map(|rx| rx.borrow_and_update().clone());
                continue;
            }
            Wake::Report(false) => {
                reports = None;
                continue;
            }
            Wake::Frame(m) => *m,
        };
        match frame {
            Ok(Some(Message::Probe(p))) => {
                if control
                    .send(&Message::ProbeReply(p.reply(&limits)))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            Ok(Some(Message::Heartbeat(_))) => {}
            Ok(Some(other)) => {
                tracing::debug!(
                    kind = other.name(),
                    "ignoring a frame on the control stream"
                );
            }
            Ok(None) | Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_state_names_the_worst_known_state() {
        assert_eq!(link_state(true, false, false), LinkState::Up);
        assert_eq!(link_state(true, true, false), LinkState::Failing);
        assert_eq!(link_state(false, false, true), LinkState::Down);
        assert_eq!(link_state(false, false, false), LinkState::Idle);
    }

    #[test]
    fn names_are_bounded_on_a_char_boundary() {
        let long = "é".repeat(MAX_UPSTREAM_TEXT);
        let b = bounded(&long);
        assert!(b.len() <= MAX_UPSTREAM_TEXT && b.chars().all(|c| c == 'é'));
        assert_eq!(bounded("edge"), "edge");
        assert_eq!(finite(f64::NAN), 0.0);
        assert_eq!(finite(-1.0), 0.0);
    }

    fn link(state: LinkState, rtt: f32) -> UpstreamLink {
        UpstreamLink {
            from: "edge".into(),
            to: None,
            addr: "10.0.0.1:7000".into(),
            active: true,
            state,
            rtt_ms: rtt,
            goodput_bps: 1e6,
            confidence: 0.5,
            probes: 3,
            quic: None,
        }
    }

    #[test]
    fn only_health_peers_and_the_link_in_use_count_as_a_change() {
        let a = Upstream {
            links: vec![link(LinkState::Up, 10.0)],
        };
        let numbers_moved = Upstream {
            links: vec![link(LinkState::Up, 55.0)],
        };
        let went_down = Upstream {
            links: vec![link(LinkState::Down, 10.0)],
        };
        assert_eq!(shape(&a), shape(&numbers_moved));
        assert_ne!(shape(&a), shape(&went_down));
    }
}
