//! Greedy outputs of a faulted run against an undisturbed reference.
//!
//! With `temperature = 0` a request's answer is a function of its prompt, so a run whose
//! faults were survived losslessly (sessions moved to a fall-back parent with their hidden
//! states) answers every request exactly as a run with no faults does. `flow-node testbed
//! run --check-greedy` replays every answered request one at a time on the healed testbed
//! ([`crate::loadgen::run_sequential`]) and [`compare`]s the texts. A request answered
//! *degraded* (a shallower exit because no parent was reachable) may legitimately differ;
//! it is counted apart and does not fail the check.

use serde::{Deserialize, Serialize};

use crate::loadgen::{Outcome, RequestRecord};

/// At most this many ids are listed per kind of mismatch.
const MAX_IDS: usize = 20;

/// The comparison of a faulted run with its reference.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GreedyCheck {
    /// Requests answered in both runs, with a text in both.
    pub compared: usize,
    /// Of those, answered without degradation and equal to the reference.
    pub equal: usize,
    /// Answered without degradation but different from the reference: lost, repeated or
    /// altered tokens (first ids).
    pub differ: Vec<u64>,
    /// How many non-degraded answers differ (all of them, `differ` lists the first).
    pub differ_count: usize,
    /// Answered degraded in the faulted run.
    pub degraded: usize,
    /// Of those, different from the reference (expected, not a failure).
    pub degraded_differ: usize,
    /// Answered in the faulted run but not by the reference run (first ids).
    pub reference_failed: Vec<u64>,
    /// An answered record without a text (a load generator that does not keep texts).
    pub without_text: usize,
}

impl GreedyCheck {
    /// No non-degraded answer changed and the reference answered everything.
    pub fn passed(&self) -> bool {
        self.differ_count == 0 && self.reference_failed.is_empty() && self.without_text == 0
    }

    /// One line for a person.
    pub fn describe(&self) -> String {
        let mut s = format!(
            "greedy outputs vs an undisturbed reference: {} compared, {} equal, {} differ",
            self.compared, self.equal, self.differ_count
        );
        if !self.differ.is_empty() {
            s += &format!(" (ids {:?})", self.differ);
        }
        s += &format!(
            "; {} answered degraded ({} of them differ, allowed)",
            self.degraded, self.degraded_differ
        );
        if !self.reference_failed.is_empty() {
            s += &format!(
                "; the reference did not answer ids {:?}",
                self.reference_failed
            );
        }
        if self.without_text > 0 {
            s += &format!("; {} answers carry no text", self.without_text);
        }
        s
    }
}

/// Compare every request the faulted run answered with the reference's answer to it.
/// Records are matched by id; requests the faulted run did not answer are not compared
/// (the run's own check accounts for them).
pub fn compare(faulted: &[RequestRecord], reference: &[RequestRecord]) -> GreedyCheck {
    let mut c = GreedyCheck::default();
    for f in faulted.iter().filter(|r| r.outcome == Outcome::Answered) {
        let reference = reference
            .iter()
            .find(|r| r.id == f.id && r.outcome == Outcome::Answered);
        let Some(r) = reference else {
            if c.reference_failed.len() < MAX_IDS {
                c.reference_failed.push(f.id);
            }
            continue;
        };
        let (Some(got), Some(want)) = (&f.text, &r.text) else {
            c.without_text += 1;
            continue;
        };
        c.compared += 1;
        let same = got == want;
        if f.degraded {
            c.degraded += 1;
            c.degraded_differ += usize::from(!same);
        } else if same {
            c.equal += 1;
        } else {
            c.differ_count += 1;
            if c.differ.len() < MAX_IDS {
                c.differ.push(f.id);
            }
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: u64, outcome: Outcome, text: Option<&str>, degraded: bool) -> RequestRecord {
        RequestRecord {
            id,
            scheduled_ms: 0.0,
            sent_ms: Some(0.0),
            outcome,
            latency_ms: Some(1.0),
            ttft_ms: None,
            prompt_tokens: 4,
            tokens_out: 2,
            tier: None,
            escalated: false,
            degraded,
            text: text.map(str::to_string),
        }
    }

    #[test]
    fn equal_answers_pass_and_degraded_differences_are_allowed() {
        let ok = Outcome::Answered;
        let faulted = [
            rec(0, ok.clone(), Some("=1"), false),
            rec(1, ok.clone(), Some("=7"), true), // degraded, differs: allowed
            rec(2, Outcome::Error("timeout".into()), None, false), // not compared
            rec(3, ok.clone(), Some("=3"), true), // degraded, equal
        ];
        let reference = [
            rec(0, ok.clone(), Some("=1"), false),
            rec(1, ok.clone(), Some("=2"), false),
            rec(2, ok.clone(), Some("=9"), false),
            rec(3, ok, Some("=3"), false),
        ];
        let c = compare(&faulted, &reference);
        assert!(c.passed(), "{}", c.describe());
        assert_eq!(
            (c.compared, c.equal, c.degraded, c.degraded_differ),
            (3, 1, 2, 1)
        );
    }

    #[test]
    fn a_changed_undegraded_answer_or_a_missing_reference_fails() {
        let ok = Outcome::Answered;
        let faulted = [
            rec(0, ok.clone(), Some("=1=1"), false), // a repeated token
            rec(1, ok.clone(), Some("=2"), false),
            rec(2, ok.clone(), Some("=5"), false),
        ];
        let reference = [
            rec(0, ok.clone(), Some("=1"), false),
            rec(1, ok, Some("=2"), false),
            rec(2, Outcome::Error("HTTP 502".into()), None, false),
        ];
        let c = compare(&faulted, &reference);
        assert!(!c.passed());
        assert_eq!((c.differ.clone(), c.differ_count, c.equal), (vec![0], 1, 1));
        assert_eq!(c.reference_failed, [2]);
        let d = c.describe();
        assert!(
            d.contains("1 differ (ids [0])") && d.contains("did not answer ids [2]"),
            "{d}"
        );
    }

    #[test]
    fn answers_without_text_cannot_pass() {
        let ok = Outcome::Answered;
        let c = compare(
            &[rec(0, ok.clone(), None, false)],
            &[rec(0, ok, Some("=1"), false)],
        );
        assert!(!c.passed() && c.without_text == 1 && c.compared == 0);
    }
}
