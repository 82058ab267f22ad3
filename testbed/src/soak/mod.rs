//! Soak runs: hours of trace load with periodic faults, memory and state watched.
//!
//! `flow-node testbed soak SCENARIO --duration 30m` repeats a scenario's fault cycle
//! ([`crate::scenario::Scenario::repeated`]) under a looped trace
//! ([`crate::trace::Trace::looped`]), samples every node on a period (RSS from `/proc`,
//! the session and KV gauges of its `/metrics`, see [`sample`]), drains, samples once more
//! and judges ([`check::judge`]):
//!
//! - every scheduled request answered or refused with an explicit HTTP error — none lost,
//!   none past its deadline, none failed without an answer ([`check::Fate`]);
//! - RSS growth after warm-up within a bound on every node whose process lived long enough
//!   to measure ([`growth`]);
//! - sessions, KV bytes, running and waiting requests back to zero on every node.
//!
//! [`write_soak_report`] writes `soak.json` (verdict and every sample), `soak.md` and the
//! plots `rss`, `sessions`, `kv_bytes` (PNG and SVG). Everything here is sans-IO.

pub mod check;
pub mod growth;
pub mod sample;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::report::soak_plots::{write_node_plots, NodePlot, NodeSeries};
use check::{Bounds, Verdict};
use sample::{NodeSample, KV_BYTES, SESSIONS};

/// How the soak was run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SoakConfig {
    /// Scenario name.
    pub scenario: String,
    /// Load duration, seconds.
    pub duration_s: f64,
    /// Length of one fault cycle, seconds.
    pub cycle_s: f64,
    /// Fault cycles run.
    pub cycles: u32,
    /// Sampling period, seconds.
    pub sample_every_s: f64,
    /// Longest wait for the gauges to reach zero after the load, seconds.
    pub drain_timeout_s: f64,
    /// Where the load came from (trace, speed).
    pub load: String,
    /// The bounds.
    pub bounds: Bounds,
}

/// The soak's result, as written to `soak.json` (with the samples).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SoakReport {
    /// Title.
    pub title: String,
    /// Configuration.
    pub config: SoakConfig,
    /// Seconds the drain took (until every gauge was zero, or the timeout).
    pub drain_s: f64,
    /// Faults applied: (seconds since start, `action target`).
    pub events: Vec<(f64, String)>,
    /// What was concluded.
    pub verdict: Verdict,
}

#[derive(Serialize)]
struct JsonSoak<'a> {
    #[serde(flatten)]
    report: &'a SoakReport,
    samples: &'a [NodeSample],
    end_samples: &'a [NodeSample],
}

/// Per node, runs of (t, f(sample)); a run breaks where a node had no reading or restarted.
fn node_series(
    nodes: &[String],
    samples: &[NodeSample],
    value: impl Fn(&NodeSample) -> Option<f64>,
) -> NodeSeries {
    let mut out = NodeSeries::new();
    for n in nodes {
        let mut mine: Vec<&NodeSample> = samples.iter().filter(|s| &s.node == n).collect();
        mine.sort_by(|a, b| a.t_s.total_cmp(&b.t_s));
        let mut runs: Vec<Vec<(f64, f64)>> = Vec::new();
        let mut current: Vec<(f64, f64)> = Vec::new();
        let mut start = None;
        for s in mine {
            let restarted = s.probe.start_ticks.is_some() && s.probe.start_ticks != start;
            match value(s) {
                Some(v) if !(restarted && start.is_some()) => current.push((s.t_s, v)),
                v => {
                    if !current.is_empty() {
                        runs.push(std::mem::take(&mut current));
                    }
                    current.extend(v.map(|v| (s.t_s, v)));
                }
            }
            if s.probe.start_ticks.is_some() {
                start = s.probe.start_ticks;
            }
        }
        if !current.is_empty() {
            runs.push(current);
        }
        out.insert(n.clone(), runs);
    }
    out
}

fn mib(kb: f64) -> String {
    format!("{:.1}", kb / 1024.0)
}

impl SoakReport {
    /// The Markdown report.
    pub fn to_markdown(&self, plots: &[&str]) -> String {
        let mut md = String::new();
        let c = &self.config;
        let v = &self.verdict;
        let _ = writeln!(md, "# {}\n", self.title);
        let verdict = if v.passed() {
            "**passed**".to_string()
        } else {
            format!("**FAILED** ({} bounds broken)", v.violations.len())
        };
        let _ = writeln!(
            md,
            "Soak {verdict}: {:.0} s of load ({}), {} fault cycles of {:.0} s ({} faults \
             applied), a sample of every node each {:.1} s, drain {:.1} s (limit {:.0} s).\n",
            c.duration_s,
            c.load,
            c.cycles,
            c.cycle_s,
            self.events.len(),
            c.sample_every_s,
            self.drain_s,
            c.drain_timeout_s
        );
        if !v.violations.is_empty() {
            let _ = writeln!(md, "## Broken bounds\n");
            for x in &v.violations {
                let _ = writeln!(md, "- {x}");
            }
            md.push('\n');
        }
        let t = &v.requests;
        let _ = writeln!(md, "## Requests\n");
        let _ = writeln!(
            md,
            "| scheduled | answered | refused (explicit) | hung | broken | shed | lost |"
        );
        let _ = writeln!(md, "|---:|---:|---:|---:|---:|---:|---:|");
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} |\n",
            t.scheduled, t.answered, t.refused, t.hung, t.broken, t.shed, t.lost
        );
        let _ = writeln!(
            md,
            "Latency, tiers, errors and link bytes: [report.md](report.md).\n"
        );
        let _ = writeln!(
            md,
            "## Memory and state per node\n\nRSS growth = median of the last {:.0} % of the \
             samples of the node's longest-lived process / median of the {:.0} % after its \
             first {:.0} % (warm-up); bound {:.0} %, checked where that process spans at \
             least {:.0} % of the run. End = after the drain.\n",
            c.bounds.windows.window * 100.0,
            c.bounds.windows.window * 100.0,
            c.bounds.windows.warmup * 100.0,
            c.bounds.max_rss_growth * 100.0,
            c.bounds.min_measured_share * 100.0
        );
        let _ = writeln!(
            md,
            "| node | samples (missed) | RSS first MiB | after warm-up MiB | end MiB | max MiB | growth | checked | sessions at end | KV bytes at end |"
        );
        let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|:---:|---:|---:|");
        for n in &v.nodes {
            let g = n.growth.as_ref();
            let gauge = |k: &str| {
                n.end_gauges
                    .get(k)
                    .map_or("–".to_string(), |x| format!("{x}"))
            };
            let _ = writeln!(
                md,
                "| {} | {} ({}) | {} | {} | {} | {} | {} | {} | {} | {} |",
                n.node,
                n.rss_samples,
                n.missed_samples,
                n.first_rss_kb.map_or("–".into(), |x| mib(x as f64)),
                g.map_or("–".into(), |g| mib(g.baseline_kb)),
                g.map_or("–".into(), |g| mib(g.end_kb)),
                g.map_or("–".into(), |g| mib(g.max_kb as f64)),
                g.map_or("–".into(), |g| format!("{:+.1} %", g.growth * 100.0)),
                if n.growth_checked { "yes" } else { "no" },
                gauge(SESSIONS),
                gauge(KV_BYTES),
            );
        }
        let notes: Vec<_> = v
            .nodes
            .iter()
            .filter_map(|n| Some((&n.node, n.note.as_ref()?)))
            .collect();
        if !notes.is_empty() {
            md.push('\n');
            for (node, note) in notes {
                let _ = writeln!(md, "- {node}: {note}");
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

/// Write `soak.json`, `soak.md` and the plots into `dir`; returns the written paths
/// (`soak.md` first).
pub fn write_soak_report(
    dir: impl AsRef<Path>,
    report: &SoakReport,
    nodes: &[String],
    samples: &[NodeSample],
    end: &[NodeSample],
) -> Result<Vec<PathBuf>> {
    let dir = dir.as_ref();
    std::fs::create_dir_all(dir).map_err(|e| Error::file("creating directory", dir, e))?;
    let all: Vec<NodeSample> = samples.iter().chain(end).cloned().collect();
    let plots = [
        NodePlot {
            stem: "rss",
            caption: "Resident memory per node",
            y_desc: "RSS (MiB)",
            series: node_series(nodes, &all, |s| s.probe.rss_kb.map(|k| k as f64 / 1024.0)),
        },
        NodePlot {
            stem: "sessions",
            caption: "Sessions holding KV per node",
            y_desc: SESSIONS,
            series: node_series(nodes, &all, |s| s.gauge(SESSIONS)),
        },
        NodePlot {
            stem: "kv_bytes",
            caption: "KV cache bytes per node",
            y_desc: "KV (KiB)",
            series: node_series(nodes, &all, |s| s.gauge(KV_BYTES).map(|b| b / 1024.0)),
        },
    ];
    let mut files = write_node_plots(dir, &plots, &report.events)?;
    let stems: Vec<&str> = plots.iter().map(|p| p.stem).collect();
    let md = dir.join("soak.md");
    std::fs::write(&md, report.to_markdown(&stems)).map_err(|e| Error::file("writing", &md, e))?;
    let json = dir.join("soak.json");
    let body = serde_json::to_vec_pretty(&JsonSoak {
        report,
        samples,
        end_samples: end,
    })?;
    std::fs::write(&json, body).map_err(|e| Error::file("writing", &json, e))?;
    files.insert(0, json);
    files.insert(0, md);
    Ok(files)
}

#[cfg(test)]
mod tests;
