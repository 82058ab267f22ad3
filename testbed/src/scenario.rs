//! Fault scenarios: what breaks, when, during a testbed run.
//!
//! ```toml
//! name = "edge restart"
//! duration_s = 60
//!
//! [topology]
//! nodes = ["cloud", "edge1", "device1", "device2"]
//! links = ["device1:edge1", "device2:edge1", "edge1:cloud"]
//! # optional: compose files merged over the base one (relative to its folder)
//! # compose_overrides = ["docker-compose.failover.yml"]
//!
//! [[event]]
//! at_s = 20
//! action = "kill"            # kill | restart | partition | heal | degrade_link
//! target = "edge1"           # kill/restart: a node; the others: a link "a:b"
//!
//! [[event]]
//! at_s = 25
//! action = "restart"
//! target = "edge1"
//!
//! [[event]]
//! at_s = 30
//! action = "degrade_link"
//! target = "device1:edge1"
//! params = { delay_ms = 200, jitter_ms = 20, rate_mbit = 1.0, loss = 0.05 }
//! ```
//!
//! [`Scenario::parse`] validates actions, targets and params against the topology; errors
//! name the line and field. [`ScenarioTimeline`] is sans-IO: given the time since the run
//! started it yields the events that are due.

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use toml::Spanned;

use crate::error::{line_of, toml_error, Error, Result};
use crate::shaper::LinkChange;

/// What happens to the target.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "action", content = "params", rename_all = "snake_case")]
pub enum Action {
    /// Stop a node abruptly (SIGKILL).
    Kill,
    /// Start a killed node again (or restart a running one).
    Restart,
    /// Cut a link: all packets dropped both ways.
    Partition,
    /// Undo a partition.
    Heal,
    /// Change a link's shaping.
    DegradeLink(LinkChange),
}

/// One timed event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScenarioEvent {
    /// When, since the run started.
    pub at: Duration,
    /// What.
    #[serde(flatten)]
    pub action: Action,
    /// A node name (kill, restart) or a link name `a:b`.
    pub target: String,
    /// Line of the scenario file it came from.
    pub line: usize,
}

/// The nodes and links a scenario refers to.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Topology {
    /// Node names (`cloud`, `edge1`, ...).
    pub nodes: Vec<String>,
    /// Links as `a:b` between two nodes.
    #[serde(default)]
    pub links: Vec<String>,
    /// Compose files merged over the base one (`docker compose -f base -f override`),
    /// relative to the base file's folder: where the nodes and links the scenario names are
    /// defined, e.g. `docker-compose.failover.yml` (fall-back edges and a second cloud).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub compose_overrides: Vec<String>,
}

/// A validated scenario.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scenario {
    /// Human-readable name.
    pub name: String,
    /// Run length.
    pub duration: Duration,
    /// Nodes and links.
    pub topology: Topology,
    /// Events sorted by time (stable).
    pub events: Vec<ScenarioEvent>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScenario {
    #[serde(default)]
    name: String,
    duration_s: Spanned<f64>,
    topology: Spanned<Topology>,
    #[serde(default)]
    event: Vec<RawEvent>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEvent {
    at_s: Spanned<f64>,
    action: Spanned<String>,
    target: Spanned<String>,
    params: Option<Spanned<toml::Table>>,
}

impl Scenario {
    /// Parse and validate scenario TOML.
    pub fn parse(text: &str) -> Result<Self> {
        let raw: RawScenario = toml::from_str(text).map_err(|e| toml_error("scenario", text, e))?;
        let err = |span: std::ops::Range<usize>, field: &str, reason: String| Error::Toml {
            what: "scenario",
            line: line_of(text, span.start),
            field: field.to_string(),
            reason,
        };
        let duration_s = *raw.duration_s.get_ref();
        if !(duration_s.is_finite() && duration_s > 0.0) {
            return Err(err(
                raw.duration_s.span(),
                "duration_s",
                format!("{duration_s} must be positive"),
            ));
        }
        let topo_span = raw.topology.span();
        let topology = raw.topology.into_inner();
        if topology.nodes.is_empty() {
            return Err(err(topo_span, "topology.nodes", "no nodes".to_string()));
        }
        for (i, n) in topology.nodes.iter().enumerate() {
            if n.is_empty() || n.contains(':') || topology.nodes[..i].contains(n) {
                return Err(err(
                    topo_span.clone(),
                    "topology.nodes",
                    format!("`{n}` must be a unique, non-empty name without ':'"),
                ));
            }
        }
        for l in &topology.links {
            let ok = l.split_once(':').is_some_and(|(a, b)| {
                a != b
                    && topology.nodes.iter().any(|n| n == a)
                    && topology.nodes.iter().any(|n| n == b)
            });
            if !ok {
                return Err(err(
                    topo_span.clone(),
                    "topology.links",
                    format!("`{l}` must be `a:b` with two different known nodes"),
                ));
            }
        }
        let mut events = Vec::with_capacity(raw.event.len());
        for ev in raw.event {
            let at_s = *ev.at_s.get_ref();
            if !(at_s.is_finite() && (0.0..=duration_s).contains(&at_s)) {
                return Err(err(
                    ev.at_s.span(),
                    "at_s",
                    format!("{at_s} is outside the run [0, {duration_s}]"),
                ));
            }
            let target = ev.target.get_ref().clone();
            let is_node = topology.nodes.contains(&target);
            let is_link = topology.links.contains(&target) || {
                // accept a link written the other way round
                target
                    .split_once(':')
                    .is_some_and(|(a, b)| topology.links.contains(&format!("{b}:{a}")))
            };
            let name = ev.action.get_ref().as_str();
            let (action, wants_link) = match name {
                "kill" => (Action::Kill, false),
                "restart" => (Action::Restart, false),
                "partition" => (Action::Partition, true),
                "heal" => (Action::Heal, true),
                "degrade_link" => {
                    let Some(params) = &ev.params else {
                        return Err(err(
                            ev.action.span(),
                            "params",
                            "degrade_link needs params { delay_ms, jitter_ms, rate_mbit, loss }"
                                .to_string(),
                        ));
                    };
                    let change: LinkChange =
                        params
                            .get_ref()
                            .clone()
                            .try_into()
                            .map_err(|e: toml::de::Error| {
                                err(params.span(), "params", e.message().to_string())
                            })?;
                    change
                        .apply(&crate::shaper::LinkParams::default())
                        .map_err(|e| err(params.span(), "params", e.to_string()))?;
                    (Action::DegradeLink(change), true)
                }
                other => {
                    return Err(err(
                        ev.action.span(),
                        "action",
                        format!(
                        "unknown action `{other}` (kill, restart, partition, heal, degrade_link)"
                    ),
                    ))
                }
            };
            if !matches!(action, Action::DegradeLink(_)) {
                if let Some(p) = &ev.params {
                    if !p.get_ref().is_empty() {
                        return Err(err(p.span(), "params", format!("`{name}` takes no params")));
                    }
                }
            }
            let known = if wants_link { is_link } else { is_node };
            if !known {
                let kind = if wants_link {
                    "link (a:b from topology.links)"
                } else {
                    "node from topology.nodes"
                };
                return Err(err(
                    ev.target.span(),
                    "target",
                    format!("`{target}` is not a known {kind} for `{name}`"),
                ));
            }
            events.push(ScenarioEvent {
                at: Duration::from_secs_f64(at_s),
                action,
                target,
                line: line_of(text, ev.at_s.span().start),
            });
        }
        events.sort_by_key(|e| e.at);
        Ok(Self {
            name: raw.name,
            duration: Duration::from_secs_f64(duration_s),
            topology,
            events,
        })
    }

    /// Load and validate a scenario file.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::file("reading", path, e))?;
        Self::parse(&text)
    }

    /// The scenario as one fault cycle repeated for `total`: the events of every whole
    /// cycle that fits (cycle `i` shifted by `i × duration`), with `total` as the duration.
    /// Returns the scenario and the number of cycles. A soak runs this.
    pub fn repeated(&self, total: Duration) -> Result<(Self, u32)> {
        let cycle = self.duration.as_secs_f64();
        let cycles = (total.as_secs_f64() / cycle + 1e-9).floor();
        if cycles < 1.0 || cycles > f64::from(u32::MAX) {
            return Err(Error::config(
                "soak duration",
                format!(
                    "{:.0} s must hold at least one fault cycle of {cycle:.0} s",
                    total.as_secs_f64()
                ),
            ));
        }
        let cycles = cycles as u32;
        let mut events = Vec::with_capacity(self.events.len() * cycles as usize);
        for i in 0..cycles {
            let shift = self.duration * i;
            events.extend(self.events.iter().map(|e| ScenarioEvent {
                at: e.at + shift,
                ..e.clone()
            }));
        }
        Ok((
            Self {
                name: self.name.clone(),
                duration: total,
                topology: self.topology.clone(),
                events,
            },
            cycles,
        ))
    }
}

/// Sans-IO cursor over a scenario's events.
#[derive(Debug, Clone)]
pub struct ScenarioTimeline {
    events: Vec<ScenarioEvent>,
    next: usize,
}

impl ScenarioTimeline {
    /// A timeline at the start of the run.
    pub fn new(scenario: &Scenario) -> Self {
        Self {
            events: scenario.events.clone(),
            next: 0,
        }
    }

    /// Events due at `now` (since the run started) not yet returned, in order.
    pub fn poll_due(&mut self, now: Duration) -> Vec<ScenarioEvent> {
        let start = self.next;
        while self.events.get(self.next).is_some_and(|e| e.at <= now) {
            self.next += 1;
        }
        self.events[start..self.next].to_vec()
    }

    /// When the next event is due (for a timer), `None` when all have been returned.
    pub fn next_due(&self) -> Option<Duration> {
        self.events.get(self.next).map(|e| e.at)
    }

    /// All events returned.
    pub fn is_done(&self) -> bool {
        self.next >= self.events.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "edge restart"
duration_s = 60

[topology]
nodes = ["cloud", "edge1", "device1", "device2"]
links = ["device1:edge1", "device2:edge1", "edge1:cloud"]

[[event]]
at_s = 25
action = "restart"
target = "edge1"

[[event]]
at_s = 20
action = "kill"
target = "edge1"

[[event]]
at_s = 30
action = "partition"
target = "edge1:device1"

[[event]]
at_s = 40
action = "degrade_link"
target = "edge1:cloud"
params = { delay_ms = 200, loss = 0.05, rate_mbit = 1.0 }

[[event]]
at_s = 45
action = "heal"
target = "device1:edge1"
"#;

    #[test]
    fn parses_validates_and_sorts() {
        let s = Scenario::parse(GOOD).unwrap();
        assert_eq!(s.name, "edge restart");
        assert_eq!(s.duration, Duration::from_secs(60));
        let acts: Vec<_> = s
            .events
            .iter()
            .map(|e| (e.at.as_secs(), e.action.clone()))
            .collect();
        assert_eq!(acts[0], (20, Action::Kill));
        assert_eq!(acts[1], (25, Action::Restart));
        assert_eq!(acts[2], (30, Action::Partition));
        let Action::DegradeLink(c) = &acts[3].1 else {
            panic!("{acts:?}")
        };
        assert_eq!(
            (c.delay_ms, c.loss, c.jitter_ms),
            (Some(200.0), Some(0.05), None)
        );
        assert_eq!(s.events[0].line, 15);
    }

    fn fails(text: &str, needles: &[&str]) {
        let msg = Scenario::parse(text).unwrap_err().to_string();
        for n in needles {
            assert!(msg.contains(n), "`{n}` not in: {msg}");
        }
    }

    #[test]
    fn errors_name_line_and_field() {
        fails(
            &GOOD.replace("\"kill\"", "\"explode\""),
            &["line 16", "action", "explode"],
        );
        fails(
            &GOOD.replace(
                "target = \"edge1\"\n\n[[event]]\nat_s = 20",
                "target = \"edge9\"\n\n[[event]]\nat_s = 20",
            ),
            &["line 12", "target", "edge9"],
        );
        fails(
            &GOOD.replace(
                "action = \"kill\"\ntarget = \"edge1\"",
                "action = \"kill\"\ntarget = \"edge1:cloud\"",
            ),
            &["target", "node"],
        );
        fails(
            &GOOD.replace("target = \"edge1:device1\"", "target = \"edge1\""),
            &["line 22", "target", "link"],
        );
        fails(
            &GOOD.replace("at_s = 45", "at_s = 99"),
            &["line 31", "at_s", "outside"],
        );
        fails(
            &GOOD.replace("loss = 0.05", "loss = 5.0"),
            &["params", "loss"],
        );
        fails(
            &GOOD.replace("loss = 0.05", "lose = 0.05"),
            &["params", "lose"],
        );
        fails(
            &GOOD.replace("\"device2:edge1\"", "\"device2:edge7\""),
            &["topology.links", "edge7"],
        );
        fails(
            &GOOD.replace("duration_s = 60", "duration_s = 60\nduration = 3"),
            &["duration"],
        );
        fails(
            &GOOD.replace(
                "target = \"edge1\"\n\n[[event]]\nat_s = 20",
                "target = \"edge1\"\nparams = { x = 1 }\n\n[[event]]\nat_s = 20",
            ),
            &["takes no params"],
        );
    }

    #[test]
    fn a_cycle_repeats_whole_cycles_only() {
        let s = Scenario::parse(GOOD).unwrap();
        let (r, cycles) = s.repeated(Duration::from_secs(150)).unwrap();
        assert_eq!((cycles, r.duration), (2, Duration::from_secs(150)));
        assert_eq!(r.events.len(), 10);
        let at: Vec<u64> = r.events.iter().map(|e| e.at.as_secs()).collect();
        assert_eq!(at, [20, 25, 30, 40, 45, 80, 85, 90, 100, 105]);
        assert_eq!(r.events[5].action, Action::Kill);
        let e = s.repeated(Duration::from_secs(59)).unwrap_err().to_string();
        assert!(e.contains("at least one fault cycle of 60 s"), "{e}");
    }

    #[test]
    fn timeline_yields_due_events_once() {
        let s = Scenario::parse(GOOD).unwrap();
        let mut t = ScenarioTimeline::new(&s);
        assert_eq!(t.next_due(), Some(Duration::from_secs(20)));
        assert!(t.poll_due(Duration::from_secs(19)).is_empty());
        let due = t.poll_due(Duration::from_secs(26));
        assert_eq!(
            due.iter().map(|e| e.action.clone()).collect::<Vec<_>>(),
            [Action::Kill, Action::Restart]
        );
        assert!(t.poll_due(Duration::from_secs(26)).is_empty());
        assert_eq!(t.poll_due(Duration::from_secs(100)).len(), 3);
        assert!(t.is_done() && t.next_due().is_none());
    }
}
