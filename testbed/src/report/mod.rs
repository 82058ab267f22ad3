//! Run reports: a JSON file, a Markdown summary and plots.
//!
//! [`Summary::compute`] turns the per-request records of a run (from
//! [`crate::loadgen::run_open_loop`]), the per-link byte counters (from the shapers), the
//! scenario and the versions into numbers: latency and TTFT percentiles, throughput, per-tier
//! share, escalation rate, bytes per link, errors and degraded answers — and checks that every
//! request is accounted for (`answered + errored + shed = sent`).
//!
//! [`write_report`] writes `report.json`, `report.md` and the plots
//! (`latency_cdf`, `latency_timeseries`, `throughput`, each as PNG and SVG) into a directory.

mod plots;
pub(crate) mod soak_plots;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::loadgen::{Outcome, RequestRecord};
use crate::scenario::{Action, Scenario};
use crate::shaper::ShaperStats;

/// Byte counters of one emulated link.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinkBytes {
    /// Link name, e.g. `device1:edge1`.
    pub name: String,
    /// The shaper's counters (up = first node to second).
    pub stats: ShaperStats,
}

/// Everything a report is made from.
#[derive(Debug, Clone, Default)]
pub struct ReportInput {
    /// Title of the report.
    pub title: String,
    /// One record per scheduled request.
    pub records: Vec<RequestRecord>,
    /// Per-link counters.
    pub links: Vec<LinkBytes>,
    /// The fault scenario of the run, if any.
    pub scenario: Option<Scenario>,
    /// Versions of the pieces (`flow-node`, `flow-testbed`, model, git commit, ...).
    pub versions: BTreeMap<String, String>,
}

/// Distribution summary, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    /// Samples.
    pub count: usize,
    /// Median.
    pub p50: f64,
    /// 95th percentile.
    pub p95: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Mean.
    pub mean: f64,
    /// Maximum.
    pub max: f64,
}

impl Percentiles {
    /// Nearest-rank percentiles of `values`; `None` when empty.
    pub fn of(values: &[f64]) -> Option<Self> {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let rank = |p: f64| v[((p / 100.0 * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
        Some(Self {
            count: v.len(),
            p50: rank(50.0),
            p95: rank(95.0),
            p99: rank(99.0),
            mean: v.iter().sum::<f64>() / v.len() as f64,
            max: v[v.len() - 1],
        })
    }
}

/// A scenario event as recorded in the report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventSummary {
    /// Seconds since the run started.
    pub at_s: f64,
    /// `kill`, `restart`, ...
    pub action: String,
    /// Node or link.
    pub target: String,
    /// Parameters, for `degrade_link`.
    pub params: Option<String>,
}

/// The numbers of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Report title.
    pub title: String,
    /// Requests scheduled (each is answered, errored or shed).
    pub sent: u64,
    /// Answered.
    pub answered: u64,
    /// Failed with an explicit error.
    pub errored: u64,
    /// Not sent because the in-flight cap was reached.
    pub shed: u64,
    /// `answered + errored + shed == sent` and every id appears once.
    pub all_accounted: bool,
    /// From the first scheduled send to the last completion, seconds.
    pub duration_s: f64,
    /// Latency of answered requests (send to last token), ms.
    pub latency_ms: Option<Percentiles>,
    /// Time to first token of answered requests, ms.
    pub ttft_ms: Option<Percentiles>,
    /// Answered requests per second.
    pub throughput_rps: f64,
    /// Generated tokens per second.
    pub tokens_per_s: f64,
    /// Share of answered requests per answering tier (`unknown` when not reported).
    pub tier_share: BTreeMap<String, f64>,
    /// Escalated / answered.
    pub escalation_rate: f64,
    /// Answers produced in a degraded mode.
    pub degraded: u64,
    /// Error messages and how often they occurred.
    pub errors: BTreeMap<String, u64>,
    /// Per-link counters.
    pub links: Vec<LinkBytes>,
    /// Scenario name and events.
    pub scenario: Option<(String, Vec<EventSummary>)>,
    /// Versions.
    pub versions: BTreeMap<String, String>,
}

fn action_name(a: &Action) -> (&'static str, Option<String>) {
    match a {
        Action::Kill => ("kill", None),
        Action::Restart => ("restart", None),
        Action::Partition => ("partition", None),
        Action::Heal => ("heal", None),
        Action::DegradeLink(c) => {
            let mut p = Vec::new();
            if let Some(v) = c.delay_ms {
                p.push(format!("delay {v} ms"));
            }
            if let Some(v) = c.jitter_ms {
                p.push(format!("jitter {v} ms"));
            }
            if let Some(v) = c.rate_mbit {
                p.push(format!("rate {v} Mbit/s"));
            }
            if let Some(v) = c.loss {
                p.push(format!("loss {v}"));
            }
            ("degrade_link", Some(p.join(", ")))
        }
    }
}

/// When a request finished (ms since start), for answered and errored ones.
pub(crate) fn completed_ms(r: &RequestRecord) -> Option<f64> {
    Some(r.sent_ms? + r.latency_ms?)
}

impl Summary {
    /// Compute the summary of a run.
    pub fn compute(input: &ReportInput) -> Self {
        let recs = &input.records;
        let count = |f: fn(&Outcome) -> bool| recs.iter().filter(|r| f(&r.outcome)).count() as u64;
        let answered = count(|o| matches!(o, Outcome::Answered));
        let errored = count(|o| matches!(o, Outcome::Error(_)));
        let shed = count(|o| matches!(o, Outcome::Shed));
        let mut ids: Vec<u64> = recs.iter().map(|r| r.id).collect();
        ids.sort_unstable();
        ids.dedup();
        let sent = recs.len() as u64;
        let all_accounted = answered + errored + shed == sent && ids.len() == recs.len();

        let ok: Vec<&RequestRecord> = recs
            .iter()
            .filter(|r| r.outcome == Outcome::Answered)
            .collect();
        let latency_ms =
            Percentiles::of(&ok.iter().filter_map(|r| r.latency_ms).collect::<Vec<_>>());
        let ttft_ms = Percentiles::of(&ok.iter().filter_map(|r| r.ttft_ms).collect::<Vec<_>>());
        let first = recs
            .iter()
            .map(|r| r.scheduled_ms)
            .fold(f64::INFINITY, f64::min);
        let last = recs
            .iter()
            .map(|r| completed_ms(r).unwrap_or(r.scheduled_ms))
            .fold(0.0f64, f64::max);
        let duration_s = if recs.is_empty() {
            0.0
        } else {
            ((last - first) / 1000.0).max(0.0)
        };
        let per_s = |n: f64| {
            if duration_s > 0.0 {
                n / duration_s
            } else {
                0.0
            }
        };
        let mut tier_share: BTreeMap<String, f64> = BTreeMap::new();
        for r in &ok {
            *tier_share
                .entry(r.tier.clone().unwrap_or_else(|| "unknown".into()))
                .or_default() += 1.0;
        }
        for v in tier_share.values_mut() {
            *v /= ok.len() as f64;
        }
        let mut errors = BTreeMap::new();
        for r in recs {
            if let Outcome::Error(m) = &r.outcome {
                *errors.entry(m.clone()).or_insert(0u64) += 1;
            }
        }
        let scenario = input.scenario.as_ref().map(|s| {
            let events = s
                .events
                .iter()
                .map(|e| {
                    let (action, params) = action_name(&e.action);
                    EventSummary {
                        at_s: e.at.as_secs_f64(),
                        action: action.into(),
                        target: e.target.clone(),
                        params,
                    }
                })
                .collect();
            (s.name.clone(), events)
        });
        Self {
            title: input.title.clone(),
            sent,
            answered,
            errored,
            shed,
            all_accounted,
            duration_s,
            latency_ms,
            ttft_ms,
            throughput_rps: per_s(answered as f64),
            tokens_per_s: per_s(ok.iter().map(|r| f64::from(r.tokens_out)).sum()),
            tier_share,
            escalation_rate: if ok.is_empty() {
                0.0
            } else {
                ok.iter().filter(|r| r.escalated).count() as f64 / ok.len() as f64
            },
            degraded: ok.iter().filter(|r| r.degraded).count() as u64,
            errors,
            links: input.links.clone(),
            scenario,
            versions: input.versions.clone(),
        }
    }

    /// The Markdown summary.
    pub fn to_markdown(&self, plots: &[String]) -> String {
        let mut md = String::new();
        let title = if self.title.is_empty() {
            "aiflow testbed run"
        } else {
            &self.title
        };
        let _ = writeln!(md, "# {title}\n");
        let check = if self.all_accounted { "yes" } else { "**NO**" };
        let _ = writeln!(md, "## Requests\n");
        let _ = writeln!(
            md,
            "| sent | answered | errored | shed | all accounted for |"
        );
        let _ = writeln!(md, "|---:|---:|---:|---:|:---:|");
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {check} |\n",
            self.sent, self.answered, self.errored, self.shed
        );
        let _ = writeln!(
            md,
            "Duration {:.1} s, throughput {:.2} req/s, {:.1} tokens/s, escalation rate {:.1} %, \
             degraded answers {}.\n",
            self.duration_s,
            self.throughput_rps,
            self.tokens_per_s,
            self.escalation_rate * 100.0,
            self.degraded
        );
        let _ = writeln!(md, "## Latency (answered requests, ms)\n");
        let _ = writeln!(md, "| metric | n | p50 | p95 | p99 | mean | max |");
        let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|");
        for (name, p) in [("latency", &self.latency_ms), ("TTFT", &self.ttft_ms)] {
            match p {
                Some(p) => {
                    let _ = writeln!(
                        md,
                        "| {name} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
                        p.count, p.p50, p.p95, p.p99, p.mean, p.max
                    );
                }
                None => {
                    let _ = writeln!(md, "| {name} | 0 | – | – | – | – | – |");
                }
            }
        }
        let _ = writeln!(md, "\n## Answers per tier\n\n| tier | share |\n|---|---:|");
        for (tier, share) in &self.tier_share {
            let _ = writeln!(md, "| {tier} | {:.1} % |", share * 100.0);
        }
        if !self.errors.is_empty() {
            let _ = writeln!(md, "\n## Errors\n\n| error | count |\n|---|---:|");
            for (e, n) in &self.errors {
                let _ = writeln!(md, "| {} | {n} |", e.replace('|', "\\|"));
            }
        }
        if !self.links.is_empty() {
            let _ = writeln!(md, "\n## Bytes per link\n");
            let _ = writeln!(md, "| link | up in | up out | up dropped (pkts) | down in | down out | down dropped (pkts) |");
            let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|");
            for l in &self.links {
                let (u, d) = (&l.stats.up, &l.stats.down);
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {} | {} | {} | {} |",
                    l.name,
                    u.bytes_in,
                    u.bytes_out,
                    u.dropped(),
                    d.bytes_in,
                    d.bytes_out,
                    d.dropped()
                );
            }
        }
        if let Some((name, events)) = &self.scenario {
            let _ = writeln!(md, "\n## Scenario: {name}\n\n| at (s) | action | target | params |\n|---:|---|---|---|");
            for e in events {
                let _ = writeln!(
                    md,
                    "| {:.1} | {} | {} | {} |",
                    e.at_s,
                    e.action,
                    e.target,
                    e.params.as_deref().unwrap_or("")
                );
            }
        }
        if !self.versions.is_empty() {
            let _ = writeln!(md, "\n## Versions\n\n| component | version |\n|---|---|");
            for (k, v) in &self.versions {
                let _ = writeln!(md, "| {k} | {v} |");
            }
        }
        if !plots.is_empty() {
            let _ = writeln!(md, "\n## Plots\n");
            for p in plots {
                let _ = writeln!(md, "![{p}]({p}.svg)\n");
            }
        }
        md
    }
}

/// The files a report consists of.
#[derive(Debug, Clone, PartialEq)]
pub struct ReportFiles {
    /// `report.json`: the summary and every request record.
    pub json: PathBuf,
    /// `report.md`.
    pub markdown: PathBuf,
    /// Plot files (PNG and SVG).
    pub plots: Vec<PathBuf>,
}

#[derive(Serialize)]
struct JsonReport<'a> {
    summary: &'a Summary,
    requests: &'a [RequestRecord],
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).map_err(|e| Error::file("writing", path, e))
}

/// Compute the summary and write `report.json`, `report.md` and the plots into `dir`
/// (created if missing).
pub fn write_report(dir: impl AsRef<Path>, input: &ReportInput) -> Result<(Summary, ReportFiles)> {
    let dir = dir.as_ref();
    std::fs::create_dir_all(dir).map_err(|e| Error::file("creating directory", dir, e))?;
    let summary = Summary::compute(input);
    let plots = plots::write_all(dir, input)?;
    let stems: Vec<String> = plots::STEMS.iter().map(|s| s.to_string()).collect();
    let json = dir.join("report.json");
    write_file(
        &json,
        &serde_json::to_vec_pretty(&JsonReport {
            summary: &summary,
            requests: &input.records,
        })?,
    )?;
    let markdown = dir.join("report.md");
    write_file(&markdown, summary.to_markdown(&stems).as_bytes())?;
    Ok((
        summary,
        ReportFiles {
            json,
            markdown,
            plots,
        },
    ))
}

#[cfg(test)]
mod tests;
