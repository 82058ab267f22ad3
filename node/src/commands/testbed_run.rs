//! `flow-node testbed up|down|run`: the host side of the compose testbed.
//!
//! `run` = up (certs, links, the scenario's nodes; waits for health checks) → the load
//! generator container replays the schedule open-loop from a shared wall-clock start →
//! the scenario's faults are injected at their times (`testbed_faults`) → every request's
//! record and the shapers' byte counters are collected → report (JSON, Markdown, PNG/SVG)
//! → with `--check-greedy`, every answered request replayed alone (`testbed_greedy`) →
//! down -v (also on failure).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use flow_testbed::loadgen::{Outcome, RequestRecord, Schedule, ScheduleOptions};
use flow_testbed::report::{write_report, LinkBytes, ReportInput};
use flow_testbed::scenario::Scenario;
use flow_testbed::shaper::ShaperStats;
use flow_testbed::soak::check::{fate, Fate};
use flow_testbed::trace::{SyntheticConfig, Trace};
use indicatif::{ProgressBar, ProgressStyle};

use super::testbed::{image, ImageArgs};
pub(super) use super::testbed_compose::{
    address_on, docker, exited_nodes, health_of, run_ok, Compose, ComposeArgs, Loadgen,
};
use super::testbed_faults::{action_label, AppliedEvent, Faults};
use super::OsInstant;

/// Flags of `testbed up`.
#[derive(clap::Args, Debug)]
pub struct UpArgs {
    #[command(flatten)]
    pub compose: ComposeArgs,
    /// Services to start (default: every node of the compose files: the full testbed, and
    /// cloud2 with --compose-override testbed/docker-compose.failover.yml). Certs and links
    /// always start.
    pub services: Vec<String>,
    /// Build the image from this binary first if it does not exist.
    #[arg(long)]
    pub build_image: bool,
    /// Give up waiting for health checks after this many seconds.
    #[arg(long, default_value_t = 180)]
    pub health_timeout_s: u64,
}

/// Flags of `testbed down`.
#[derive(clap::Args, Debug)]
pub struct DownArgs {
    #[command(flatten)]
    pub compose: ComposeArgs,
}

pub fn down(a: DownArgs) -> anyhow::Result<()> {
    Compose::detect(&a.compose)?.down()?;
    println!(
        "testbed {} is down (containers, networks, volumes removed)",
        a.compose.project
    );
    Ok(())
}

pub(super) fn ensure_image(c: &ComposeArgs, build: bool) -> anyhow::Result<()> {
    if docker(
        &["image", "inspect", "-f", "{{.Id}}", &c.image],
        "docker image inspect",
    )
    .is_ok()
    {
        return Ok(());
    }
    if !build {
        bail!(
            "image {} does not exist; build it with `flow-node testbed image --tag {}` (or pass --build-image)",
            c.image,
            c.image
        );
    }
    image(ImageArgs {
        binary: None,
        tag: c.image.clone(),
        models: "models/small".into(),
        keep_debug_info: false,
    })
}

pub(super) fn up_services(
    compose: &Compose,
    services: &[String],
    timeout: Duration,
) -> anyhow::Result<()> {
    compose.check_nodes(services, Path::new("the services to start"))?;
    let mut all: Vec<&str> = vec!["links"];
    all.extend(services.iter().map(String::as_str));
    let pb = ProgressBar::new_spinner().with_message(format!("starting {}", all.join(", ")));
    pb.enable_steady_tick(Duration::from_millis(200));
    let mut args = vec!["up", "-d", "--no-build"];
    args.extend(&all);
    let res = compose.run(&args, "compose up");
    pb.finish_and_clear();
    res?;
    let start = OsInstant::now();
    let pb = ProgressBar::new(all.len() as u64).with_style(ProgressStyle::with_template(
        "{msg} {bar:20} {pos}/{len} healthy",
    )?);
    loop {
        let mut healthy = 0;
        let mut waiting = Vec::new();
        let ids = compose.containers()?;
        for s in &all {
            let id = match ids.get(*s) {
                Some(id) => id.clone(),
                None => compose.container(s)?,
            };
            let h = health_of(&id);
            if h == "running/healthy" {
                healthy += 1;
            } else if h.starts_with("exited") || h.starts_with("dead") {
                bail!("{s} stopped during start-up ({h}); see `docker logs {id}`");
            } else {
                waiting.push(format!("{s}: {h}"));
            }
        }
        pb.set_position(healthy);
        pb.set_message("testbed");
        if waiting.is_empty() {
            pb.finish_and_clear();
            eprintln!(
                "testbed up: {} healthy in {:.1} s",
                all.join(", "),
                start.elapsed().as_secs_f64()
            );
            return Ok(());
        }
        if start.elapsed() > timeout {
            bail!("not healthy after {timeout:?}: {}", waiting.join(", "));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

pub fn up(a: UpArgs) -> anyhow::Result<()> {
    let compose = Compose::detect(&a.compose)?;
    ensure_image(&a.compose, a.build_image)?;
    let services = if a.services.is_empty() {
        compose.node_services()?
    } else {
        a.services
    };
    up_services(&compose, &services, Duration::from_secs(a.health_timeout_s))?;
    println!(
        "testbed {} is up; `flow-node testbed down` removes it",
        a.compose.project
    );
    Ok(())
}

/// Flags of `testbed run`.
#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Scenario file (see testbed/scenarios/): duration, topology (which nodes run), faults.
    pub scenario: PathBuf,
    #[command(flatten)]
    pub compose: ComposeArgs,
    /// Report directory. Default: target/testbed/<scenario file stem>.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// BurstGPT-format CSV trace to replay. Default: the shipped sample
    /// (testbed/traces/sample_burstgpt.csv).
    #[arg(long, conflicts_with = "synthetic")]
    pub trace: Option<PathBuf>,
    /// Generate the load instead: this many requests, Gamma inter-arrivals, Zipf lengths.
    #[arg(long)]
    pub synthetic: Option<usize>,
    /// Time compression of the trace; default: fit the trace into 80% of the run.
    #[arg(long)]
    pub speed: Option<f64>,
    /// Inference mode asked for per request: route, escalate, speculate or local.
    #[arg(long, default_value = "escalate")]
    pub mode: String,
    /// Cap of prompt tokens per request (the small family's context is 1024).
    #[arg(long, default_value_t = 192)]
    pub prompt_tokens_cap: u32,
    /// Cap of answer tokens per request.
    #[arg(long, default_value_t = 24)]
    pub max_tokens_cap: u32,
    /// A request not answered within this many seconds is an explicit `timeout` error.
    #[arg(long, default_value_t = 15.0)]
    pub timeout_s: f64,
    /// Build the image from this binary first if it does not exist.
    #[arg(long)]
    pub build_image: bool,
    /// Leave the testbed running afterwards (default: down -v, also on failure).
    #[arg(long)]
    pub keep_up: bool,
    /// Fail unless every scheduled request was answered or refused on purpose (a 4xx such
    /// as 429) — none lost, shed, hung past the client deadline, cut off or failed by the
    /// server (5xx) — and every fault was applied. CI runs with this.
    #[arg(long)]
    pub check: bool,
    /// Then replay every answered request one at a time on the healed testbed (killed
    /// nodes started again) and fail if a request answered without degradation got a
    /// different text: faults survived losslessly change no greedy answer. Writes
    /// greedy.json and reference.json beside the report.
    #[arg(long)]
    pub check_greedy: bool,
    /// Give up waiting for health checks after this many seconds.
    #[arg(long, default_value_t = 180)]
    pub health_timeout_s: u64,
}

/// Brings the testbed down when dropped (unless kept).
pub(super) struct DownGuard<'a> {
    pub compose: &'a Compose,
    pub keep: bool,
}

impl Drop for DownGuard<'_> {
    fn drop(&mut self) {
        if self.keep {
            eprintln!("testbed left running (--keep-up); `flow-node testbed down` removes it");
            return;
        }
        match self.compose.down() {
            Ok(()) => eprintln!("testbed down (containers, networks, volumes removed)"),
            Err(e) => eprintln!("warning: compose down failed: {e:#}"),
        }
    }
}

pub(super) fn unix_ms() -> anyhow::Result<u64> {
    Ok(SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis() as u64)
}

/// The trace the flags name (`--trace`, `--synthetic`, else the shipped sample) and a
/// description of it.
pub(super) fn load_trace(a: &RunArgs) -> anyhow::Result<(Trace, String)> {
    Ok(match (&a.trace, a.synthetic) {
        (Some(p), _) => (Trace::load(p)?, p.display().to_string()),
        (None, Some(n)) => {
            let cfg = SyntheticConfig {
                requests: n,
                ..Default::default()
            };
            (
                cfg.generate()?,
                format!("synthetic ({n} requests, seed {})", cfg.seed),
            )
        }
        (None, None) => {
            let p = Path::new("testbed/traces/sample_burstgpt.csv");
            (
                Trace::load(p).context(
                    "the shipped sample trace (run from the repository root, or pass --trace)",
                )?,
                p.display().to_string(),
            )
        }
    })
}

/// The open-loop schedule of a (scaled) trace, with the flags' caps.
pub(super) fn schedule_of(a: &RunArgs, trace: &Trace) -> anyhow::Result<Schedule> {
    let schedule = Schedule::from_trace(
        trace,
        &ScheduleOptions {
            max_tokens_cap: a.max_tokens_cap,
            prompt_tokens_cap: a.prompt_tokens_cap,
            failed_max_tokens: a.max_tokens_cap.min(4),
        },
    )?;
    anyhow::ensure!(
        !schedule.is_empty(),
        "the trace has no requests in the run window"
    );
    Ok(schedule)
}

fn build_schedule(a: &RunArgs, scenario: &Scenario) -> anyhow::Result<(Schedule, String)> {
    let (trace, source) = load_trace(a)?;
    let run_s = scenario.duration.as_secs_f64();
    let speed = match a.speed {
        Some(s) => s,
        None if trace.span() > 0.0 => (trace.span() / (0.8 * run_s)).max(1e-3),
        None => 1.0,
    };
    let trace = trace.speed_up(speed)?.window(0.0, 0.85 * run_s);
    Ok((schedule_of(a, &trace)?, format!("{source} ×{speed:.2}")))
}

/// Every scheduled request has exactly one record, answered or with an explicit error.
fn check_records(schedule: &Schedule, records: &[RequestRecord]) -> anyhow::Result<()> {
    let mut ids: Vec<u64> = records.iter().map(|r| r.id).collect();
    ids.sort_unstable();
    let want: Vec<u64> = schedule.requests.iter().map(|r| r.id).collect();
    anyhow::ensure!(
        ids == want,
        "lost requests: {} scheduled, {} records",
        want.len(),
        ids.len()
    );
    let shed = records
        .iter()
        .filter(|r| r.outcome == Outcome::Shed)
        .count();
    anyhow::ensure!(shed == 0, "{shed} requests were shed (never sent)");
    // Every request answered or refused on purpose (a 4xx such as 429 with Retry-After):
    // none past its deadline, none cut off, none failed by the server after admitting it.
    let mut bad: BTreeMap<String, usize> = BTreeMap::new();
    for r in records {
        let what = match (fate(&r.outcome), &r.outcome) {
            (Fate::Hung, _) => "hung past the client deadline".to_string(),
            (Fate::Broken, Outcome::Error(e)) => format!("broken ({e})"),
            (Fate::Refused, Outcome::Error(e)) if e.starts_with("HTTP 5") => {
                format!(
                    "failed by the server ({})",
                    e.chars().take(8).collect::<String>()
                )
            }
            _ => continue,
        };
        *bad.entry(what).or_default() += 1;
    }
    anyhow::ensure!(
        bad.is_empty(),
        "requests not answered: {}",
        bad.iter()
            .map(|(what, n)| format!("{n} {what}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}

pub fn run(a: RunArgs) -> anyhow::Result<()> {
    let scenario = Scenario::load(&a.scenario)?;
    let compose_args = a
        .compose
        .with_scenario(&scenario.topology.compose_overrides);
    let compose = Compose::detect(&compose_args)?;
    compose.check_nodes(&scenario.topology.nodes, &a.scenario)?;
    let devices: Vec<&String> = scenario
        .topology
        .nodes
        .iter()
        .filter(|n| n.starts_with("device"))
        .collect();
    anyhow::ensure!(
        !devices.is_empty(),
        "the topology has no device to send load to"
    );
    let (schedule, load_source) = build_schedule(&a, &scenario)?;
    let out = a.out.clone().unwrap_or_else(|| {
        let stem = a
            .scenario
            .file_stem()
            .map_or("run".into(), |s| s.to_string_lossy().to_string());
        PathBuf::from("target/testbed").join(stem)
    });
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;

    ensure_image(&a.compose, a.build_image)?;
    // a previous run that was killed may have left the project behind
    compose.down().ok();
    let guard = DownGuard {
        compose: &compose,
        keep: a.keep_up,
    };
    let result = run_inner(&a, &compose, &scenario, &schedule, &load_source, &out);
    // logs help when a node misbehaved; kept next to the report
    if let Ok(logs) = compose.run(&["logs", "--no-color", "-t"], "compose logs") {
        std::fs::write(out.join("compose.log"), logs).ok();
    }
    drop(guard);
    result
}

/// What one replay produced, collected before the testbed goes down.
pub(super) struct Replay {
    /// One record per request the load generator handled.
    pub records: Vec<RequestRecord>,
    /// The faults as they were applied.
    pub applied: Vec<AppliedEvent>,
    /// The used links' byte counters.
    pub links: Vec<LinkBytes>,
    /// The load generator's targets (the devices' APIs), in the order it was given them.
    pub targets: Vec<String>,
    /// Nodes not running when the load ended although no fault left them down (a node
    /// that exited on its own), with their container state.
    pub exited: Vec<String>,
    /// Versions of the pieces, for the report.
    pub versions: BTreeMap<String, String>,
}

fn run_inner(
    a: &RunArgs,
    compose: &Compose,
    scenario: &Scenario,
    schedule: &Schedule,
    load_source: &str,
    out: &Path,
) -> anyhow::Result<()> {
    let replay = replay(a, compose, scenario, schedule, load_source, &mut |_| {})?;
    let summary = write_run_report(scenario, &replay, out)?;
    if a.check {
        let (records, applied) = (&replay.records, &replay.applied);
        check_records(schedule, records)?;
        let failed: Vec<_> = applied.iter().filter(|e| !e.ok).collect();
        anyhow::ensure!(failed.is_empty(), "faults not applied: {failed:?}");
        anyhow::ensure!(
            applied.len() == scenario.events.len(),
            "{} of {} faults applied",
            applied.len(),
            scenario.events.len()
        );
        anyhow::ensure!(summary.answered > 0, "no request was answered");
        anyhow::ensure!(
            replay.exited.is_empty(),
            "nodes stopped on their own during the run: {} (their logs are in {})",
            replay.exited.join(", "),
            out.join("compose.log").display()
        );
        println!(
            "check passed: all {} requests answered or failed explicitly, {} faults applied",
            records.len(),
            applied.len()
        );
    }
    if a.check_greedy {
        let greedy = super::testbed_greedy::check(a, compose, scenario, schedule, &replay, out)?;
        anyhow::ensure!(greedy.passed(), "{}", greedy.describe());
    }
    Ok(())
}

/// Bring the scenario's nodes up, replay `schedule` open-loop from a shared start with the
/// faults at their times, and collect the records, the links' counters and the versions.
/// `on_start` gets the instant the load starts at, once it is fixed (the soak's sampler
/// keeps time from it).
pub(super) fn replay(
    a: &RunArgs,
    compose: &Compose,
    scenario: &Scenario,
    schedule: &Schedule,
    load_source: &str,
    on_start: &mut dyn FnMut(OsInstant),
) -> anyhow::Result<Replay> {
    up_services(
        compose,
        &scenario.topology.nodes,
        Duration::from_secs(a.health_timeout_s),
    )?;
    if a.check {
        check_isolation(compose, scenario)?;
    }
    let mut targets = Vec::new();
    for d in scenario
        .topology
        .nodes
        .iter()
        .filter(|n| n.starts_with("device"))
    {
        let ip = address_on(compose, d, "access")?;
        targets.push(format!("http://{ip}:8080"));
    }
    // the load and the faults share a wall-clock start a few seconds ahead (container start)
    let lead = Duration::from_secs(4);
    let t0_ms = unix_ms()? + lead.as_millis() as u64;
    let mut load = Loadgen::start(
        compose,
        &targets,
        &[
            "--mode".into(),
            a.mode.clone(),
            "--timeout-s".into(),
            a.timeout_s.to_string(),
            "--start-at-unix-ms".into(),
            t0_ms.to_string(),
        ],
        schedule,
    )?;

    let t0 = OsInstant::now() + lead;
    on_start(t0);
    let total = scenario.duration + Duration::from_secs_f64(a.timeout_s + 5.0);
    let pb = ProgressBar::new(scenario.duration.as_secs())
        .with_style(ProgressStyle::with_template(
            "{msg:>12} [{bar:30}] {pos}/{len} s  {wide_msg}",
        )?)
        .with_message(scenario.name.clone());
    let mut faults = Faults {
        compose,
        addresses: BTreeMap::new(),
        // looked up before the first fault is due (a miss falls back to `compose ps`)
        ids: compose.containers().unwrap_or_default(),
    };
    let mut applied = Vec::new();
    let mut pending = scenario.events.iter().peekable();
    let status = loop {
        let now = OsInstant::now().saturating_duration_since(t0);
        pb.set_position(now.as_secs().min(scenario.duration.as_secs()));
        while let Some(ev) = pending.next_if(|e| OsInstant::now() >= t0 + e.at) {
            let at = OsInstant::now().saturating_duration_since(t0).as_secs_f64();
            let res = faults.apply(ev);
            let action = action_label(&ev.action);
            let ok = res.is_ok();
            let detail = match res {
                Ok(d) => d,
                Err(e) => format!("{e:#}"),
            };
            pb.println(format!(
                "t={at:6.2}s {action} {}: {}{detail}",
                ev.target,
                if ok { "" } else { "FAILED: " }
            ));
            applied.push(AppliedEvent {
                at_s: ev.at.as_secs_f64(),
                applied_at_s: at,
                action: action.into(),
                target: ev.target.clone(),
                ok,
                detail,
            });
        }
        if let Some(st) = load.child.try_wait()? {
            if pending.peek().is_none() {
                break st;
            }
        }
        if OsInstant::now() > t0 + total {
            load.child.kill().ok();
            bail!("the load generator did not finish within {total:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    pb.finish_and_clear();
    let records = load.records(status)?;

    let links_id = compose.container("links")?;
    let stats_json = docker(
        &[
            "exec",
            &links_id,
            "/flow-node",
            "testbed",
            "link-ctl",
            "stats",
        ],
        "link-ctl stats",
    )?;
    let stats: BTreeMap<String, ShaperStats> =
        serde_json::from_str(&stats_json).context("parsing link stats")?;
    let used = |name: &str| {
        name.split_once(':').is_some_and(|(x, y)| {
            let nodes = &scenario.topology.nodes;
            nodes.iter().any(|n| n == x) && nodes.iter().any(|n| n == y)
        })
    };
    let links: Vec<LinkBytes> = stats
        .into_iter()
        .filter(|(n, _)| used(n))
        .map(|(name, stats)| LinkBytes { name, stats })
        .collect();

    let mut versions = BTreeMap::new();
    versions.insert(
        "flow-node".to_string(),
        format!(
            "{} ({})",
            env!("CARGO_PKG_VERSION"),
            if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            }
        ),
    );
    if let Ok(rev) = run_ok(
        Command::new("git").args(["rev-parse", "--short", "HEAD"]),
        "git",
    ) {
        versions.insert("git".into(), rev);
    }
    if let Ok(v) = docker(&["version", "-f", "{{.Server.Version}}"], "docker version") {
        versions.insert("docker".into(), v);
    }
    versions.insert("compose".into(), compose.version());
    if let Ok(id) = docker(
        &["image", "inspect", "-f", "{{.Id}}", &a.compose.image],
        "image id",
    ) {
        versions.insert("image".into(), format!("{} {id}", a.compose.image));
    }
    versions.insert("load".into(), load_source.to_string());
    versions.insert("mode".into(), a.mode.clone());
    let exited = exited_nodes(compose, scenario)?;
    Ok(Replay {
        records,
        applied,
        links,
        targets,
        exited,
        versions,
    })
}

/// Write `events.json` and the request report (JSON, Markdown, plots) of a replay into
/// `out`, print its summary, return it.
pub(super) fn write_run_report(
    scenario: &Scenario,
    replay: &Replay,
    out: &Path,
) -> anyhow::Result<flow_testbed::report::Summary> {
    std::fs::write(
        out.join("events.json"),
        serde_json::to_vec_pretty(&replay.applied)?,
    )?;
    let input = ReportInput {
        title: format!("testbed: {}", scenario.name),
        records: replay.records.clone(),
        links: replay.links.clone(),
        scenario: Some(scenario.clone()),
        versions: replay.versions.clone(),
    };
    let (summary, files) = write_report(out, &input)?;
    println!(
        "{}: {} requests: {} answered, {} errors, {} shed; p50 {} ms; escalated {:.0}%; degraded {}",
        scenario.name,
        summary.sent,
        summary.answered,
        summary.errored,
        summary.shed,
        summary
            .latency_ms
            .as_ref()
            .map_or("-".into(), |p| format!("{:.0}", p.p50)),
        summary.escalation_rate * 100.0,
        summary.degraded
    );
    for (e, n) in &summary.errors {
        println!("  error x{n}: {e}");
    }
    println!("report: {}", files.markdown.display());
    Ok(summary)
}

/// Devices reach their edge but not the cloud (separate networks per tier).
fn check_isolation(compose: &Compose, scenario: &Scenario) -> anyhow::Result<()> {
    let nodes = &scenario.topology.nodes;
    let (Some(device), Some(edge)) = (
        nodes.iter().find(|n| n.starts_with("device")),
        nodes.iter().find(|n| n.starts_with("edge")),
    ) else {
        return Ok(());
    };
    let probe = |to: &str| {
        let id = compose.container(device)?;
        let url = format!("http://{to}:8080/healthz");
        anyhow::Ok(
            Command::new("docker")
                .args([
                    "exec",
                    &id,
                    "/flow-node",
                    "testbed",
                    "health",
                    "--timeout-s",
                    "2",
                    &url,
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()?
                .success(),
        )
    };
    let edge_ip = address_on(compose, edge, "dev_edge")?;
    anyhow::ensure!(
        probe(&edge_ip)?,
        "{device} cannot reach {edge} at {edge_ip}"
    );
    if nodes.iter().any(|n| n == "cloud") {
        let cloud_ip = address_on(compose, "cloud", "edge_cloud")?;
        anyhow::ensure!(
            !probe(&cloud_ip)?,
            "{device} reaches the cloud at {cloud_ip}: the tier networks are not separate"
        );
    }
    eprintln!("isolation: {device} reaches {edge}, not the cloud");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lost_shed_hung_or_failed_requests_fail_the_check() {
        let sched = Schedule {
            requests: (0..3)
                .map(|i| flow_testbed::loadgen::ScheduledRequest {
                    id: i,
                    send_at: Duration::from_millis(i * 10),
                    prompt_tokens: 4,
                    max_tokens: 2,
                    session: None,
                    model: "m".into(),
                    failed_in_trace: false,
                })
                .collect(),
        };
        let rec = |id: u64, outcome: Outcome| RequestRecord {
            id,
            scheduled_ms: 0.0,
            sent_ms: Some(0.0),
            outcome,
            latency_ms: Some(1.0),
            ttft_ms: None,
            prompt_tokens: 4,
            tokens_out: 1,
            tier: None,
            escalated: false,
            degraded: false,
            text: None,
        };
        let ok = vec![
            rec(0, Outcome::Answered),
            rec(
                1,
                Outcome::Error("HTTP 429 Too Many Requests: retry".into()),
            ),
            rec(2, Outcome::Answered),
        ];
        check_records(&sched, &ok).unwrap();
        let e = check_records(&sched, &ok[..2]).unwrap_err();
        assert!(e.to_string().contains("lost"), "{e}");
        let mut shed = ok.clone();
        shed[2].outcome = Outcome::Shed;
        assert!(check_records(&sched, &shed)
            .unwrap_err()
            .to_string()
            .contains("shed"));
        // hung, cut off, or failed by the server after admission: each named and counted
        for (outcome, says) in [
            ("timeout", "1 hung"),
            ("connection reset by peer", "1 broken (connection reset"),
            (
                "HTTP 502 Bad Gateway: parent link is down",
                "1 failed by the server (HTTP 502)",
            ),
        ] {
            let mut bad = ok.clone();
            bad[1].outcome = Outcome::Error(outcome.into());
            let e = check_records(&sched, &bad).unwrap_err().to_string();
            assert!(e.contains(says), "{outcome}: {e}");
        }
    }
}
