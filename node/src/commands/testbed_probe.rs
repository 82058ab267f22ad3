//! `flow-node testbed probe`: one reading of a node from inside its container — the node
//! process's resident memory and start time from `/proc`, and the session/KV gauges of its
//! own `/metrics` — printed as one JSON object (`flow_testbed::soak::sample::Probe`). The
//! soak runs it with `docker exec` on every node, every sample period.

use std::time::Duration;

use anyhow::Context;
use flow_testbed::soak::sample::Probe;

use super::testbed_load::http_request;

/// Flags of `testbed probe`.
#[derive(clap::Args, Debug)]
pub struct ProbeArgs {
    /// The node process (in a testbed container the node is PID 1).
    #[arg(long, default_value_t = 1)]
    pub pid: u32,
    /// The node's metrics page.
    #[arg(long, default_value = "http://127.0.0.1:8080/metrics")]
    pub url: String,
    /// Give up on the metrics page after this many seconds.
    #[arg(long, default_value_t = 3.0)]
    pub timeout_s: f64,
}

/// Read `/proc/PID/{status,stat}` and the metrics page; print the probe as JSON. Parts
/// that cannot be read are named in the probe's `error`, the command still succeeds.
pub fn probe(a: ProbeArgs) -> anyhow::Result<()> {
    let mut errors = Vec::new();
    let mut read = |file: &str| {
        let path = format!("/proc/{}/{file}", a.pid);
        std::fs::read_to_string(&path)
            .map_err(|e| errors.push(format!("{path}: {e}")))
            .ok()
    };
    let status = read("status");
    let stat = read("stat");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let timeout = Duration::from_secs_f64(a.timeout_s.max(0.01));
    let metrics = match rt.block_on(http_request(&a.url, None, timeout)) {
        Ok(r) if r.status == 200 => Some(String::from_utf8_lossy(&r.body).into_owned()),
        Ok(r) => {
            errors.push(format!("{}: HTTP {}", a.url, r.status));
            None
        }
        Err(e) => {
            errors.push(format!("{e:#}"));
            None
        }
    };
    let mut p = Probe::from_texts(status.as_deref(), stat.as_deref(), metrics.as_deref());
    if !errors.is_empty() {
        p.error = Some(errors.join("; "));
    }
    println!(
        "{}",
        serde_json::to_string(&p).context("encoding the probe")?
    );
    Ok(())
}
