//! The byte budget of a parent link's probes, sans IO: a token bucket on a caller's clock
//! and the decision, per probe round, of what to send.
//!
//! The bucket is charged with what the link really put on the wire since the last round
//! (QUIC's counters: UDP payloads and datagrams both ways — keep-alives, the liveness probe,
//! goodput probes and request traffic alike), so the budget bounds the bytes a capture
//! sees, not an estimate of them. Every round sends the small liveness probe (dead-parent
//! detection does not wait for tokens). The big goodput probe goes only when
//! - a decision depends on the goodput estimate (the planner read it recently: `wanted`),
//! - the estimate is stale (no goodput sample — probe or real transfer — for
//!   `goodput_refresh`, or fewer than `min_goodput_samples` so far), and
//! - the bucket holds its estimated cost ([`exchange_cost`]).
//!
//! An idle link without run-time planning therefore costs one tiny exchange per round plus
//! QUIC keep-alives (~0.4 KB/s); with planning, at most the budget on average (plus one
//! probe: the one that overdraws is charged after it went). A busy link spends its budget
//! on requests, whose transfers are goodput samples themselves.

use std::time::Duration;

/// Bytes of IP, UDP and QUIC short-header overhead (with the AEAD tag) per packet.
pub const PACKET_OVERHEAD: u64 = 60;
/// QUIC payload bytes per full packet (what the path MTU leaves).
const PACKET_PAYLOAD: u64 = 1200;
/// Bytes of one ACK-only packet on the wire.
const ACK_PACKET: u64 = 50;
/// Framing of one probe message beyond its payload (frame header, message fields,
/// tensor header).
const MESSAGE_OVERHEAD: u64 = 48;

/// The budget of a link's probes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProbeBudget {
    /// Average bytes per second (IP packets, both ways) the link may carry when a goodput
    /// probe is to go: everything on the connection is charged, so a goodput probe uses
    /// only what keep-alives, liveness probes and requests leave of the budget.
    pub bytes_per_s: f64,
    /// Bytes the bucket holds (what may go at once: the first goodput probes after a
    /// start). At least one big probe's cost, or big probes are capped to fit.
    pub burst_bytes: f64,
    /// The goodput estimate is stale when its newest sample is older than this.
    pub goodput_refresh: Duration,
    /// The goodput estimate is also stale while it has fewer samples than this.
    pub min_goodput_samples: u64,
    /// A decision depends on the goodput estimate while the planner read it within this
    /// long.
    pub demand_window: Duration,
}

impl Default for ProbeBudget {
    fn default() -> Self {
        Self {
            bytes_per_s: 1000.0,
            burst_bytes: 96.0 * 1024.0,
            goodput_refresh: Duration::from_secs(15),
            min_goodput_samples: 3,
            demand_window: Duration::from_secs(5),
        }
    }
}

impl ProbeBudget {
    /// Check the values; the error text names the field.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if !(self.bytes_per_s.is_finite() && self.bytes_per_s >= 0.0) {
            return Err("bytes_per_s (--probe-budget) must be a finite number ≥ 0".into());
        }
        if !(self.burst_bytes.is_finite() && self.burst_bytes >= 0.0) {
            return Err("burst_bytes must be a finite number ≥ 0".into());
        }
        if self.goodput_refresh.is_zero() {
            return Err("goodput_refresh must be positive".into());
        }
        Ok(())
    }
}

/// Estimated bytes on the wire of one probe exchange: a message with `payload` bytes up
/// and its reply with `reply` bytes down, in full packets, and an ACK each way per two
/// packets (at least one).
pub fn exchange_cost(payload: u32, reply: u32) -> u64 {
    let one_way = |bytes: u32| {
        let b = u64::from(bytes) + MESSAGE_OVERHEAD;
        let packets = b.div_ceil(PACKET_PAYLOAD).max(1);
        b + packets * PACKET_OVERHEAD + packets.div_ceil(2) * ACK_PACKET
    };
    one_way(payload) + one_way(reply)
}

/// Least bytes of a request's upstream message that make a goodput sample (smaller ones
/// are mostly fixed costs).
pub const TRANSFER_SAMPLE_MIN: u64 = 8192;

/// The goodput sample (bits per second) a request exchange gives: `bytes` sent, the reply
/// `elapsed` after the send began, on a link with RTT `rtt_ms` whose goodput is estimated
/// at `estimate_bps`. `bytes · 8 / (elapsed − RTT)` is a lower bound of the goodput (the
/// parent's compute counts as transfer time), so it is a sample only when it is at least
/// the estimate; `None` for small transfers, a reply faster than the RTT, or a bound below
/// the estimate (which says nothing about it).
pub fn transfer_goodput(
    bytes: u64,
    elapsed: Duration,
    rtt_ms: f64,
    estimate_bps: f64,
) -> Option<f64> {
    if bytes < TRANSFER_SAMPLE_MIN {
        return None;
    }
    let secs = elapsed.as_secs_f64() - rtt_ms.max(0.0) / 1e3;
    if secs.is_nan() || secs <= 0.0 {
        return None;
    }
    let g = bytes as f64 * 8.0 / secs;
    (g.is_finite() && g >= estimate_bps).then_some(g)
}

/// A token bucket in bytes: refilled at `rate` bytes per second up to `capacity`, on the
/// caller's clock (a [`Duration`] since any fixed origin). Starts full.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    capacity: f64,
    /// May be negative: a forced charge ([`TokenBucket::charge`]) runs into debt that later
    /// refills pay back before anything optional goes.
    tokens: f64,
    at: Duration,
}

impl TokenBucket {
    /// A full bucket at `now`.
    pub fn new(rate: f64, capacity: f64, now: Duration) -> Self {
        let rate = if rate.is_finite() { rate.max(0.0) } else { 0.0 };
        let capacity = if capacity.is_finite() {
            capacity.max(0.0)
        } else {
            0.0
        };
        Self {
            rate,
            capacity,
            tokens: capacity,
            at: now,
        }
    }

    fn refill(&mut self, now: Duration) {
        if now > self.at {
            let dt = (now - self.at).as_secs_f64();
            self.tokens = (self.tokens + dt * self.rate).min(self.capacity);
            self.at = now;
        }
    }

    /// Tokens (bytes) available at `now` (negative while in debt).
    pub fn available(&mut self, now: Duration) -> f64 {
        self.refill(now);
        self.tokens
    }

    /// Take `bytes` if the bucket holds them; otherwise take nothing.
    pub fn try_take(&mut self, bytes: f64, now: Duration) -> bool {
        self.refill(now);
        if bytes <= self.tokens {
            self.tokens -= bytes;
            true
        } else {
            false
        }
    }

    /// Take `bytes` whatever the bucket holds (what must go anyway).
    pub fn charge(&mut self, bytes: f64, now: Duration) {
        self.refill(now);
        self.tokens -= bytes;
    }
}

/// What the goodput estimate looks like to the prober at a round.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GoodputView {
    /// Age of the newest goodput sample; `None` without one.
    pub age: Option<Duration>,
    /// Goodput samples so far.
    pub samples: u64,
    /// Whether a decision read the estimate within the demand window.
    pub wanted: bool,
}

/// What one probe round sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Round {
    /// Payload bytes of the big goodput probe, if one goes this round.
    pub big: Option<u32>,
}

/// Decides, round by round, whether the big probe goes, and charges the bucket.
#[derive(Debug, Clone)]
pub struct Prober {
    budget: ProbeBudget,
    bucket: TokenBucket,
    /// Bytes charged so far (what the link carried).
    charged: u64,
    /// Goodput probes sent.
    big_probes: u64,
}

impl Prober {
    /// A prober with a full bucket at `now`.
    pub fn new(budget: ProbeBudget, now: Duration) -> Self {
        Self {
            bucket: TokenBucket::new(budget.bytes_per_s, budget.burst_bytes, now),
            budget,
            charged: 0,
            big_probes: 0,
        }
    }

    /// Whether the goodput estimate needs a sample: wanted by a decision and stale.
    pub fn goodput_stale(&self, g: &GoodputView) -> bool {
        g.wanted
            && (g.samples < self.budget.min_goodput_samples
                || g.age.is_none_or(|a| a >= self.budget.goodput_refresh))
    }

    /// Plan the round at `now`, after the link carried `carried` bytes since the last
    /// round (charged whatever the bucket holds). The big probe (`want_big` bytes, shrunk
    /// to what the bucket could ever hold, never below `min_big`; replies are `reply`
    /// bytes) goes when the estimate is stale and its estimated cost is in the bucket; its
    /// real bytes are charged with the next round's `carried`.
    pub fn round(
        &mut self,
        now: Duration,
        carried: u64,
        want_big: u32,
        min_big: u32,
        reply: u32,
        g: &GoodputView,
    ) -> Round {
        self.bucket.charge(carried as f64, now);
        self.charged += carried;
        if !self.goodput_stale(g) {
            return Round { big: None };
        }
        let mut big = want_big.max(min_big);
        while big > min_big && exchange_cost(big, reply) as f64 > self.budget.burst_bytes {
            big = (big / 2).max(min_big);
        }
        if self.bucket.available(now) >= exchange_cost(big, reply) as f64 {
            self.big_probes += 1;
            Round { big: Some(big) }
        } else {
            Round { big: None }
        }
    }

    /// Bytes charged so far (what the link carried, as reported to [`Prober::round`]).
    pub fn charged(&self) -> u64 {
        self.charged
    }

    /// Goodput probes sent so far.
    pub fn big_probes(&self) -> u64 {
        self.big_probes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn bucket_refills_at_its_rate_up_to_its_capacity() {
        let mut b = TokenBucket::new(100.0, 500.0, S(0));
        assert!(b.try_take(500.0, S(0)));
        assert!(!b.try_take(1.0, S(0)), "empty");
        assert!(!b.try_take(150.0, S(1)), "100 bytes after 1 s");
        assert!(b.try_take(150.0, Duration::from_millis(1500)));
        // A long pause fills it to capacity, not beyond.
        assert_eq!(b.available(S(3600)), 500.0);
        // Time going backwards refills nothing.
        assert!(b.try_take(500.0, S(3600)));
        assert_eq!(b.available(S(10)), 0.0);
    }

    #[test]
    fn forced_charges_run_into_debt_that_is_paid_back_first() {
        let mut b = TokenBucket::new(100.0, 200.0, S(0));
        b.charge(400.0, S(0));
        assert_eq!(b.available(S(0)), -200.0);
        assert!(!b.try_take(1.0, S(2)), "debt paid back, nothing left");
        assert!(b.try_take(100.0, S(3)));
    }

    #[test]
    fn bad_rates_give_an_empty_bucket() {
        let mut b = TokenBucket::new(f64::NAN, f64::INFINITY, S(0));
        assert!(!b.try_take(1.0, S(100)));
        assert!(b.try_take(0.0, S(100)));
    }

    #[test]
    fn exchange_cost_counts_packets_and_acks() {
        // One small packet each way, one ACK each way.
        assert_eq!(exchange_cost(16, 16), 2 * (16 + 48 + 60 + 50));
        // 64 KiB up: 55 packets and 28 ACKs.
        let up = 65536 + 48 + 55 * 60 + 28 * 50;
        assert_eq!(exchange_cost(65536, 16), up + 16 + 48 + 60 + 50);
    }

    #[test]
    fn request_transfers_give_goodput_lower_bounds_above_the_estimate() {
        let ms = Duration::from_millis;
        // 64 KB in 100 ms on a 20 ms RTT link: ≥ 6.4 Mbit/s; fed when above the estimate.
        let g = transfer_goodput(64_000, ms(100), 20.0, 1e6).unwrap();
        assert!((g - 6.4e6).abs() < 1.0, "{g}");
        assert_eq!(
            transfer_goodput(64_000, ms(100), 20.0, 10e6),
            None,
            "below the estimate"
        );
        assert_eq!(
            transfer_goodput(4_000, ms(100), 20.0, 1.0),
            None,
            "too small"
        );
        assert_eq!(
            transfer_goodput(64_000, ms(10), 20.0, 1.0),
            None,
            "faster than the RTT"
        );
        // An RTT that is not a number counts as 0: the bound is only looser.
        assert_eq!(
            transfer_goodput(64_000, ms(100), f64::NAN, 1.0),
            Some(5.12e6)
        );
    }

    fn view(age_s: Option<u64>, samples: u64, wanted: bool) -> GoodputView {
        GoodputView {
            age: age_s.map(S),
            samples,
            wanted,
        }
    }

    #[test]
    fn big_probes_go_only_when_wanted_and_stale() {
        let p = Prober::new(ProbeBudget::default(), S(0));
        assert!(!p.goodput_stale(&view(None, 0, false)), "not wanted");
        assert!(p.goodput_stale(&view(None, 0, true)), "no sample");
        assert!(p.goodput_stale(&view(Some(0), 2, true)), "too few samples");
        assert!(!p.goodput_stale(&view(Some(1), 3, true)), "fresh");
        assert!(p.goodput_stale(&view(Some(15), 3, true)), "old");
    }

    #[test]
    fn big_probes_are_capped_to_what_the_bucket_can_hold() {
        let budget = ProbeBudget {
            burst_bytes: 20_000.0,
            ..ProbeBudget::default()
        };
        let mut p = Prober::new(budget, S(0));
        let r = p.round(S(0), 0, 65536, 8192, 16, &view(None, 0, true));
        assert_eq!(r.big, Some(16384));
        let tiny = ProbeBudget {
            burst_bytes: 10.0,
            ..ProbeBudget::default()
        };
        let mut p = Prober::new(tiny, S(0));
        let r = p.round(S(0), 0, 65536, 8192, 16, &view(None, 0, true));
        assert_eq!(r.big, None, "the floor does not fit: no big probe");
    }

    /// What an idle link carries per one-second round besides goodput probes: the liveness
    /// exchange and a keep-alive PING and its ACK (as measured on loopback: ~0.4 KB/s).
    const IDLE_ROUND: u64 = 420;

    /// Simulated hour of one-second rounds on an idle link whose estimate a planner keeps
    /// reading, each round charged with what the link carried (the idle traffic, and the
    /// previous round's goodput probe at its estimated cost): the bytes stay within
    /// `rate · T + burst + one probe` (or the idle traffic's own cost when that is more),
    /// and goodput samples still come.
    #[test]
    fn an_idle_link_stays_under_its_budget() {
        for (rate, want_big) in [(1000.0, 65536), (1000.0, 8192), (300.0, 65536), (0.0, 8192)] {
            let budget = ProbeBudget {
                bytes_per_s: rate,
                ..ProbeBudget::default()
            };
            let mut p = Prober::new(budget, S(0));
            let (mut last, mut samples, mut carried) = (None::<Duration>, 0u64, 0u64);
            let hour = 3600;
            for t in 0..hour {
                let now = S(t);
                let g = GoodputView {
                    age: last.map(|l| now - l),
                    samples,
                    wanted: true,
                };
                carried += IDLE_ROUND;
                let big = p.round(now, carried, want_big, 8192, 16, &g).big;
                carried = 0;
                if let Some(b) = big {
                    carried = exchange_cost(b, 16);
                    last = Some(now);
                    samples += 1;
                }
            }
            let probe = exchange_cost(want_big, 16) as f64;
            let idle = (IDLE_ROUND * hour) as f64;
            let cap = (rate * hour as f64).max(idle) + budget.burst_bytes + probe;
            assert!(
                p.charged() as f64 <= cap,
                "rate {rate}: {} bytes over an hour, cap {cap}",
                p.charged()
            );
            assert_eq!(p.big_probes(), samples);
            if rate >= 1000.0 {
                assert!(samples >= 10, "rate {rate}: goodput samples {samples}");
            }
            if rate < IDLE_ROUND as f64 {
                // Only what the initial burst pays for.
                assert!(samples <= 12, "rate {rate}: {samples}");
            }
        }
    }

    #[test]
    fn an_idle_link_nobody_plans_on_sends_only_liveness_probes() {
        let mut p = Prober::new(ProbeBudget::default(), S(0));
        for t in 0..3600 {
            let g = view(None, 0, false);
            assert_eq!(p.round(S(t), IDLE_ROUND, 65536, 8192, 16, &g).big, None);
        }
        assert_eq!(p.big_probes(), 0);
        assert_eq!(p.charged(), IDLE_ROUND * 3600);
    }
}
