//! `testbed run --check-greedy`: after the faulted run, replay every answered request one
//! at a time on the healed testbed (killed nodes started again, all healthy) and compare
//! the greedy texts (`flow_testbed::greedy`). A survived fault must not change an answer.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use flow_testbed::greedy::{compare, GreedyCheck};
use flow_testbed::loadgen::{Outcome, RequestRecord, Schedule};
use flow_testbed::scenario::Scenario;

use super::testbed_run::{up_services, Compose, Loadgen, Replay, RunArgs};

/// Run the reference and compare; writes `greedy.json` and `reference.json` into `out`.
pub(super) fn check(
    a: &RunArgs,
    compose: &Compose,
    scenario: &Scenario,
    schedule: &Schedule,
    replay: &Replay,
    out: &Path,
) -> anyhow::Result<GreedyCheck> {
    // killed nodes back up, every node healthy: the undisturbed testbed
    up_services(
        compose,
        &scenario.topology.nodes,
        Duration::from_secs(a.health_timeout_s),
    )?;
    let answered: Vec<u64> = replay
        .records
        .iter()
        .filter(|r| r.outcome == Outcome::Answered)
        .map(|r| r.id)
        .collect();
    let reference = Schedule {
        requests: schedule
            .requests
            .iter()
            .filter(|r| answered.contains(&r.id))
            .cloned()
            .collect(),
    };
    eprintln!(
        "greedy reference: {} answered requests again, one at a time, no faults",
        reference.len()
    );
    let records = sequential(a, compose, &replay.targets, &reference)?;
    std::fs::write(
        out.join("reference.json"),
        serde_json::to_vec_pretty(&records)?,
    )?;
    let result = compare(&replay.records, &records);
    std::fs::write(out.join("greedy.json"), serde_json::to_vec_pretty(&result)?)?;
    println!("{}", result.describe());
    Ok(result)
}

/// The load generator container with `--sequential`.
fn sequential(
    a: &RunArgs,
    compose: &Compose,
    targets: &[String],
    schedule: &Schedule,
) -> anyhow::Result<Vec<RequestRecord>> {
    let args = [
        "--sequential".into(),
        "--mode".into(),
        a.mode.clone(),
        "--timeout-s".into(),
        a.timeout_s.to_string(),
    ];
    let mut load = Loadgen::start(compose, targets, &args, schedule)?;
    let status = load.child.wait()?;
    load.records(status)
        .context("the reference run (one request at a time)")
}
