//! Adaptive draft length for speculation: how many tokens the entry node drafts per round.
//!
//! A round of `k` drafts costs `k` draft steps plus one round trip (link + the verifier's
//! batched pass), and yields the accepted prefix plus the verifier's own token: with
//! per-draft acceptance `α`, `E[tokens] = (1 − α^(k+1)) / (1 − α)`. The controller keeps
//! running estimates of `α` (accepted drafts vs. rejections, exponentially forgotten), of
//! the draft step time and of the round trip, and drafts the `k ≤ cap` that maximises
//! tokens per second. So drafts grow while they are accepted, shrink when they are
//! rejected, and grow again on a slow link, where each round trip must carry more tokens
//! to pay (the reason speculation still pays at WAN round trips).

/// Forgetting factor of the acceptance counts and the time averages (per round).
const KEEP: f64 = 0.8;

/// The draft length controller of one session.
#[derive(Debug, Clone)]
pub(crate) struct DraftLen {
    cap: usize,
    current: usize,
    /// Forgotten sums of accepted drafts and of rejections.
    accepted: f64,
    rejected: f64,
    /// Seconds per draft step and per round trip (0 until measured).
    step_s: f64,
    round_s: f64,
}

impl DraftLen {
    /// Start at `cap` (the policy's `draft_len`), the most a round may draft.
    pub(crate) fn new(cap: usize) -> Self {
        let cap = cap.max(1);
        Self {
            cap,
            current: cap,
            accepted: 0.0,
            rejected: 0.0,
            step_s: 0.0,
            round_s: 0.0,
        }
    }

    /// Drafts for the next round.
    pub(crate) fn get(&self) -> usize {
        self.current
    }

    /// Estimated per-draft acceptance (Laplace-smoothed).
    pub(crate) fn acceptance(&self) -> f64 {
        (self.accepted + 1.0) / (self.accepted + self.rejected + 2.0)
    }

    /// A round drafted `drafted` tokens in `draft_s` seconds (all steps, pending rows
    /// included), the verifier accepted `accepted` of them, and the verdict came
    /// `round_s` seconds after the draft was sent.
    pub(crate) fn observe(&mut self, drafted: usize, accepted: usize, draft_s: f64, round_s: f64) {
        if drafted == 0 {
            return;
        }
        let accepted = accepted.min(drafted);
        self.accepted = KEEP * self.accepted + accepted as f64;
        self.rejected = KEEP * self.rejected + f64::from(u8::from(accepted < drafted));
        let per_step = draft_s.max(0.0) / drafted as f64;
        let avg = |old: f64, new: f64| {
            if old == 0.0 {
                new
            } else {
                KEEP * old + (1.0 - KEEP) * new
            }
        };
        self.step_s = avg(self.step_s, per_step);
        self.round_s = avg(self.round_s, round_s.max(0.0));
        self.current = self.best();
    }

    /// The `k` in `1..=cap` with the most expected tokens per second.
    fn best(&self) -> usize {
        let a = self.acceptance().min(0.999);
        let mut best = (1, f64::MIN);
        for k in 1..=self.cap {
            let tokens = (1.0 - a.powi(k as i32 + 1)) / (1.0 - a);
            let secs = k as f64 * self.step_s + self.round_s;
            let rate = tokens / secs.max(1e-9);
            if rate > best.1 * (1.0 + 1e-9) {
                best = (k, rate);
            }
        }
        best.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(d: &mut DraftLen, rounds: usize, accept_all: bool, step_s: f64, rtt_s: f64) {
        for _ in 0..rounds {
            let k = d.get();
            let a = if accept_all { k } else { 0 };
            d.observe(k, a, k as f64 * step_s, rtt_s);
        }
    }

    #[test]
    fn grows_on_acceptance_and_shrinks_on_rejection() {
        let mut d = DraftLen::new(8);
        run(&mut d, 10, false, 0.005, 0.02);
        assert_eq!(d.get(), 1, "every draft rejected: draft one");
        run(&mut d, 20, true, 0.005, 0.02);
        assert_eq!(d.get(), 8, "every draft accepted: draft the cap");
        assert!(d.acceptance() > 0.9);
    }

    #[test]
    fn a_slow_link_wants_longer_drafts() {
        // The same 70% acceptance, drafted at 10 ms a step: a 2 ms round trip favours short
        // rounds, a 200 ms one long ones.
        let mixed = |rtt: f64| {
            let mut d = DraftLen::new(16);
            for i in 0..200 {
                let k = d.get();
                // Accept a prefix: 7 of every 10 drafts on average.
                let a = (0..k).take_while(|j| (i * 7 + j * 3) % 10 < 7).count();
                d.observe(k, a, k as f64 * 0.010, rtt);
            }
            d.get()
        };
        let (lan, wan) = (mixed(0.002), mixed(0.2));
        assert!(lan < wan, "lan {lan} wan {wan}");
        assert!(lan <= 3, "lan {lan}");
    }

    #[test]
    fn stays_within_one_and_the_cap() {
        let mut d = DraftLen::new(0);
        assert_eq!(d.get(), 1);
        d.observe(5, 9, 0.0, 0.0);
        assert!((1..=1).contains(&d.get()));
        let mut d = DraftLen::new(4);
        d.observe(0, 0, 1.0, 1.0);
        assert_eq!(d.get(), 4);
    }
}
