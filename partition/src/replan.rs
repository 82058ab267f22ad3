//! Re-planning with hysteresis: a pure state machine driven by the agent.
//!
//! The agent calls [`Replanner::on_estimates`] whenever it has fresh link estimates (with
//! its own clock's `now_ms`) and [`Replanner::on_membership_change`] when a node joins or
//! leaves. The machine answers [`Decision::Keep`] or [`Decision::Replan`]; applying a new
//! plan (moving layers between requests, never inside a live session) is the agent's job.
//!
//! Rules:
//! - A link is *out of band* when its goodput or its RTT differs from the reference (the
//!   estimates at the last check) by more than `band` (relative; RTTs below
//!   `rtt_floor_ms` count as `rtt_floor_ms`, so a 1 → 2 ms jitter is not a 100% move).
//! - Only when some link has stayed out of band, in the same direction, for at least
//!   `hold_ms` is a new plan
//!   computed; it replaces the current one only if its score beats the current plan's,
//!   re-predicted under the new estimates, by more than
//!   `max(min_gain_ms, min_gain_fraction · current)` — or if the current plan has become
//!   infeasible (over memory, saturated link, below target). Either way the reference
//!   becomes the new estimates, so the next check needs a new sustained move.
//! - A membership change re-plans immediately.
//!
//! An oscillation faster than `hold_ms` therefore never re-plans (whether it crosses the
//! reference or swings around it), a sustained change re-plans once, and whatever the
//! input there is at most one re-plan per `hold_ms` per link.

use serde::{Deserialize, Serialize};

use crate::error::{check_non_negative, check_positive, Result};
use crate::link::LinkEstimate;
use crate::planner::{plan, reevaluate, Plan, PlanInput};

/// Hysteresis settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ReplanConfig {
    /// Relative band, e.g. 0.3 for ±30%.
    pub band: f64,
    /// How long a link must stay out of band before a re-plan is considered (ms).
    pub hold_ms: u64,
    /// Absolute improvement required (ms of score).
    pub min_gain_ms: f64,
    /// Relative improvement required (fraction of the current score).
    pub min_gain_fraction: f64,
    /// RTTs below this count as this when computing relative moves (ms).
    pub rtt_floor_ms: f64,
}

impl Default for ReplanConfig {
    fn default() -> Self {
        Self {
            band: 0.3,
            hold_ms: 5_000,
            min_gain_ms: 1.0,
            min_gain_fraction: 0.05,
            rtt_floor_ms: 5.0,
        }
    }
}

impl ReplanConfig {
    fn validate(&self) -> Result<()> {
        check_positive("replan.band", self.band)?;
        check_non_negative("replan.min_gain_ms", self.min_gain_ms)?;
        check_non_negative("replan.min_gain_fraction", self.min_gain_fraction)?;
        check_non_negative("replan.rtt_floor_ms", self.rtt_floor_ms)?;
        Ok(())
    }
}

/// What to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Keep the current plan.
    Keep,
    /// Switch to this plan (now the machine's current plan).
    Replan(Box<Plan>),
}

/// The re-planning state machine.
#[derive(Debug, Clone)]
pub struct Replanner {
    config: ReplanConfig,
    current: Plan,
    reference: Vec<LinkEstimate>,
    out_of_band_since: Vec<Option<(u64, (i8, i8))>>,
    replans: u64,
}

impl Replanner {
    /// Plans `input` and starts from that plan.
    pub fn new(config: ReplanConfig, input: &PlanInput) -> Result<Self> {
        config.validate()?;
        let current = plan(input)?;
        Ok(Self::with_plan_unchecked(
            config,
            current,
            input.links.clone(),
        ))
    }

    /// Starts from an existing plan made with the given link estimates.
    pub fn with_plan(
        config: ReplanConfig,
        current: Plan,
        links: Vec<LinkEstimate>,
    ) -> Result<Self> {
        config.validate()?;
        for (j, l) in links.iter().enumerate() {
            l.validate(&format!("links[{j}]"))?;
        }
        Ok(Self::with_plan_unchecked(config, current, links))
    }

    fn with_plan_unchecked(config: ReplanConfig, current: Plan, links: Vec<LinkEstimate>) -> Self {
        let n = links.len();
        Self {
            config,
            current,
            reference: links,
            out_of_band_since: vec![None; n],
            replans: 0,
        }
    }

    /// The plan in force.
    pub fn current(&self) -> &Plan {
        &self.current
    }

    /// How many times the machine has answered `Replan`.
    pub fn replans(&self) -> u64 {
        self.replans
    }

    /// `(goodput, rtt)` direction of an out-of-band move (−1, 0 or +1 each), or `None`
    /// when both are inside the band.
    fn moved(&self, old: &LinkEstimate, new: &LinkEstimate) -> Option<(i8, i8)> {
        let band = self.config.band;
        let dir = |a: f64, b: f64| {
            let r = (b - a) / a;
            if r > band {
                1
            } else if r < -band {
                -1
            } else {
                0
            }
        };
        let floor = self.config.rtt_floor_ms;
        let m = (
            dir(old.goodput_bps, new.goodput_bps),
            dir(old.rtt_ms.max(floor), new.rtt_ms.max(floor)),
        );
        (m != (0, 0)).then_some(m)
    }

    /// Fresh estimates in `input.links` at `now_ms` (the rest of `input` as for
    /// planning). Errors: invalid input, or a tier count different from the current
    /// plan's (that is a membership change).
    pub fn on_estimates(&mut self, now_ms: u64, input: &PlanInput) -> Result<Decision> {
        input.validate()?;
        if input.links.len() != self.reference.len() {
            return Err(crate::Error::InvalidInput {
                field: "links".into(),
                reason: format!(
                    "{} links, the current plan has {}: report a membership change instead",
                    input.links.len(),
                    self.reference.len()
                ),
            });
        }
        let mut due = false;
        for j in 0..self.reference.len() {
            match self.moved(&self.reference[j], &input.links[j]) {
                Some(direction) => {
                    let slot = &mut self.out_of_band_since[j];
                    // A move in another direction restarts the hold.
                    if slot.is_none_or(|(_, d)| d != direction) {
                        *slot = Some((now_ms, direction));
                    }
                    let since = slot.map_or(now_ms, |(t, _)| t);
                    if now_ms.saturating_sub(since) >= self.config.hold_ms {
                        due = true;
                    }
                }
                None => self.out_of_band_since[j] = None,
            }
        }
        if !due {
            return Ok(Decision::Keep);
        }
        self.reference = input.links.clone();
        self.out_of_band_since.iter_mut().for_each(|s| *s = None);
        let candidate = match plan(input) {
            Ok(p) => p,
            // Nothing feasible: keep what runs; the degradation policy handles misses.
            Err(_) => return Ok(Decision::Keep),
        };
        // The current plan re-predicted; one that no longer fits the input (an encoding
        // no longer allowed, say) counts as infeasible.
        let switch = match reevaluate(input, &self.current) {
            Ok((now_current, verdict)) => {
                let gain = now_current.score - candidate.score;
                let needed = self
                    .config
                    .min_gain_ms
                    .max(self.config.min_gain_fraction * now_current.score);
                verdict.is_some() || gain > needed
            }
            Err(_) => true,
        };
        if switch {
            self.current = candidate.clone();
            self.replans += 1;
            Ok(Decision::Replan(Box::new(candidate)))
        } else {
            Ok(Decision::Keep)
        }
    }

    /// A node joined or left: `input` describes the new tiers and links. Re-plans at once;
    /// answers `Keep` only when the new plan equals the current one.
    pub fn on_membership_change(&mut self, input: &PlanInput) -> Result<Decision> {
        let candidate = plan(input)?;
        self.reference = input.links.clone();
        self.out_of_band_since = vec![None; input.links.len()];
        if candidate == self.current {
            return Ok(Decision::Keep);
        }
        self.current = candidate.clone();
        self.replans += 1;
        Ok(Decision::Replan(Box::new(candidate)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::planner::tests::input;

    fn with_goodput(bps: f64) -> PlanInput {
        input(bps, 2.0)
    }

    #[test]
    fn fast_oscillation_never_replans() {
        let mut r = Replanner::new(ReplanConfig::default(), &with_goodput(10e6)).unwrap();
        // 10 <-> 1 Mbit/s every second for ten minutes, sampled every 250 ms.
        for step in 0..2400u64 {
            let now = step * 250;
            let bps = if (now / 1000) % 2 == 0 { 10e6 } else { 1e6 };
            assert_eq!(
                r.on_estimates(now, &with_goodput(bps)).unwrap(),
                Decision::Keep
            );
        }
        assert_eq!(r.replans(), 0);
    }

    #[test]
    fn fast_oscillation_around_the_reference_never_replans() {
        let mut r = Replanner::new(ReplanConfig::default(), &with_goodput(3e6)).unwrap();
        // Both extremes are out of band, in opposite directions.
        for step in 0..2400u64 {
            let now = step * 250;
            let bps = if (now / 1000) % 2 == 0 { 10e6 } else { 1e6 };
            r.on_estimates(now, &with_goodput(bps)).unwrap();
        }
        assert_eq!(r.replans(), 0);
    }

    #[test]
    fn slow_oscillation_replans_a_bounded_number_of_times() {
        let mut r = Replanner::new(ReplanConfig::default(), &with_goodput(10e6)).unwrap();
        // Switches every 20 s (longer than the hold) for 10 minutes: 30 switches.
        for step in 0..2400u64 {
            let now = step * 250;
            let bps = if (now / 20_000) % 2 == 0 { 10e6 } else { 1e6 };
            r.on_estimates(now, &with_goodput(bps)).unwrap();
        }
        assert!(r.replans() <= 30, "{}", r.replans());
        assert!(r.replans() >= 1);
    }

    #[test]
    fn sustained_change_replans_exactly_once() {
        let cfg = ReplanConfig::default();
        let mut r = Replanner::new(cfg, &with_goodput(10e6)).unwrap();
        let before = r.current().clone();
        let mut decisions = Vec::new();
        for step in 0..400u64 {
            let now = step * 250;
            let bps = if now < 10_000 { 10e6 } else { 1e6 };
            if let Decision::Replan(p) = r.on_estimates(now, &with_goodput(bps)).unwrap() {
                decisions.push((now, p));
            }
        }
        assert_eq!(
            decisions.len(),
            1,
            "{:?}",
            decisions.iter().map(|d| d.0).collect::<Vec<_>>()
        );
        let (at, p) = &decisions[0];
        assert!(*at >= 10_000 + cfg.hold_ms && *at < 10_000 + cfg.hold_ms + 500);
        assert_ne!(p.placement(), before.placement());
        assert_eq!(r.current(), p.as_ref());
    }

    #[test]
    fn small_moves_and_unprofitable_plans_keep() {
        let mut r = Replanner::new(ReplanConfig::default(), &with_goodput(10e6)).unwrap();
        for step in 0..100u64 {
            // ±20%: inside the band.
            let bps = if step % 2 == 0 { 8e6 } else { 12e6 };
            assert_eq!(
                r.on_estimates(step * 1000, &with_goodput(bps)).unwrap(),
                Decision::Keep
            );
        }
        // Out of band but the same plan stays best (fast links: split unchanged).
        let mut r = Replanner::new(ReplanConfig::default(), &with_goodput(500e6)).unwrap();
        for step in 0..100u64 {
            assert_eq!(
                r.on_estimates(step * 1000, &with_goodput(1e9)).unwrap(),
                Decision::Keep
            );
        }
        assert_eq!(r.replans(), 0);
    }

    #[test]
    fn membership_change_replans_immediately() {
        let mut r = Replanner::new(ReplanConfig::default(), &with_goodput(10e6)).unwrap();
        let full = with_goodput(10e6);
        // The edge leaves: device talks to the cloud directly.
        let mut no_edge = full.clone();
        no_edge.tiers.remove(1);
        no_edge.links = vec![LinkEstimate::fixed(60.0, 10e6)];
        match r.on_membership_change(&no_edge).unwrap() {
            Decision::Replan(p) => assert_eq!(p.tiers.len(), 2),
            Decision::Keep => panic!("expected a replan"),
        }
        // Estimates for the old shape are refused, not misread.
        assert!(r.on_estimates(0, &full).is_err());
        assert_eq!(r.on_membership_change(&no_edge).unwrap(), Decision::Keep);
    }
}
