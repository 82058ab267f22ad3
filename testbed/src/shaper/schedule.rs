//! Link changes over time, from a TOML schedule file.
//!
//! ```toml
//! [[step]]
//! at_ms = 0
//! delay_ms = 20
//! jitter_ms = 2
//! rate_mbit = 10.0
//! loss = 0.0
//!
//! [[step]]
//! at_ms = 30000
//! rate_mbit = 1.0      # fields left out keep their previous value
//! loss = 0.05
//! direction = "up"     # "up" (client -> upstream), "down", or "both" (default)
//! ```
//!
//! [`ScheduledLink`] applies due steps to a [`LinkModel`] before each packet: still sans-IO.

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::model::{LinkModel, LinkParams, Verdict};
use crate::error::{line_of, toml_error, Error, Result};

/// Which direction of a relayed link a step applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// Client to upstream.
    Up,
    /// Upstream to client.
    Down,
    /// Both directions.
    #[default]
    Both,
}

impl Direction {
    /// Whether a step for `self` applies to direction `d` (`Up` or `Down`).
    pub fn applies_to(self, d: Direction) -> bool {
        self == Direction::Both || self == d
    }
}

/// A change of link parameters; `None` fields keep their value.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkChange {
    /// One-way delay in milliseconds.
    pub delay_ms: Option<f64>,
    /// Jitter in milliseconds.
    pub jitter_ms: Option<f64>,
    /// Bandwidth in Mbit/s (10^6 bits per second); 0 or negative = unlimited.
    pub rate_mbit: Option<f64>,
    /// Random loss probability.
    pub loss: Option<f64>,
}

impl LinkChange {
    /// `base` with this change applied.
    pub fn apply(&self, base: &LinkParams) -> Result<LinkParams> {
        let mut p = base.clone();
        let dur = |field: &'static str, v: f64| {
            if v.is_finite() && v >= 0.0 {
                Ok(Duration::from_secs_f64(v / 1000.0))
            } else {
                Err(Error::config(
                    field,
                    format!("{v} is not a non-negative number of ms"),
                ))
            }
        };
        if let Some(v) = self.delay_ms {
            p.delay = dur("delay_ms", v)?;
        }
        if let Some(v) = self.jitter_ms {
            p.jitter = dur("jitter_ms", v)?;
        }
        if let Some(v) = self.rate_mbit {
            if !v.is_finite() {
                return Err(Error::config("rate_mbit", format!("{v} is not a number")));
            }
            p.rate_bps = (v > 0.0).then(|| (v * 1e6).round().max(1.0) as u64);
        }
        if let Some(v) = self.loss {
            p.loss = v;
        }
        p.validate()?;
        Ok(p)
    }
}

/// One step of a schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleStep {
    /// When the step takes effect, in ms since the shaper started.
    pub at_ms: u64,
    /// Which direction it applies to.
    #[serde(default)]
    pub direction: Direction,
    /// One-way delay in milliseconds.
    pub delay_ms: Option<f64>,
    /// Jitter in milliseconds.
    pub jitter_ms: Option<f64>,
    /// Bandwidth in Mbit/s; 0 = unlimited.
    pub rate_mbit: Option<f64>,
    /// Random loss probability.
    pub loss: Option<f64>,
}

impl ScheduleStep {
    /// The parameter change of this step.
    pub fn change(&self) -> LinkChange {
        LinkChange {
            delay_ms: self.delay_ms,
            jitter_ms: self.jitter_ms,
            rate_mbit: self.rate_mbit,
            loss: self.loss,
        }
    }
}

/// A list of steps sorted by time.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LinkSchedule {
    /// The steps, sorted by `at_ms` (stable).
    #[serde(default, rename = "step")]
    pub steps: Vec<ScheduleStep>,
}

impl LinkSchedule {
    /// Parse a schedule from TOML text; errors carry the line number.
    pub fn parse(text: &str) -> Result<Self> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Raw {
            #[serde(default)]
            step: Vec<toml::Spanned<ScheduleStep>>,
        }
        let raw: Raw = toml::from_str(text).map_err(|e| toml_error("shaper schedule", text, e))?;
        let mut steps = Vec::with_capacity(raw.step.len());
        for s in raw.step {
            let line = line_of(text, s.span().start);
            let step = s.into_inner();
            // validate against defaults so bad values fail at load time, not mid-run
            step.change()
                .apply(&LinkParams::default())
                .map_err(|e| Error::Toml {
                    what: "shaper schedule",
                    line,
                    field: match &e {
                        Error::Config { field, .. } => (*field).to_string(),
                        _ => "*".to_string(),
                    },
                    reason: e.to_string(),
                })?;
            steps.push(step);
        }
        steps.sort_by_key(|s| s.at_ms);
        Ok(Self { steps })
    }

    /// Load a schedule file.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::file("reading", path, e))?;
        Self::parse(&text)
    }
}

/// A [`LinkModel`] for one direction plus the schedule steps that apply to it.
#[derive(Debug)]
pub struct ScheduledLink {
    model: LinkModel,
    steps: Vec<ScheduleStep>,
    next: usize,
}

impl ScheduledLink {
    /// `model` driven by the steps of `schedule` that apply to `direction`.
    pub fn new(model: LinkModel, schedule: &LinkSchedule, direction: Direction) -> Self {
        let steps = schedule
            .steps
            .iter()
            .filter(|s| s.direction.applies_to(direction))
            .cloned()
            .collect();
        Self {
            model,
            steps,
            next: 0,
        }
    }

    /// The model (current parameters).
    pub fn model(&self) -> &LinkModel {
        &self.model
    }

    /// Replace the current parameters (a live change); later schedule steps still apply.
    pub fn set_params(&mut self, params: LinkParams) -> Result<()> {
        self.model.set_params(params)
    }

    /// Apply the steps due at `now`. Steps were validated at load time; a step that still
    /// fails (e.g. against other base params) is skipped with a warning.
    pub fn advance(&mut self, now: Duration) {
        while let Some(step) = self.steps.get(self.next) {
            if Duration::from_millis(step.at_ms) > now {
                break;
            }
            self.next += 1;
            match step.change().apply(self.model.params()) {
                Ok(p) => {
                    if let Err(e) = self.model.set_params(p) {
                        tracing::warn!(at_ms = step.at_ms, "schedule step skipped: {e}");
                    }
                }
                Err(e) => tracing::warn!(at_ms = step.at_ms, "schedule step skipped: {e}"),
            }
        }
    }

    /// Apply due steps, then schedule the packet (see [`LinkModel::on_packet`]).
    pub fn on_packet(&mut self, now: Duration, bytes: usize) -> Verdict {
        self.advance(now);
        self.model.on_packet(now, bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"
[[step]]
at_ms = 1000
rate_mbit = 8.0
loss = 0.0

[[step]]
at_ms = 0
delay_ms = 20
jitter_ms = 0

[[step]]
at_ms = 2000
delay_ms = 50
direction = "down"
"#;

    #[test]
    fn parses_sorts_and_applies_per_direction() {
        let s = LinkSchedule::parse(TEXT).unwrap();
        assert_eq!(
            s.steps.iter().map(|s| s.at_ms).collect::<Vec<_>>(),
            [0, 1000, 2000]
        );
        let mk = |d| ScheduledLink::new(LinkModel::new(LinkParams::default(), 0).unwrap(), &s, d);
        let (mut up, mut down) = (mk(Direction::Up), mk(Direction::Down));
        let ms = Duration::from_millis;
        assert_eq!(up.on_packet(ms(0), 100), Verdict::Deliver(ms(20)));
        up.advance(ms(1500));
        assert_eq!(up.model().params().rate_bps, Some(8_000_000));
        assert_eq!(
            up.on_packet(ms(3000), 100),
            Verdict::Deliver(ms(3020)),
            "up keeps 20 ms"
        );
        assert_eq!(
            down.on_packet(ms(3000), 100),
            Verdict::Deliver(ms(3050)),
            "down got 50 ms"
        );
    }

    #[test]
    fn bad_values_name_line_and_field() {
        let err = LinkSchedule::parse("[[step]]\nat_ms = 0\n\n[[step]]\nat_ms = 5\nloss = 2.0\n")
            .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("line 4") && msg.contains("loss"), "{msg}");
        let err = LinkSchedule::parse("[[step]]\nat_ms = 0\nlatency_ms = 3\n").unwrap_err();
        assert!(err.to_string().contains("latency_ms"), "{err}");
    }
}
