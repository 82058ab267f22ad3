//! The soak's bounds and what broke them: every request answered or explicitly refused,
//! RSS growth after warm-up within a bound, sessions and KV back to zero at the end.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::growth::{rss_growth, GrowthWindows, RssGrowth, RssPoint};
use super::sample::{NodeSample, GAUGES};
use crate::loadgen::{Outcome, RequestRecord};

/// How one request ended, for the soak's purposes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fate {
    /// Answered.
    Answered,
    /// Refused with an explicit HTTP error (status and message), e.g. 502 or 429.
    Refused,
    /// No answer within the deadline: the load generator gave up.
    Hung,
    /// Failed without an HTTP answer (connection refused or reset, malformed response).
    Broken,
    /// Never sent: the load generator's in-flight cap was reached.
    Shed,
}

/// The [`Fate`] of an outcome. Error texts are those of `flow-node testbed load`: `HTTP
/// <status>...` for an answer with an error status, `timeout` or `... no complete answer
/// within ...` when the deadline passed, anything else for a transport failure.
pub fn fate(o: &Outcome) -> Fate {
    match o {
        Outcome::Answered => Fate::Answered,
        Outcome::Shed => Fate::Shed,
        Outcome::Error(e) if e == "timeout" || e.contains("no complete answer within") => {
            Fate::Hung
        }
        Outcome::Error(e) if e.starts_with("HTTP ") => Fate::Refused,
        Outcome::Error(_) => Fate::Broken,
    }
}

/// Requests by fate, plus the scheduled ones without a record (lost).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RequestTally {
    /// Requests in the schedule.
    pub scheduled: u64,
    /// Answered.
    pub answered: u64,
    /// Refused explicitly.
    pub refused: u64,
    /// Past the deadline without an answer.
    pub hung: u64,
    /// Failed without an HTTP answer.
    pub broken: u64,
    /// Never sent.
    pub shed: u64,
    /// Scheduled but without any record.
    pub lost: u64,
    /// Records whose id is not scheduled or appears twice.
    pub unexpected: u64,
    /// A few error texts of hung and broken requests, with counts (for the message).
    pub bad_errors: BTreeMap<String, u64>,
}

impl RequestTally {
    /// Tally `records` against the scheduled ids.
    pub fn count(scheduled: &[u64], records: &[RequestRecord]) -> Self {
        let mut want: BTreeMap<u64, bool> = scheduled.iter().map(|&id| (id, false)).collect();
        let mut t = Self {
            scheduled: want.len() as u64,
            ..Self::default()
        };
        for r in records {
            match want.get_mut(&r.id) {
                Some(seen @ false) => *seen = true,
                _ => {
                    t.unexpected += 1;
                    continue;
                }
            }
            let f = fate(&r.outcome);
            *match f {
                Fate::Answered => &mut t.answered,
                Fate::Refused => &mut t.refused,
                Fate::Hung => &mut t.hung,
                Fate::Broken => &mut t.broken,
                Fate::Shed => &mut t.shed,
            } += 1;
            if let (Fate::Hung | Fate::Broken, Outcome::Error(e)) = (f, &r.outcome) {
                if t.bad_errors.len() < 8 || t.bad_errors.contains_key(e) {
                    *t.bad_errors.entry(e.clone()).or_default() += 1;
                }
            }
        }
        t.lost = want.values().filter(|seen| !**seen).count() as u64;
        t
    }
}

/// The bounds a soak holds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Bounds {
    /// Largest allowed RSS growth after warm-up (0.10 = 10 %).
    pub max_rss_growth: f64,
    /// A node's longest incarnation must span at least this share of the run for its
    /// growth to be checked (a node restarted by the faults is reported, not checked).
    pub min_measured_share: f64,
    /// Warm-up and window shares.
    pub windows: GrowthWindows,
}

impl Default for Bounds {
    fn default() -> Self {
        Self {
            max_rss_growth: 0.10,
            min_measured_share: 0.8,
            windows: GrowthWindows::default(),
        }
    }
}

/// One node's numbers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeVerdict {
    /// Node name.
    pub node: String,
    /// Samples with an RSS reading.
    pub rss_samples: usize,
    /// Samples without one (node down, or exec failed).
    pub missed_samples: usize,
    /// First RSS reading, KiB.
    pub first_rss_kb: Option<u64>,
    /// Last RSS reading, KiB.
    pub last_rss_kb: Option<u64>,
    /// Growth over the longest incarnation.
    pub growth: Option<RssGrowth>,
    /// The growth bound was applied to this node.
    pub growth_checked: bool,
    /// Why it was not, when it was not.
    pub note: Option<String>,
    /// The gauges at the end (after the drain).
    pub end_gauges: BTreeMap<String, f64>,
}

/// Everything the soak concluded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    /// Requests by fate.
    pub requests: RequestTally,
    /// Per node, in the order given.
    pub nodes: Vec<NodeVerdict>,
    /// Broken bounds, each a sentence that names the node or requests and the bound.
    pub violations: Vec<String>,
}

impl Verdict {
    /// No bound was broken.
    pub fn passed(&self) -> bool {
        self.violations.is_empty()
    }
}

fn mib(kb: f64) -> f64 {
    kb / 1024.0
}

/// Judge a soak: `samples` are all periodic samples (any order), `end` the samples taken
/// after the drain (the last one per node counts), `run_s` the run length.
pub fn judge(
    nodes: &[String],
    scheduled: &[u64],
    records: &[RequestRecord],
    samples: &[NodeSample],
    end: &[NodeSample],
    run_s: f64,
    bounds: &Bounds,
) -> Verdict {
    let requests = RequestTally::count(scheduled, records);
    let mut violations = Vec::new();
    let t = &requests;
    if t.lost > 0 {
        violations.push(format!(
            "lost requests: {} of {} scheduled have no record",
            t.lost, t.scheduled
        ));
    }
    if t.unexpected > 0 {
        violations.push(format!(
            "{} records have an unscheduled or repeated id",
            t.unexpected
        ));
    }
    let examples = || {
        t.bad_errors
            .iter()
            .map(|(e, n)| format!("{n}× `{e}`"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    if t.hung > 0 {
        violations.push(format!(
            "hung requests: {} got no answer within the deadline ({})",
            t.hung,
            examples()
        ));
    }
    if t.broken > 0 {
        violations.push(format!(
            "broken requests: {} failed without an HTTP answer or error ({})",
            t.broken,
            examples()
        ));
    }
    if t.shed > 0 {
        violations.push(format!(
            "shed requests: {} were never sent (load generator's in-flight cap); lower the load",
            t.shed
        ));
    }
    if t.answered == 0 && t.scheduled > 0 {
        violations.push("no request was answered".to_string());
    }

    let mut verdicts = Vec::new();
    for node in nodes {
        let mut mine: Vec<&NodeSample> = samples.iter().filter(|s| &s.node == node).collect();
        mine.sort_by(|a, b| a.t_s.total_cmp(&b.t_s));
        let points: Vec<RssPoint> = mine
            .iter()
            .filter_map(|s| Some((s.t_s, s.probe.start_ticks, s.probe.rss_kb?)))
            .collect();
        let growth = rss_growth(&points, bounds.windows);
        let mut note = None;
        let mut checked = false;
        match &growth {
            None => violations.push(format!(
                "{node}: RSS growth not measurable ({} RSS samples in its longest run; \
                 sample more often with --sample-every)",
                points.len()
            )),
            Some(g) if g.span_s < bounds.min_measured_share * run_s => {
                note = Some(format!(
                    "restarted {} times by the faults; longest run {:.0} s < {:.0} % of the \
                     run: growth reported, not checked",
                    g.incarnations - 1,
                    g.span_s,
                    bounds.min_measured_share * 100.0
                ));
            }
            Some(g) => {
                checked = true;
                if g.growth > bounds.max_rss_growth {
                    violations.push(format!(
                        "{node}: RSS grew {:.1} % after warm-up ({:.1} MiB → {:.1} MiB), \
                         bound {:.0} %",
                        g.growth * 100.0,
                        mib(g.baseline_kb),
                        mib(g.end_kb),
                        bounds.max_rss_growth * 100.0
                    ));
                }
            }
        }
        let last_end = end
            .iter()
            .filter(|s| &s.node == node)
            .max_by(|a, b| a.t_s.total_cmp(&b.t_s));
        let end_gauges = last_end.map(|s| s.probe.gauges.clone()).unwrap_or_default();
        match last_end {
            None => violations.push(format!("{node}: no end-of-run sample")),
            Some(s) => {
                for g in GAUGES {
                    match s.gauge(g) {
                        Some(0.0) => {}
                        Some(v) => violations.push(format!(
                            "{node} at the end: {g} = {v} (expected 0 after the drain)"
                        )),
                        None => violations.push(format!(
                            "{node} at the end: {g} not read ({})",
                            s.probe.error.as_deref().unwrap_or("not on /metrics")
                        )),
                    }
                }
            }
        }
        verdicts.push(NodeVerdict {
            node: node.clone(),
            rss_samples: points.len(),
            missed_samples: mine.len() - points.len(),
            first_rss_kb: points.first().map(|p| p.2),
            last_rss_kb: points.last().map(|p| p.2),
            growth,
            growth_checked: checked,
            note,
            end_gauges,
        });
    }
    Verdict {
        requests,
        nodes: verdicts,
        violations,
    }
}

#[cfg(test)]
mod tests;
