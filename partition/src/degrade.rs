//! Graceful degradation: escalate, or answer from the best local exit (marked
//! `degraded`), or fail loudly; and which parent to fail over to.
//!
//! Pure decisions; the agent supplies the clock (`now_ms`), the request's deadline, the
//! parent's reachability and a predicted escalation time (from
//! [`crate::planner::Plan::expected_escalation_ms`] and the link estimate's spread).

use serde::{Deserialize, Serialize};

use crate::error::{check_non_negative, Error, Result};

/// Safety settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DegradePolicy {
    /// Multiplier on the predicted escalation time (>= 1 in practice).
    pub safety_factor: f64,
    /// Standard deviations of the prediction added on top.
    pub std_multiplier: f64,
}

impl Default for DegradePolicy {
    fn default() -> Self {
        Self {
            safety_factor: 1.2,
            std_multiplier: 2.0,
        }
    }
}

/// What the node knows when a token is not confident enough to answer locally.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EscalationContext {
    /// Caller's clock (ms).
    pub now_ms: u64,
    /// When the token must be answered, if the request has a deadline (ms).
    pub deadline_ms: Option<u64>,
    /// Predicted time until the parent's answer is back (ms).
    pub predicted_parent_ms: f64,
    /// Spread of that prediction (ms).
    pub predicted_parent_std_ms: f64,
    /// Whether the parent is currently reachable.
    pub parent_reachable: bool,
    /// Whether this node hosts an exit it can answer from.
    pub has_local_exit: bool,
}

/// Why a token is not escalated.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DegradeReason {
    /// The parent is unreachable.
    ParentUnreachable,
    /// The parent's answer would likely arrive after the deadline.
    DeadlineTooClose {
        /// Padded prediction (ms).
        predicted_ms: f64,
        /// Time left (ms).
        remaining_ms: f64,
    },
}

/// The decision for one token.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DegradeDecision {
    /// Send it to the parent.
    Escalate,
    /// Answer from the best local exit and mark the token `degraded`.
    AnswerLocally {
        /// Why.
        reason: DegradeReason,
    },
    /// Cannot answer here and cannot escalate: report an error to the client (never drop
    /// the request silently), or fail over with [`choose_parent`].
    Fail {
        /// Why.
        reason: DegradeReason,
    },
}

/// Decides for one token. A deadline that would be missed with no local exit still
/// escalates (a late answer beats none). Errors on NaN or negative predictions.
pub fn decide(policy: &DegradePolicy, ctx: &EscalationContext) -> Result<DegradeDecision> {
    check_non_negative("safety_factor", policy.safety_factor)?;
    check_non_negative("std_multiplier", policy.std_multiplier)?;
    check_non_negative("predicted_parent_ms", ctx.predicted_parent_ms)?;
    check_non_negative("predicted_parent_std_ms", ctx.predicted_parent_std_ms)?;
    if !ctx.parent_reachable {
        let reason = DegradeReason::ParentUnreachable;
        return Ok(if ctx.has_local_exit {
            DegradeDecision::AnswerLocally { reason }
        } else {
            DegradeDecision::Fail { reason }
        });
    }
    if let Some(deadline) = ctx.deadline_ms {
        let remaining_ms = deadline.saturating_sub(ctx.now_ms) as f64;
        let predicted_ms = ctx.predicted_parent_ms * policy.safety_factor
            + policy.std_multiplier * ctx.predicted_parent_std_ms;
        if predicted_ms > remaining_ms && ctx.has_local_exit {
            return Ok(DegradeDecision::AnswerLocally {
                reason: DegradeReason::DeadlineTooClose {
                    predicted_ms,
                    remaining_ms,
                },
            });
        }
    }
    Ok(DegradeDecision::Escalate)
}

/// A parent the node could use.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ParentOption {
    /// The agent's name for it.
    pub id: String,
    /// Whether it currently answers.
    pub reachable: bool,
    /// Predicted escalation time through it (ms).
    pub predicted_ms: f64,
}

/// Fail-over: the reachable parent with the lowest prediction (ties: the earlier in the
/// list), or `None` when none is reachable. Errors on a NaN or negative prediction.
pub fn choose_parent(options: &[ParentOption]) -> Result<Option<&ParentOption>> {
    let mut best: Option<&ParentOption> = None;
    for (i, o) in options.iter().enumerate() {
        check_non_negative(format!("options[{i}].predicted_ms"), o.predicted_ms)?;
        if o.reachable && best.is_none_or(|b| o.predicted_ms < b.predicted_ms) {
            best = Some(o);
        }
    }
    Ok(best)
}

impl crate::planner::Plan {
    /// Expected time from tier `from` escalating a token until the answer is back, given
    /// that it escalates: the expected time of every tier and link above `from`, divided
    /// by the probability of reaching tier `from + 1`. When that probability is 0 (the plan
    /// never escalates), the worst case: every link's RTT and row transfer plus every
    /// upper tier's decode. Errors when `from` is the top tier or out of range.
    pub fn expected_escalation_ms(&self, from: usize) -> Result<f64> {
        let top = self
            .tiers
            .iter()
            .position(|t| t.answers_with.is_some())
            .unwrap_or(0);
        if self.links.len() + 1 != self.tiers.len() {
            return Err(Error::InvalidInput {
                field: "plan.links".into(),
                reason: format!(
                    "{} tiers need {} links, got {}",
                    self.tiers.len(),
                    self.tiers.len().saturating_sub(1),
                    self.links.len()
                ),
            });
        }
        if from >= top {
            return Err(Error::InvalidInput {
                field: "from".into(),
                reason: format!("tier {from} has no parent in this plan (top tier is {top})"),
            });
        }
        let reach = self.tiers[from + 1].reach;
        if reach > 0.0 {
            let above: f64 = self.tiers[from + 1..=top]
                .iter()
                .map(|t| t.expected_ms)
                .chain(self.links[from..top].iter().map(|l| l.expected_ms))
                .sum();
            Ok(above / reach)
        } else {
            let links: f64 = self.links[from..top]
                .iter()
                .map(|l| l.rtt_ms + l.row_bytes * 8.0 / l.goodput_bps * 1000.0)
                .sum();
            let tiers: f64 = self.tiers[from + 1..=top].iter().map(|t| t.decode_ms).sum();
            Ok(links + tiers)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::planner::{plan, tests::input};

    fn ctx(now: u64, deadline: Option<u64>, reachable: bool, local: bool) -> EscalationContext {
        EscalationContext {
            now_ms: now,
            deadline_ms: deadline,
            predicted_parent_ms: 50.0,
            predicted_parent_std_ms: 5.0,
            parent_reachable: reachable,
            has_local_exit: local,
        }
    }

    #[test]
    fn decisions() {
        let p = DegradePolicy::default();
        assert_eq!(
            decide(&p, &ctx(0, None, true, true)).unwrap(),
            DegradeDecision::Escalate
        );
        // 50·1.2 + 2·5 = 70 ms needed.
        assert_eq!(
            decide(&p, &ctx(0, Some(71), true, true)).unwrap(),
            DegradeDecision::Escalate
        );
        assert!(matches!(
            decide(&p, &ctx(0, Some(69), true, true)).unwrap(),
            DegradeDecision::AnswerLocally {
                reason: DegradeReason::DeadlineTooClose { .. }
            }
        ));
        // Deadline already passed.
        assert!(matches!(
            decide(&p, &ctx(100, Some(50), true, true)).unwrap(),
            DegradeDecision::AnswerLocally { .. }
        ));
        // No local exit: late beats nothing; unreachable fails loudly.
        assert_eq!(
            decide(&p, &ctx(0, Some(10), true, false)).unwrap(),
            DegradeDecision::Escalate
        );
        assert_eq!(
            decide(&p, &ctx(0, None, false, true)).unwrap(),
            DegradeDecision::AnswerLocally {
                reason: DegradeReason::ParentUnreachable
            }
        );
        assert_eq!(
            decide(&p, &ctx(0, None, false, false)).unwrap(),
            DegradeDecision::Fail {
                reason: DegradeReason::ParentUnreachable
            }
        );
        let mut bad = ctx(0, None, true, true);
        bad.predicted_parent_ms = f64::NAN;
        assert!(decide(&p, &bad).is_err());
    }

    #[test]
    fn failover_picks_the_fastest_reachable_parent() {
        let o = |id: &str, reachable, predicted_ms| ParentOption {
            id: id.into(),
            reachable,
            predicted_ms,
        };
        let opts = [
            o("edge-a", false, 5.0),
            o("edge-b", true, 30.0),
            o("edge-c", true, 20.0),
            o("edge-d", true, 20.0),
        ];
        assert_eq!(choose_parent(&opts).unwrap().unwrap().id, "edge-c");
        assert_eq!(choose_parent(&opts[..1]).unwrap(), None);
        assert!(choose_parent(&[o("x", true, -1.0)]).is_err());
    }

    #[test]
    fn escalation_time_from_a_plan() {
        let p = plan(&input(5e6, 2.0)).unwrap();
        let top = p
            .tiers
            .iter()
            .position(|t| t.answers_with.is_some())
            .unwrap();
        assert!(top >= 1, "{}", p.explain());
        let t = p.expected_escalation_ms(0).unwrap();
        // At least one RTT of the first link and the parent's decode.
        assert!(t >= p.links[0].rtt_ms + p.tiers[1].decode_ms - 1e-9, "{t}");
        assert!(p.expected_escalation_ms(top).is_err());
    }
}
