//! Link estimates: RTT and goodput of a parent link, smoothed with a time-based EWMA.
//!
//! The estimator has no clock: every sample carries a caller-supplied timestamp in
//! milliseconds (the agent uses tokio's clock, tests use made-up numbers). With half-life
//! `h`, a sample arriving `Δt` ms after the previous one gets weight
//! `α = 1 − 2^(−Δt/h)`, so after a step change the estimate covers half the step after
//! `h` ms whatever the sampling rate. Variance is tracked with the same weights
//! (West/Finch incremental EW variance).
//!
//! Confidence in `[0, 1]` is `n/(n + k) · 2^(−age/s)`: it grows with the number of samples
//! `n` (half confidence at `k` samples) and decays with the age of the newest sample (half
//! after `s` ms). [`LinkEstimator::planning_estimate`] blends the smoothed values with the
//! prior by that confidence, so a link with no or stale samples plans on the prior.

use serde::{Deserialize, Serialize};

use crate::error::{check_non_negative, check_positive, check_unit, Result};

/// What the planner needs to know about one link. Goodput in bits per second.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LinkEstimate {
    /// Round-trip time (ms).
    pub rtt_ms: f64,
    /// Application-level throughput (bits per second).
    pub goodput_bps: f64,
    /// Standard deviation of the RTT samples (ms).
    pub rtt_std_ms: f64,
    /// Standard deviation of the goodput samples (bits per second).
    pub goodput_std_bps: f64,
    /// Confidence in `[0, 1]`; 0 for a prior.
    pub confidence: f64,
}

impl LinkEstimate {
    /// A link with exact values and full confidence (tests, static configuration).
    pub fn fixed(rtt_ms: f64, goodput_bps: f64) -> Self {
        Self {
            rtt_ms,
            goodput_bps,
            rtt_std_ms: 0.0,
            goodput_std_bps: 0.0,
            confidence: 1.0,
        }
    }

    /// One-way transfer time of `bytes` (ms): `bytes·8/goodput·1000 + RTT/2`.
    pub fn one_way_ms(&self, bytes: f64) -> f64 {
        self.serialisation_ms(bytes) + self.rtt_ms / 2.0
    }

    /// Time to put `bytes` on the link at the goodput, without propagation (ms).
    pub fn serialisation_ms(&self, bytes: f64) -> f64 {
        bytes * 8.0 / self.goodput_bps * 1000.0
    }

    /// Checks every number.
    pub fn validate(&self, field: &str) -> Result<()> {
        check_non_negative(format!("{field}.rtt_ms"), self.rtt_ms)?;
        check_positive(format!("{field}.goodput_bps"), self.goodput_bps)?;
        check_non_negative(format!("{field}.rtt_std_ms"), self.rtt_std_ms)?;
        check_non_negative(format!("{field}.goodput_std_bps"), self.goodput_std_bps)?;
        check_unit(format!("{field}.confidence"), self.confidence)?;
        Ok(())
    }
}

/// One observation of a link. Either field may be absent (an RTT-only probe, a goodput
/// measurement from QUIC stats without a fresh RTT).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LinkSample {
    /// Caller's clock (ms).
    pub at_ms: u64,
    /// Measured RTT (ms).
    pub rtt_ms: Option<f64>,
    /// Measured goodput (bits per second).
    pub goodput_bps: Option<f64>,
}

impl LinkSample {
    /// A goodput sample from a transfer of `bytes` that took `elapsed_ms`.
    pub fn from_transfer(at_ms: u64, bytes: u64, elapsed_ms: f64) -> Self {
        let goodput = if elapsed_ms > 0.0 {
            Some(bytes as f64 * 8.0 / (elapsed_ms / 1000.0))
        } else {
            None
        };
        Self {
            at_ms,
            rtt_ms: None,
            goodput_bps: goodput,
        }
    }
}

/// Configuration of a [`LinkEstimator`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LinkEstimatorConfig {
    /// EWMA half-life (ms).
    pub half_life_ms: f64,
    /// Samples at which the count part of the confidence reaches 1/2.
    pub half_confidence_samples: f64,
    /// Age of the newest sample at which the recency part of the confidence halves (ms).
    pub staleness_half_life_ms: f64,
    /// Weight of a sample with the same timestamp as the previous one (`Δt = 0`), or an
    /// older timestamp, in `[0, 1]`.
    pub same_time_weight: f64,
    /// Used when there is no sample, and blended in while confidence is low.
    pub prior: LinkEstimate,
    /// The RTT an estimate reports is the smallest of the last this many RTT samples: the
    /// propagation delay each message pays. Probes that queued behind a transfer on a slow
    /// link read high, and charging that queueing to every token over-predicted a 1 Mbit/s
    /// link by 23-28 %; queueing is the goodput's part. 0: the EWMA mean of the samples.
    pub rtt_floor_samples: usize,
}

impl Default for LinkEstimatorConfig {
    fn default() -> Self {
        Self {
            half_life_ms: 2_000.0,
            half_confidence_samples: 5.0,
            staleness_half_life_ms: 30_000.0,
            same_time_weight: 0.1,
            prior: LinkEstimate {
                rtt_ms: 50.0,
                goodput_bps: 10e6,
                rtt_std_ms: 0.0,
                goodput_std_bps: 0.0,
                confidence: 0.0,
            },
            rtt_floor_samples: 8,
        }
    }
}

impl LinkEstimatorConfig {
    /// Checks every number.
    pub fn validate(&self) -> Result<()> {
        check_positive("half_life_ms", self.half_life_ms)?;
        check_positive("half_confidence_samples", self.half_confidence_samples)?;
        check_positive("staleness_half_life_ms", self.staleness_half_life_ms)?;
        check_unit("same_time_weight", self.same_time_weight)?;
        self.prior.validate("prior")
    }
}

/// EWMA mean and variance of one quantity.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
struct Ewm {
    mean: f64,
    var: f64,
    n: u64,
    last_ms: u64,
}

impl Ewm {
    fn update(&mut self, at_ms: u64, x: f64, cfg: &LinkEstimatorConfig) {
        if self.n == 0 {
            *self = Ewm {
                mean: x,
                var: 0.0,
                n: 1,
                last_ms: at_ms,
            };
            return;
        }
        let alpha = if at_ms > self.last_ms {
            let dt = (at_ms - self.last_ms) as f64;
            1.0 - (-dt / cfg.half_life_ms).exp2()
        } else {
            cfg.same_time_weight
        };
        let diff = x - self.mean;
        let incr = alpha * diff;
        self.mean += incr;
        self.var = (1.0 - alpha) * (self.var + diff * incr);
        self.n += 1;
        self.last_ms = self.last_ms.max(at_ms);
    }
}

/// Smoothed estimate of one link, fed with [`LinkSample`]s.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinkEstimator {
    config: LinkEstimatorConfig,
    rtt: Ewm,
    goodput: Ewm,
    /// The last `config.rtt_floor_samples` RTT samples, oldest first.
    recent_rtt: std::collections::VecDeque<f64>,
}

impl LinkEstimator {
    /// A new estimator; errors on an invalid configuration.
    pub fn new(config: LinkEstimatorConfig) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            config,
            rtt: Ewm::default(),
            goodput: Ewm::default(),
            recent_rtt: std::collections::VecDeque::new(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &LinkEstimatorConfig {
        &self.config
    }

    /// Feeds one sample. A NaN, infinite or negative value (or zero goodput) is rejected
    /// with an error and leaves the state unchanged.
    pub fn observe(&mut self, s: LinkSample) -> Result<()> {
        if let Some(r) = s.rtt_ms {
            check_non_negative("sample.rtt_ms", r)?;
        }
        if let Some(g) = s.goodput_bps {
            check_positive("sample.goodput_bps", g)?;
        }
        if let Some(r) = s.rtt_ms {
            self.rtt.update(s.at_ms, r, &self.config);
            if self.config.rtt_floor_samples > 0 {
                if self.recent_rtt.len() == self.config.rtt_floor_samples {
                    self.recent_rtt.pop_front();
                }
                self.recent_rtt.push_back(r);
            }
        }
        if let Some(g) = s.goodput_bps {
            self.goodput.update(s.at_ms, g, &self.config);
        }
        Ok(())
    }

    /// Number of samples seen (RTT, goodput).
    pub fn sample_counts(&self) -> (u64, u64) {
        (self.rtt.n, self.goodput.n)
    }

    fn confidence_of(&self, e: &Ewm, now_ms: u64) -> f64 {
        if e.n == 0 {
            return 0.0;
        }
        let n = e.n as f64;
        let count = n / (n + self.config.half_confidence_samples);
        let age = now_ms.saturating_sub(e.last_ms) as f64;
        count * (-age / self.config.staleness_half_life_ms).exp2()
    }

    /// The smoothed values at `now_ms`; fields without samples come from the prior. The
    /// RTT is the floor of the recent samples (see
    /// [`LinkEstimatorConfig::rtt_floor_samples`]), its deviation the EWMA one.
    /// Confidence is the smaller of the RTT's and the goodput's.
    pub fn estimate(&self, now_ms: u64) -> LinkEstimate {
        let p = &self.config.prior;
        let floor = self.recent_rtt.iter().copied().reduce(f64::min);
        let (rtt, rtt_std) = if self.rtt.n > 0 {
            (floor.unwrap_or(self.rtt.mean), self.rtt.var.max(0.0).sqrt())
        } else {
            (p.rtt_ms, p.rtt_std_ms)
        };
        let (gp, gp_std) = if self.goodput.n > 0 {
            (self.goodput.mean, self.goodput.var.max(0.0).sqrt())
        } else {
            (p.goodput_bps, p.goodput_std_bps)
        };
        LinkEstimate {
            rtt_ms: rtt,
            goodput_bps: gp,
            rtt_std_ms: rtt_std,
            goodput_std_bps: gp_std,
            confidence: self
                .confidence_of(&self.rtt, now_ms)
                .min(self.confidence_of(&self.goodput, now_ms)),
        }
    }

    /// What the planner should use at `now_ms`: each quantity is
    /// `c·smoothed + (1 − c)·prior` with `c` that quantity's confidence.
    pub fn planning_estimate(&self, now_ms: u64) -> LinkEstimate {
        let e = self.estimate(now_ms);
        let p = &self.config.prior;
        let cr = self.confidence_of(&self.rtt, now_ms);
        let cg = self.confidence_of(&self.goodput, now_ms);
        LinkEstimate {
            rtt_ms: cr * e.rtt_ms + (1.0 - cr) * p.rtt_ms,
            goodput_bps: cg * e.goodput_bps + (1.0 - cg) * p.goodput_bps,
            ..e
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn estimate_stays_within_the_samples(
            samples in proptest::collection::vec((0u64..10_000, 1e3f64..1e9, 0.0f64..500.0), 1..60),
            half_life in 1.0f64..60_000.0,
        ) {
            let mut e = LinkEstimator::new(cfg(half_life)).unwrap();
            let mut t = 0;
            for &(dt, g, r) in &samples {
                t += dt;
                e.observe(LinkSample { at_ms: t, rtt_ms: Some(r), goodput_bps: Some(g) }).unwrap();
            }
            let est = e.estimate(t);
            let (gmin, gmax) = samples.iter().fold((f64::MAX, 0.0f64), |(a, b), s| (a.min(s.1), b.max(s.1)));
            prop_assert!(est.goodput_bps >= gmin * (1.0 - 1e-9) && est.goodput_bps <= gmax * (1.0 + 1e-9));
            prop_assert!((0.0..=1.0).contains(&est.confidence));
            prop_assert!(est.rtt_std_ms.is_finite() && est.goodput_std_bps.is_finite());
        }
    }

    fn cfg(half_life_ms: f64) -> LinkEstimatorConfig {
        LinkEstimatorConfig {
            half_life_ms,
            ..Default::default()
        }
    }

    fn gp(at_ms: u64, g: f64) -> LinkSample {
        LinkSample {
            at_ms,
            rtt_ms: None,
            goodput_bps: Some(g),
        }
    }

    #[test]
    fn no_sample_gives_prior_with_zero_confidence() {
        let e = LinkEstimator::new(cfg(1000.0)).unwrap();
        let est = e.estimate(5);
        assert_eq!(est.rtt_ms, 50.0);
        assert_eq!(est.goodput_bps, 10e6);
        assert_eq!(est.confidence, 0.0);
        assert_eq!(e.planning_estimate(5).goodput_bps, 10e6);
    }

    #[test]
    fn step_change_is_half_covered_after_one_half_life() {
        for &(half_life, dt) in &[(1000.0, 50u64), (1000.0, 250), (4000.0, 100)] {
            let mut e = LinkEstimator::new(cfg(half_life)).unwrap();
            let mut t = 0;
            while t <= 20_000 {
                e.observe(gp(t, 10e6)).unwrap();
                t += dt;
            }
            let step_at = t - dt;
            // Step to 100 Mbit/s.
            let mut now = step_at;
            while now < step_at + half_life as u64 {
                now += dt;
                e.observe(gp(now, 100e6)).unwrap();
            }
            let g = e.estimate(now).goodput_bps;
            assert!((g - 55e6).abs() < 1e3, "half-life {half_life} dt {dt}: {g}");
            // Two more half-lives: 3/4 -> 7/8 of the step.
            let end = now + 2 * half_life as u64;
            while now < end {
                now += dt;
                e.observe(gp(now, 100e6)).unwrap();
            }
            let g = e.estimate(now).goodput_bps;
            assert!((g - (10e6 + 90e6 * 0.875)).abs() < 1e3, "{g}");
        }
    }

    #[test]
    fn variance_and_confidence() {
        let mut e = LinkEstimator::new(LinkEstimatorConfig {
            rtt_floor_samples: 0,
            ..cfg(1000.0)
        })
        .unwrap();
        let mut last = 0.0;
        for i in 0..200u64 {
            let r = if i % 2 == 0 { 10.0 } else { 30.0 };
            e.observe(LinkSample {
                at_ms: i * 100,
                rtt_ms: Some(r),
                goodput_bps: Some(1e6),
            })
            .unwrap();
            let c = e.estimate(i * 100).confidence;
            assert!(c >= last && (0.0..=1.0).contains(&c));
            last = c;
        }
        let est = e.estimate(19_900);
        assert!((est.rtt_ms - 20.0).abs() < 1.5, "{est:?}");
        assert!(est.rtt_std_ms > 5.0 && est.rtt_std_ms < 15.0, "{est:?}");
        assert!(est.confidence > 0.9);
        // Stale: confidence decays with age, and planning drifts back to the prior.
        let old = e.estimate(19_900 + 120_000);
        assert!(old.confidence < 0.1, "{old:?}");
        let plan = e.planning_estimate(19_900 + 120_000);
        assert!(plan.rtt_ms > 45.0, "{plan:?}");
    }

    #[test]
    fn rtt_is_the_floor_of_recent_samples_and_follows_a_step_up() {
        let mut e = LinkEstimator::new(cfg(1000.0)).unwrap();
        let rtt = |at_ms, r| LinkSample {
            at_ms,
            rtt_ms: Some(r),
            goodput_bps: Some(1e6),
        };
        // Propagation 20 ms; every other probe queued 30 ms behind a transfer.
        for i in 0..20u64 {
            let r = if i % 2 == 0 { 20.0 } else { 50.0 };
            e.observe(rtt(i * 100, r)).unwrap();
        }
        assert_eq!(e.estimate(2_000).rtt_ms, 20.0);
        // A real step to 200 ms shows once the window holds only new samples.
        for i in 20..28u64 {
            e.observe(rtt(i * 100, 200.0)).unwrap();
        }
        assert_eq!(e.estimate(2_800).rtt_ms, 200.0);
    }

    #[test]
    fn bad_samples_are_rejected_without_changing_state() {
        let mut e = LinkEstimator::new(cfg(1000.0)).unwrap();
        e.observe(gp(0, 5e6)).unwrap();
        let before = e.clone();
        assert!(e.observe(gp(1, f64::NAN)).is_err());
        assert!(e.observe(gp(1, 0.0)).is_err());
        assert!(e
            .observe(LinkSample {
                at_ms: 1,
                rtt_ms: Some(-1.0),
                goodput_bps: Some(1e6)
            })
            .is_err());
        assert_eq!(e, before);
        assert!(LinkEstimator::new(cfg(f64::NAN)).is_err());
        // Out-of-order timestamps do not panic.
        e.observe(gp(0, 6e6)).unwrap();
        let t = LinkSample::from_transfer(10, 1_000_000, 1000.0);
        assert_eq!(t.goodput_bps, Some(8e6));
    }
}
