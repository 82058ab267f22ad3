//! How a parent link is probed and when a parent counts as lost: [`ProbeConfig`],
//! [`LinkHealth`] (keep-alive, idle timeout, missed probes, reply deadlines, re-dial backoff).

use std::time::Duration;

use flow_partition::LinkEstimatorConfig;

use super::ProbeBudget;
use crate::error::{NodeError, Result};

/// How a parent link is probed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProbeConfig {
    /// Time between probe rounds; `None` disables probing (the estimate stays the prior).
    pub interval: Option<Duration>,
    /// Smoothing and prior of the estimator.
    pub estimator: LinkEstimatorConfig,
    /// Dead-parent detection, reply deadlines and re-dialling.
    pub health: LinkHealth,
    /// Bytes the probes may cost and when the goodput probe goes.
    pub budget: ProbeBudget,
}

impl Default for ProbeConfig {
    fn default() -> Self {
        Self {
            interval: Some(Duration::from_millis(1000)),
            estimator: LinkEstimatorConfig::default(),
            health: LinkHealth::default(),
            budget: ProbeBudget::default(),
        }
    }
}

/// How a parent link notices that the parent is gone and how it comes back.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkHealth {
    /// QUIC keep-alive on parent connections.
    pub keep_alive: Duration,
    /// A parent connection closes after this long without a packet from the parent.
    pub idle_timeout: Duration,
    /// Least time an escalation (or a probe) waits for the parent's reply.
    pub reply_floor: Duration,
    /// The reply deadline allows this many link RTTs ...
    pub rtt_factor: f64,
    /// ... plus this many times the parent's smoothed service time for such a step.
    pub service_factor: f64,
    /// Service time assumed before any reply has been observed.
    pub service_prior: Duration,
    /// Reply deadlines never exceed this.
    pub reply_cap: Duration,
    /// Probe rounds missed in a row before the link is marked down.
    pub missed_probes: u32,
    /// Time one re-dial may take (TLS + `Hello`) before it counts as failed.
    pub dial_timeout: Duration,
    /// First re-dial backoff; doubles after each failed dial up to `redial_max`.
    pub redial_min: Duration,
    pub redial_max: Duration,
}

impl Default for LinkHealth {
    fn default() -> Self {
        Self {
            keep_alive: Duration::from_millis(500),
            idle_timeout: Duration::from_secs(3),
            reply_floor: Duration::from_millis(250),
            rtt_factor: 8.0,
            service_factor: 4.0,
            service_prior: Duration::from_millis(1500),
            reply_cap: Duration::from_secs(5),
            missed_probes: 2,
            dial_timeout: Duration::from_secs(2),
            redial_min: Duration::from_millis(200),
            redial_max: Duration::from_secs(2),
        }
    }
}

impl LinkHealth {
    /// Check the values; the error names the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |f: &str, why: &str| Err(NodeError::Config(format!("link health {f}: {why}")));
        if self.keep_alive.is_zero() || self.keep_alive >= self.idle_timeout {
            return bad(
                "keep_alive",
                "must be positive and shorter than idle_timeout",
            );
        }
        if !(self.rtt_factor.is_finite() && self.rtt_factor >= 0.0) {
            return bad("rtt_factor", "must be a finite number ≥ 0");
        }
        if !(self.service_factor.is_finite() && self.service_factor >= 0.0) {
            return bad("service_factor", "must be a finite number ≥ 0");
        }
        if self.reply_floor.is_zero() || self.reply_cap < self.reply_floor {
            return bad("reply_floor", "must be positive and at most reply_cap");
        }
        if self.missed_probes == 0 {
            return bad("missed_probes", "must be at least 1");
        }
        if self.redial_min.is_zero() || self.redial_max < self.redial_min {
            return bad("redial_min", "must be positive and at most redial_max");
        }
        if self.dial_timeout.is_zero() {
            return bad("dial_timeout", "must be positive");
        }
        Ok(())
    }

    /// Reply deadline for a step of `rows` rows: `max(floor, rtt_factor · rtt +
    /// service_factor · service)`, capped; `service` is the parent's smoothed service time
    /// for such a step (`None` = not observed yet: the prior).
    pub fn reply_deadline(&self, rtt_ms: f64, service_ms: Option<f64>) -> Duration {
        let service = service_ms.unwrap_or(self.service_prior.as_secs_f64() * 1e3);
        let ms = self.rtt_factor * rtt_ms.max(0.0) + self.service_factor * service.max(0.0);
        let d = if ms.is_finite() {
            Duration::from_secs_f64(ms / 1e3)
        } else {
            self.reply_cap
        };
        d.clamp(self.reply_floor, self.reply_cap)
    }
}
