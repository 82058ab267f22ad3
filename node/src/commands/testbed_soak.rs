//! `flow-node testbed soak SCENARIO`: a long run of looped trace load with the scenario's
//! fault cycle repeated, every node sampled on a period, a drain, and a verdict.
//!
//! The replay itself is `testbed run`'s ([`super::testbed_run::replay`]); this file adds
//! the sampler (a thread that `docker exec`s `flow-node testbed probe` in every node's
//! container each period), the drain (probe until sessions and KV are zero on every node)
//! and the soak report. The judging is `flow_testbed::soak` (sans-IO, unit-tested).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::Context;
use flow_testbed::scenario::Scenario;
use flow_testbed::soak::check::{judge, Bounds};
use flow_testbed::soak::growth::GrowthWindows;
use flow_testbed::soak::sample::{NodeSample, Probe, GAUGES};
use flow_testbed::soak::{write_soak_report, SoakConfig, SoakReport};
use indicatif::ProgressBar;

use super::testbed_run::{
    ensure_image, load_trace, replay, schedule_of, write_run_report, Compose, DownGuard, RunArgs,
};
use super::OsInstant;

/// Trace speed-up of a soak when `--speed` is not given: the shipped sample at ×2 is about
/// 2.4 requests/s, which the toy family serves on 2 cores without shedding.
const DEFAULT_SPEED: f64 = 2.0;

/// Flags of `testbed soak`.
#[derive(clap::Args, Debug)]
pub struct SoakArgs {
    /// The run's flags; the scenario file is ONE fault cycle (its `duration_s` is the cycle
    /// length), repeated for --duration. The trace loops for --duration at --speed
    /// (default ×2). The checks of --check always apply (and more, see below).
    #[command(flatten)]
    pub run: RunArgs,
    /// How long the load runs: `90s`, `30m`, `2h` or seconds. Whole fault cycles only.
    #[arg(long, default_value = "30m", value_parser = parse_duration)]
    pub duration: Duration,
    /// Sample every node's RSS and gauges this often.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub sample_every: Duration,
    /// Largest allowed RSS growth after warm-up, as a fraction (0.10 = 10 %).
    #[arg(long, default_value_t = 0.10)]
    pub max_rss_growth: f64,
    /// Share of a node process's samples that is warm-up (not measured).
    #[arg(long, default_value_t = 0.2)]
    pub warmup: f64,
    /// After the load, wait at most this long for sessions and KV to reach zero.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
}

/// `90`, `90s`, `30m`, `2h`, `1.5h` → a duration.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let mult = match unit {
        "ms" => 0.001,
        "s" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        _ => return Err(format!("`{s}`: unit must be ms, s, m or h (e.g. 90s, 30m)")),
    };
    match num.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(Duration::from_secs_f64(v * mult)),
        _ => Err(format!(
            "`{s}`: expected a positive number with a unit, e.g. 30m"
        )),
    }
}

/// One probe of one node via `docker exec`; a failed exec is a probe with only an error.
fn probe_node(id: &str) -> Probe {
    let out = Command::new("docker")
        .args(["exec", id, "/flow-node", "testbed", "probe"])
        .stdin(Stdio::null())
        .output();
    match out {
        Ok(o) if o.status.success() => {
            serde_json::from_slice(&o.stdout).unwrap_or_else(|e| Probe {
                error: Some(format!("probe output is not a probe: {e}")),
                ..Probe::default()
            })
        }
        Ok(o) => Probe {
            error: Some(format!(
                "docker exec failed ({}): {}",
                o.status,
                String::from_utf8_lossy(&o.stderr).trim()
            )),
            ..Probe::default()
        },
        Err(e) => Probe {
            error: Some(format!("could not run docker exec: {e}")),
            ..Probe::default()
        },
    }
}

fn since(t0: OsInstant) -> f64 {
    let now = OsInstant::now();
    if now >= t0 {
        (now - t0).as_secs_f64()
    } else {
        -(t0 - now).as_secs_f64()
    }
}

/// Probe every node at once (one thread each); `ids` are (node, container id).
fn sample_round(ids: &[(String, String)], t0: OsInstant) -> Vec<NodeSample> {
    std::thread::scope(|sc| {
        let handles: Vec<_> = ids
            .iter()
            .map(|(node, id)| {
                sc.spawn(move || {
                    let probe = probe_node(id);
                    NodeSample {
                        t_s: since(t0),
                        node: node.clone(),
                        probe,
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .zip(ids)
            .map(|(h, (node, _))| {
                h.join().unwrap_or_else(|_| NodeSample {
                    t_s: since(t0),
                    node: node.clone(),
                    probe: Probe {
                        error: Some("probe thread panicked".into()),
                        ..Probe::default()
                    },
                })
            })
            .collect()
    })
}

fn container_ids(compose: &Compose, nodes: &[String]) -> anyhow::Result<Vec<(String, String)>> {
    // one `docker ps` for all; a per-service `compose ps` only for one it did not list
    let found = compose.containers()?;
    nodes
        .iter()
        .map(|n| match found.get(n) {
            Some(id) => Ok((n.clone(), id.clone())),
            None => Ok((n.clone(), compose.container(n)?)),
        })
        .collect()
}

/// Sample every `every` until `stop`; samples go to `out`.
fn sampler(
    ids: &[(String, String)],
    t0: OsInstant,
    every: Duration,
    stop: &AtomicBool,
    out: &Mutex<Vec<NodeSample>>,
) {
    let mut next = OsInstant::now();
    while !stop.load(Ordering::Relaxed) {
        let round = sample_round(ids, t0);
        if let Ok(mut v) = out.lock() {
            v.extend(round);
        }
        next += every;
        while OsInstant::now() < next && !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(100).min(every));
        }
    }
}

/// Probe every second until every gauge is zero on every node (or `timeout`); returns the
/// last round and how long it took.
fn drain(
    ids: &[(String, String)],
    t0: OsInstant,
    timeout: Duration,
) -> (Vec<NodeSample>, Duration) {
    let start = OsInstant::now();
    let pb =
        ProgressBar::new_spinner().with_message("drain: waiting for sessions and KV to reach zero");
    pb.enable_steady_tick(Duration::from_millis(200));
    loop {
        let round = sample_round(ids, t0);
        let zero = round
            .iter()
            .all(|s| GAUGES.iter().all(|g| s.gauge(g) == Some(0.0)));
        if zero || start.elapsed() >= timeout {
            pb.finish_and_clear();
            return (round, start.elapsed());
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

pub fn soak(a: SoakArgs) -> anyhow::Result<()> {
    let cycle = Scenario::load(&a.run.scenario)?;
    anyhow::ensure!(
        !a.run.check_greedy,
        "--check-greedy is for `testbed run` (its reference replays every request one at a \
         time); a soak checks fates, memory and state instead"
    );
    let compose_args = a
        .run
        .compose
        .with_scenario(&cycle.topology.compose_overrides);
    let compose = Compose::detect(&compose_args)?;
    compose.check_nodes(&cycle.topology.nodes, &a.run.scenario)?;
    anyhow::ensure!(
        cycle.topology.nodes.iter().any(|n| n.starts_with("device")),
        "the topology has no device to send load to"
    );
    anyhow::ensure!(
        (0.0..1.0).contains(&a.max_rss_growth) || a.max_rss_growth >= 1.0,
        "--max-rss-growth {} must be a non-negative fraction (0.10 = 10 %)",
        a.max_rss_growth
    );
    anyhow::ensure!(
        (0.0..0.6).contains(&a.warmup),
        "--warmup {} must be in [0, 0.6) (a share of the samples)",
        a.warmup
    );
    let (scenario, cycles) = cycle.repeated(a.duration)?;
    let (trace, source) = load_trace(&a.run)?;
    let speed = a.run.speed.unwrap_or(DEFAULT_SPEED);
    let run_s = a.duration.as_secs_f64();
    let trace = trace.speed_up(speed)?.looped(0.95 * run_s);
    let schedule = schedule_of(&a.run, &trace)?;
    let load = format!("{source} ×{speed:.2}, looped");
    let out = a.run.out.clone().unwrap_or_else(|| {
        let stem = a
            .run
            .scenario
            .file_stem()
            .map_or("run".into(), |s| s.to_string_lossy().to_string());
        PathBuf::from("target/testbed").join(format!("soak-{stem}"))
    });
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    eprintln!(
        "soak: {} requests over {run_s:.0} s, {cycles} fault cycles of {:.0} s, a sample every {:.1} s → {}",
        schedule.len(),
        cycle.duration.as_secs_f64(),
        a.sample_every.as_secs_f64(),
        out.display()
    );
    ensure_image(&a.run.compose, a.run.build_image)?;
    compose.down().ok();
    let guard = DownGuard {
        compose: &compose,
        keep: a.run.keep_up,
    };
    let cfg = SoakConfig {
        scenario: cycle.name.clone(),
        duration_s: run_s,
        cycle_s: cycle.duration.as_secs_f64(),
        cycles,
        sample_every_s: a.sample_every.as_secs_f64(),
        drain_timeout_s: a.drain_timeout.as_secs_f64(),
        load,
        bounds: Bounds {
            max_rss_growth: a.max_rss_growth,
            windows: GrowthWindows {
                warmup: a.warmup,
                ..GrowthWindows::default()
            },
            ..Bounds::default()
        },
    };
    let result = soak_inner(&a, &compose, &scenario, &schedule, cfg, &out);
    if let Ok(logs) = compose.cmd(&["logs", "--no-color", "-t"]).output() {
        std::fs::write(out.join("compose.log"), logs.stdout).ok();
    }
    drop(guard);
    result
}

fn soak_inner(
    a: &SoakArgs,
    compose: &Compose,
    scenario: &Scenario,
    schedule: &flow_testbed::loadgen::Schedule,
    cfg: SoakConfig,
    out: &Path,
) -> anyhow::Result<()> {
    let nodes = scenario.topology.nodes.clone();
    let stop = AtomicBool::new(false);
    let samples = Mutex::new(Vec::new());
    let mut started: Option<OsInstant> = None;
    let (replayed, ids) = std::thread::scope(|sc| {
        let mut handle = None;
        let r = replay(&a.run, compose, scenario, schedule, &cfg.load, &mut |t0| {
            // ids are looked up in the thread: compose v1 takes seconds per call on a
            // loaded machine, and this callback holds up the fault timeline
            let (nodes, stop, samples, every) = (&nodes, &stop, &samples, a.sample_every);
            handle = Some(sc.spawn(move || {
                let ids = container_ids(compose, nodes)?;
                sampler(&ids, t0, every, stop, samples);
                anyhow::Ok(ids)
            }));
            started = Some(t0);
        });
        stop.store(true, Ordering::Relaxed);
        let ids = handle.map(|h| {
            h.join()
                .map_err(|_| anyhow::anyhow!("the sampler thread panicked"))?
        });
        (r, ids)
    });
    let replay = replayed?;
    let t0 = started.context("the sampler never started")?;
    let ids = ids
        .context("the sampler never started")?
        .context("finding the nodes' containers for the sampler")?;
    let (end, drain_took) = drain(&ids, t0, a.drain_timeout);
    write_run_report(scenario, &replay, out)?;
    let samples = samples.into_inner().unwrap_or_default();
    let scheduled: Vec<u64> = schedule.requests.iter().map(|r| r.id).collect();
    let mut verdict = judge(
        &nodes,
        &scheduled,
        &replay.records,
        &samples,
        &end,
        cfg.duration_s,
        &cfg.bounds,
    );
    let failed = replay.applied.iter().filter(|e| !e.ok).count();
    if failed > 0 || replay.applied.len() != scenario.events.len() {
        verdict.violations.push(format!(
            "faults: {} of {} applied, {failed} failed (see events.json)",
            replay.applied.len(),
            scenario.events.len()
        ));
    }
    if !replay.exited.is_empty() {
        verdict.violations.push(format!(
            "nodes stopped on their own: {} (see compose.log)",
            replay.exited.join(", ")
        ));
    }
    let report = SoakReport {
        title: format!("soak: {}", cfg.scenario),
        drain_s: drain_took.as_secs_f64(),
        events: replay
            .applied
            .iter()
            .map(|e| (e.applied_at_s, format!("{} {}", e.action, e.target)))
            .collect(),
        config: cfg,
        verdict,
    };
    let files = write_soak_report(out, &report, &nodes, &samples, &end)?;
    let v = &report.verdict;
    let t = &v.requests;
    println!(
        "soak: {} scheduled: {} answered, {} refused explicitly, {} hung, {} broken, {} shed, {} lost",
        t.scheduled, t.answered, t.refused, t.hung, t.broken, t.shed, t.lost
    );
    for n in &v.nodes {
        let g = n.growth.as_ref();
        println!(
            "  {:8} RSS {} → {} MiB (growth {}{}), end: sessions {}, KV {} B",
            n.node,
            g.map_or("–".into(), |g| format!("{:.1}", g.baseline_kb / 1024.0)),
            g.map_or("–".into(), |g| format!("{:.1}", g.end_kb / 1024.0)),
            g.map_or("–".into(), |g| format!("{:+.1} %", g.growth * 100.0)),
            if n.growth_checked {
                ""
            } else {
                ", not checked"
            },
            n.end_gauges
                .get(flow_testbed::soak::sample::SESSIONS)
                .map_or("?".into(), |x| x.to_string()),
            n.end_gauges
                .get(flow_testbed::soak::sample::KV_BYTES)
                .map_or("?".into(), |x| x.to_string()),
        );
    }
    println!("soak report: {}", files[0].display());
    if !v.passed() {
        for x in &v.violations {
            eprintln!("bound broken: {x}");
        }
        anyhow::bail!(
            "soak failed: {} bounds broken (see {})",
            v.violations.len(),
            files[0].display()
        );
    }
    println!("soak passed: every bound held");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_units() {
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_duration("1.5h"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_duration("5d").unwrap_err().contains("unit"));
        assert!(parse_duration("-3s").is_err());
        assert!(parse_duration("m").is_err());
    }
}
