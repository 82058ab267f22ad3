//! The sans-IO packet scheduler of one link direction.
//!
//! [`LinkModel::on_packet`] takes a packet arrival time (a `Duration` since the link started,
//! i.e. virtual time) and its size, and says when the packet leaves the link, or why it is
//! dropped. It owns no clock and no socket, so its accuracy is unit-tested exactly.
//!
//! Order of the stages, like a real bottleneck link:
//! 1. **queue** — packets waiting for the token bucket; beyond `queue_limit` packets the
//!    arriving one is tail-dropped ([`DropReason::QueueFull`]);
//! 2. **token bucket** — `rate_bps` bits per second, `bucket_bytes` deep: a packet is
//!    released once the bucket holds its size (FIFO, so departures are computed, never slept);
//! 3. **random loss** on the wire — with probability `loss` (seeded RNG); a lost packet has
//!    used its share of the bandwidth ([`DropReason::Loss`]);
//! 4. **propagation** — `delay` plus jitter (uniform in `±jitter` or normal with standard
//!    deviation `jitter`, never below zero total delay); with `keep_order` a packet never
//!    overtakes the previous one.

use std::collections::VecDeque;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// How jitter is drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum JitterDist {
    /// Uniform in `[-jitter, +jitter]`.
    #[default]
    Uniform,
    /// Normal with mean 0 and standard deviation `jitter`.
    Normal,
}

/// Parameters of one link direction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LinkParams {
    /// One-way propagation delay.
    pub delay: Duration,
    /// Jitter amplitude (uniform) or standard deviation (normal).
    pub jitter: Duration,
    /// Jitter distribution.
    pub jitter_dist: JitterDist,
    /// Keep packet order despite jitter (a packet never departs before its predecessor).
    pub keep_order: bool,
    /// Bandwidth in bits per second; `None` = unlimited.
    pub rate_bps: Option<u64>,
    /// Token bucket depth in bytes (the burst allowed at line rate). At least one MTU.
    pub bucket_bytes: u64,
    /// Random loss probability in `[0, 1]`.
    pub loss: f64,
    /// Packets that may wait for the token bucket before tail drop.
    pub queue_limit: usize,
}

impl Default for LinkParams {
    fn default() -> Self {
        Self {
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            jitter_dist: JitterDist::Uniform,
            keep_order: true,
            rate_bps: None,
            bucket_bytes: 16 * 1024,
            loss: 0.0,
            queue_limit: 1000,
        }
    }
}

impl LinkParams {
    /// A link with this one-way delay and nothing else.
    pub fn with_delay(delay: Duration) -> Self {
        Self {
            delay,
            ..Self::default()
        }
    }

    /// Check ranges; errors name the field.
    pub fn validate(&self) -> Result<()> {
        if !(0.0..=1.0).contains(&self.loss) || self.loss.is_nan() {
            return Err(Error::config(
                "loss",
                format!("{} is not a probability in [0, 1]", self.loss),
            ));
        }
        if self.rate_bps == Some(0) {
            return Err(Error::config(
                "rate_bps",
                "0 would stall the link; use None for unlimited",
            ));
        }
        if self.bucket_bytes < 1500 {
            return Err(Error::config(
                "bucket_bytes",
                format!("{} is below one MTU (1500 bytes)", self.bucket_bytes),
            ));
        }
        if self.queue_limit == 0 {
            return Err(Error::config("queue_limit", "must be at least 1 packet"));
        }
        Ok(())
    }
}

/// Why a packet was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DropReason {
    /// Random loss.
    Loss,
    /// The queue in front of the token bucket was full (tail drop).
    QueueFull,
}

/// What happens to one packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The packet leaves the link at this time (since link start).
    Deliver(Duration),
    /// The packet is dropped.
    Drop(DropReason),
}

/// The sans-IO model of one link direction. See the module docs.
#[derive(Debug)]
pub struct LinkModel {
    params: LinkParams,
    rng: StdRng,
    /// Tokens (bytes) in the bucket at `bucket_at`.
    tokens: f64,
    bucket_at: Duration,
    /// Release time of the last packet from the token bucket.
    last_release: Duration,
    /// Departure time of the last delivered packet (for `keep_order`).
    last_departure: Duration,
    /// Release times of packets still waiting for the bucket (the queue).
    waiting: VecDeque<Duration>,
}

impl LinkModel {
    /// A model with `params`, random draws seeded by `seed`.
    pub fn new(params: LinkParams, seed: u64) -> Result<Self> {
        params.validate()?;
        let tokens = params.bucket_bytes as f64;
        Ok(Self {
            params,
            rng: StdRng::seed_from_u64(seed),
            tokens,
            bucket_at: Duration::ZERO,
            last_release: Duration::ZERO,
            last_departure: Duration::ZERO,
            waiting: VecDeque::new(),
        })
    }

    /// Current parameters.
    pub fn params(&self) -> &LinkParams {
        &self.params
    }

    /// Change parameters from now on; packets already scheduled keep their times.
    pub fn set_params(&mut self, params: LinkParams) -> Result<()> {
        params.validate()?;
        self.tokens = self.tokens.min(params.bucket_bytes as f64);
        self.params = params;
        Ok(())
    }

    /// Packets waiting for the token bucket at time `now`.
    pub fn queued(&mut self, now: Duration) -> usize {
        while self.waiting.front().is_some_and(|&r| r <= now) {
            self.waiting.pop_front();
        }
        self.waiting.len()
    }

    /// A packet of `bytes` bytes arrives at `now` (since link start; non-decreasing across
    /// calls). Returns when it departs, or why it is dropped.
    pub fn on_packet(&mut self, now: Duration, bytes: usize) -> Verdict {
        // 1. queue in front of the bucket.
        if self.queued(now) >= self.params.queue_limit {
            return Verdict::Drop(DropReason::QueueFull);
        }
        // 2. token bucket, FIFO behind the previous packet.
        let release = match self.params.rate_bps {
            None => now,
            Some(bps) => {
                let rate = bps as f64 / 8.0; // bytes per second
                let start = now.max(self.last_release);
                let elapsed = start.saturating_sub(self.bucket_at).as_secs_f64();
                let cap = self.params.bucket_bytes as f64;
                let have = (self.tokens + elapsed * rate).min(cap);
                let need = bytes as f64;
                let (release, left) = if have >= need {
                    (start, have - need)
                } else {
                    (start + Duration::from_secs_f64((need - have) / rate), 0.0)
                };
                self.tokens = left;
                self.bucket_at = release;
                release
            }
        };
        self.last_release = self.last_release.max(release);
        if release > now {
            self.waiting.push_back(release);
        }
        // 3. random loss on the wire.
        if self.params.loss > 0.0 && self.rng.gen_bool(self.params.loss) {
            return Verdict::Drop(DropReason::Loss);
        }
        // 4. propagation delay and jitter.
        let mut departure = release + self.params.delay;
        if !self.params.jitter.is_zero() {
            let j = self.params.jitter.as_secs_f64();
            let offset = match self.params.jitter_dist {
                JitterDist::Uniform => self.rng.gen_range(-j..=j),
                JitterDist::Normal => match Normal::new(0.0, j) {
                    Ok(n) => n.sample(&mut self.rng),
                    Err(_) => 0.0,
                },
            };
            let total = (self.params.delay.as_secs_f64() + offset).max(0.0);
            departure = release + Duration::from_secs_f64(total);
        }
        if self.params.keep_order {
            departure = departure.max(self.last_departure);
        }
        self.last_departure = self.last_departure.max(departure);
        Verdict::Deliver(departure)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    fn deliver(v: Verdict) -> Duration {
        match v {
            Verdict::Deliver(t) => t,
            Verdict::Drop(r) => panic!("unexpected drop {r:?}"),
        }
    }

    #[test]
    fn pure_delay_is_exact() {
        let mut m = LinkModel::new(LinkParams::with_delay(ms(25)), 1).unwrap();
        for i in 0..100 {
            assert_eq!(deliver(m.on_packet(ms(i), 1200)), ms(i + 25));
        }
    }

    #[test]
    fn rate_is_exact_after_the_burst() {
        // 8 Mbit/s = 1 MB/s; 1000-byte packets => one per ms once the bucket is empty.
        let params = LinkParams {
            rate_bps: Some(8_000_000),
            bucket_bytes: 4000,
            queue_limit: 100_000,
            ..LinkParams::default()
        };
        let mut m = LinkModel::new(params, 1).unwrap();
        // 10_000 packets all arriving at t=0: 4 leave at once (the burst), then 1 per ms.
        let deps: Vec<Duration> = (0..10_000)
            .map(|_| deliver(m.on_packet(ms(0), 1000)))
            .collect();
        assert_eq!(deps[3], ms(0));
        assert_eq!(deps[4], ms(1));
        let last = deps[9_999].as_secs_f64();
        let rate = (10_000.0 - 4.0) * 1000.0 * 8.0 / last;
        assert!((rate / 8e6 - 1.0).abs() < 1e-6, "rate {rate}");
    }

    #[test]
    fn bucket_refills_while_idle() {
        let params = LinkParams {
            rate_bps: Some(8_000_000),
            bucket_bytes: 3000,
            ..LinkParams::default()
        };
        let mut m = LinkModel::new(params, 1).unwrap();
        for _ in 0..3 {
            assert_eq!(deliver(m.on_packet(ms(0), 1000)), ms(0));
        }
        assert_eq!(deliver(m.on_packet(ms(0), 1000)), ms(1));
        // after 10 ms idle the bucket is full again (capped at 3000 bytes)
        for _ in 0..3 {
            assert_eq!(deliver(m.on_packet(ms(11), 1000)), ms(11));
        }
        assert_eq!(deliver(m.on_packet(ms(11), 1000)), ms(12));
    }

    #[test]
    fn queue_limit_tail_drops_and_recovers() {
        let params = LinkParams {
            rate_bps: Some(8_000_000),
            bucket_bytes: 1500,
            queue_limit: 10,
            ..LinkParams::default()
        };
        let mut m = LinkModel::new(params, 1).unwrap();
        let verdicts: Vec<Verdict> = (0..20).map(|_| m.on_packet(ms(0), 1000)).collect();
        let dropped = verdicts
            .iter()
            .filter(|v| **v == Verdict::Drop(DropReason::QueueFull))
            .count();
        // 1 passes immediately (bucket), 10 wait, 9 are dropped.
        assert_eq!(dropped, 9);
        // once the queue has drained, packets are accepted again
        assert!(matches!(m.on_packet(ms(100), 1000), Verdict::Deliver(_)));
    }

    #[test]
    fn loss_rate_matches_and_is_seeded() {
        let params = LinkParams {
            loss: 0.1,
            ..LinkParams::default()
        };
        let run = |seed| {
            let mut m = LinkModel::new(params.clone(), seed).unwrap();
            (0..100_000)
                .filter(|&i| m.on_packet(ms(i), 100) == Verdict::Drop(DropReason::Loss))
                .count()
        };
        let a = run(7);
        assert_eq!(a, run(7), "same seed, same drops");
        let frac = a as f64 / 100_000.0;
        assert!((frac - 0.1).abs() < 0.005, "loss {frac}");
    }

    #[test]
    fn jitter_keeps_order_when_asked() {
        for dist in [JitterDist::Uniform, JitterDist::Normal] {
            let params = LinkParams {
                delay: ms(20),
                jitter: ms(5),
                jitter_dist: dist,
                keep_order: true,
                ..LinkParams::default()
            };
            let mut m = LinkModel::new(params, 3).unwrap();
            // packets 10 ms apart: order is rarely at stake, so the mean delay stays ~20 ms
            let deps: Vec<Duration> = (0..1000)
                .map(|i| deliver(m.on_packet(ms(i * 10), 100)))
                .collect();
            assert!(deps.windows(2).all(|w| w[0] <= w[1]), "{dist:?} reordered");
            let mean: f64 = deps
                .iter()
                .enumerate()
                .map(|(i, d)| (d.as_secs_f64() - i as f64 / 100.0) * 1000.0)
                .sum::<f64>()
                / 1000.0;
            assert!((mean - 20.0).abs() < 1.0, "{dist:?} mean delay {mean} ms");
            // packets 1 ms apart with 5 ms jitter: keeping order only ever adds delay
            let mut m = LinkModel::new(m.params().clone(), 4).unwrap();
            let deps: Vec<Duration> = (0..1000)
                .map(|i| deliver(m.on_packet(ms(i), 100)))
                .collect();
            assert!(deps.windows(2).all(|w| w[0] <= w[1]), "{dist:?} reordered");
        }
    }

    #[test]
    fn jitter_without_order_reorders_but_never_goes_back_in_time() {
        let params = LinkParams {
            delay: ms(10),
            jitter: ms(10),
            keep_order: false,
            ..LinkParams::default()
        };
        let mut m = LinkModel::new(params, 3).unwrap();
        let deps: Vec<Duration> = (0..1000)
            .map(|i| deliver(m.on_packet(ms(i / 10), 100)))
            .collect();
        assert!(
            deps.windows(2).any(|w| w[0] > w[1]),
            "expected some reordering"
        );
        for (i, d) in deps.iter().enumerate() {
            assert!(*d >= ms(i as u64 / 10));
        }
    }

    #[test]
    fn invalid_params_name_the_field() {
        let err = LinkModel::new(
            LinkParams {
                loss: 1.5,
                ..LinkParams::default()
            },
            0,
        )
        .unwrap_err();
        assert!(err.to_string().contains("loss"), "{err}");
        let err = LinkModel::new(
            LinkParams {
                bucket_bytes: 10,
                ..LinkParams::default()
            },
            0,
        )
        .unwrap_err();
        assert!(err.to_string().contains("bucket_bytes"), "{err}");
    }
}
