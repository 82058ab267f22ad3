//! `flow-node bench api`: what the HTTP API costs on top of the agent.
//!
//! One three-tier loopback cluster serves the API; rounds alternate between
//! - **one-token requests** (`max_tokens: 1`): an in-process `Agent::generate` loop at
//!   concurrency C versus `wrk` (a second process, Debian's `wrk`) at the same concurrency
//!   against `/v1/completions` — requests/s, p50 and p99 of each;
//! - **streaming**: S concurrent requests of T tokens, non-streamed versus SSE-streamed,
//!   client-measured end-to-end time per generated token (the median request of a round).
//!
//! Medians over rounds and the ratios are printed (and written with `--json`).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use flow_node::cluster::LocalCluster;
use flow_node::http::ApiOptions;
use flow_node::{Agent, EngineConfig, GenerateRequest};
use flow_protocol::{InferMode, Policy, Sampling};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::time::Instant;

use super::testbed_load::http_request;

/// Measure the HTTP API's overhead (needs `wrk`: `apt-get install wrk`).
#[derive(clap::Args, Debug)]
pub struct BenchApiArgs {
    /// Model directory or pulled name; default models/small.
    #[arg(long, value_parser = super::model_arg)]
    pub model: Option<PathBuf>,
    /// Concurrent one-token requests (in-process tasks and wrk connections).
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Seconds per one-token measurement.
    #[arg(long, default_value_t = 5)]
    pub seconds: u64,
    /// Concurrent requests in the streaming comparison.
    #[arg(long, default_value_t = 64)]
    pub streams: usize,
    /// Tokens per request in the streaming comparison.
    #[arg(long, default_value_t = 16)]
    pub stream_tokens: usize,
    /// Rounds; each alternates the order of what it compares.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Inference mode of every request: local (API cost against the cheapest generation),
    /// escalate, route or speculate.
    #[arg(long, default_value = "local")]
    pub mode: String,
    /// Write the results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// One-token load: throughput and latency.
#[derive(Debug, Clone, Serialize)]
struct Load {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
}

#[derive(Debug, Default, Serialize)]
struct Results {
    in_process: Vec<Load>,
    http_wrk: Vec<Load>,
    /// ms per token, per round.
    non_streamed_ms_per_token: Vec<f64>,
    streamed_ms_per_token: Vec<f64>,
}

fn quantile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1;
    v[i]
}

fn median(v: &[f64]) -> f64 {
    quantile(&mut v.to_vec(), 0.5)
}

/// C tasks calling `Agent::generate` (one token) until `secs` pass.
async fn in_process(
    agent: &Agent,
    prompt: &[u32],
    policy: &Policy,
    c: usize,
    secs: u64,
) -> anyhow::Result<Load> {
    let t0 = Instant::now();
    let end = t0 + Duration::from_secs(secs);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..c {
        let (agent, prompt, policy) = (agent.clone(), prompt.to_vec(), policy.clone());
        tasks.spawn(async move {
            let mut lat = Vec::new();
            while Instant::now() < end {
                let t = Instant::now();
                let req = GenerateRequest {
                    prompt: prompt.clone(),
                    max_new_tokens: 1,
                    sampling: Sampling::default(),
                    policy: Some(policy.clone()),
                    stop_tokens: vec![],
                };
                agent.generate_collect(req).await?;
                lat.push(t.elapsed().as_secs_f64() * 1e3);
            }
            anyhow::Ok(lat)
        });
    }
    let mut lat = Vec::new();
    while let Some(r) = tasks.join_next().await {
        lat.extend(r??);
    }
    let rps = lat.len() as f64 / t0.elapsed().as_secs_f64();
    Ok(Load {
        rps,
        p50_ms: quantile(&mut lat, 0.5),
        p99_ms: quantile(&mut lat, 0.99),
    })
}

/// `wrk`'s duration (`812.00us`, `1.23ms`, `2.01s`) in ms.
fn wrk_ms(s: &str) -> Option<f64> {
    let (num, scale) = if let Some(v) = s.strip_suffix("us") {
        (v, 1e-3)
    } else if let Some(v) = s.strip_suffix("ms") {
        (v, 1.0)
    } else if let Some(v) = s.strip_suffix('s') {
        (v, 1e3)
    } else {
        return None;
    };
    num.parse::<f64>().ok().map(|x| x * scale)
}

/// Requests/s, p50 and p99 from `wrk --latency` output.
fn parse_wrk(out: &str) -> anyhow::Result<Load> {
    let mut load = Load {
        rps: f64::NAN,
        p50_ms: f64::NAN,
        p99_ms: f64::NAN,
    };
    for line in out.lines().map(str::trim) {
        let mut f = line.split_whitespace();
        match (f.next(), f.next(), f.next()) {
            (Some("50%"), Some(v), _) => load.p50_ms = wrk_ms(v).unwrap_or(f64::NAN),
            (Some("99%"), Some(v), _) => load.p99_ms = wrk_ms(v).unwrap_or(f64::NAN),
            (Some("Requests/sec:"), Some(v), _) => load.rps = v.parse().unwrap_or(f64::NAN),
            (Some("Non-2xx"), _, _) => bail!("wrk saw error responses: {line}\n{out}"),
            _ => {}
        }
    }
    anyhow::ensure!(
        load.rps.is_finite() && load.p99_ms.is_finite(),
        "could not read wrk's output:\n{out}"
    );
    Ok(load)
}

/// `wrk` against `/v1/completions` with a one-token body.
async fn wrk(
    addr: &str,
    body: &Value,
    c: usize,
    secs: u64,
    dir: &std::path::Path,
) -> anyhow::Result<Load> {
    let script = dir.join("post.lua");
    let lua = format!(
        "wrk.method = \"POST\"\nwrk.body = {}\nwrk.headers[\"Content-Type\"] = \"application/json\"\n",
        serde_json::to_string(&body.to_string())?
    );
    std::fs::write(&script, lua)?;
    let url = format!("http://{addr}/v1/completions");
    // wrk runs as its own process; the blocking wait stays off the runtime serving it.
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("wrk")
            .args([
                "-t1",
                &format!("-c{c}"),
                &format!("-d{secs}s"),
                "--latency",
                "-s",
            ])
            .arg(&script)
            .arg(url)
            .output()
    })
    .await?
    .context("running wrk (install it: apt-get install wrk)")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    anyhow::ensure!(
        out.status.success(),
        "wrk failed: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    parse_wrk(&text)
}

/// S concurrent requests of T tokens; the median request's client-side ms per token.
async fn streams(addr: &str, body: &Value, s: usize, stream: bool) -> anyhow::Result<f64> {
    let mut body = body.clone();
    body["stream"] = json!(stream);
    if stream {
        body["stream_options"] = json!({"include_usage": true});
    }
    let url = format!("http://{addr}/v1/completions");
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..s {
        let (url, body) = (url.clone(), body.clone());
        tasks.spawn(async move {
            let t = Instant::now();
            let r = http_request(&url, Some(&body), Duration::from_secs(600)).await?;
            let ms = t.elapsed().as_secs_f64() * 1e3;
            anyhow::ensure!(
                r.status == 200,
                "HTTP {}: {}",
                r.status,
                String::from_utf8_lossy(&r.body)
            );
            let text = String::from_utf8_lossy(&r.body);
            let usage = if stream {
                text.lines()
                    .filter_map(|l| l.strip_prefix("data: "))
                    .filter_map(|d| serde_json::from_str::<Value>(d).ok())
                    .find_map(|v| v.get("usage").filter(|u| !u.is_null()).cloned())
            } else {
                serde_json::from_str::<Value>(&text)?.get("usage").cloned()
            };
            let tokens = usage
                .and_then(|u| u["completion_tokens"].as_u64())
                .context("no usage in the response")?;
            anyhow::ensure!(tokens > 0, "no tokens generated");
            anyhow::Ok(ms / tokens as f64)
        });
    }
    let mut per_token = Vec::new();
    while let Some(r) = tasks.join_next().await {
        per_token.push(r??);
    }
    Ok(median(&per_token))
}

pub fn run(a: BenchApiArgs) -> anyhow::Result<()> {
    let mode: InferMode = a.mode.parse().map_err(|e| anyhow::anyhow!("--mode: {e}"))?;
    std::process::Command::new("wrk")
        .arg("--version")
        .output()
        .context("bench api drives the API with wrk from a second process: apt-get install wrk")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let tmp = tempfile::tempdir()?;
        let cluster: LocalCluster = super::cluster::start(
            a.model.clone(),
            tmp.path(),
            flow_protocol::Encoding::F32,
            EngineConfig::default(),
        )
        .await?;
        let opts = ApiOptions {
            max_running: 4096,
            max_waiting: 4096,
            ..ApiOptions::default()
        };
        let (addr, _task, ready) =
            flow_node::http::serve_loading("127.0.0.1:0".parse()?, &opts).await?;
        let agent = cluster.device.clone();
        ready.set(agent.clone());
        let addr = addr.to_string();
        let prompt_text = "Hello, how are you?";
        let prompt = agent.encode_prompt(prompt_text)?;
        let mut policy = agent.config().default_policy.clone();
        policy.mode = mode;
        let one = json!({"prompt": prompt_text, "max_tokens": 1, "temperature": 0,
            "aiflow": {"mode": mode.as_str()}});
        let long = json!({"prompt": prompt_text, "max_tokens": a.stream_tokens, "temperature": 0,
            "aiflow": {"mode": mode.as_str()}});
        let mut res = Results::default();
        for r in 0..a.rounds {
            eprintln!("round {}/{}", r + 1, a.rounds);
            for first in [r % 2 == 0, r % 2 == 1] {
                if first {
                    res.in_process.push(
                        in_process(&agent, &prompt, &policy, a.concurrency, a.seconds).await?,
                    );
                } else {
                    res.http_wrk
                        .push(wrk(&addr, &one, a.concurrency, a.seconds, tmp.path()).await?);
                }
            }
            for stream in [r % 2 == 1, r % 2 == 0] {
                let v = streams(&addr, &long, a.streams, stream).await?;
                if stream {
                    res.streamed_ms_per_token.push(v);
                } else {
                    res.non_streamed_ms_per_token.push(v);
                }
            }
        }
        cluster.shutdown().await;
        report(&a, &res)
    })
}

fn report(a: &BenchApiArgs, res: &Results) -> anyhow::Result<()> {
    let med = |v: &[Load], f: fn(&Load) -> f64| median(&v.iter().map(f).collect::<Vec<_>>());
    let (ip, hw) = (&res.in_process, &res.http_wrk);
    println!(
        "one-token requests, concurrency {}, mode {}, median of {} rounds of {} s:",
        a.concurrency, a.mode, a.rounds, a.seconds
    );
    println!(
        "  {:<26} {:>10} {:>10} {:>10}",
        "", "req/s", "p50 ms", "p99 ms"
    );
    for (name, v) in [
        ("in-process Agent::generate", ip),
        ("HTTP (wrk, 2nd process)", hw),
    ] {
        println!(
            "  {:<26} {:>10.1} {:>10.2} {:>10.2}",
            name,
            med(v, |l| l.rps),
            med(v, |l| l.p50_ms),
            med(v, |l| l.p99_ms)
        );
    }
    println!(
        "  HTTP / in-process: {:.3}x req/s, {:.3}x p99",
        med(hw, |l| l.rps) / med(ip, |l| l.rps),
        med(hw, |l| l.p99_ms) / med(ip, |l| l.p99_ms)
    );
    let (ns, st) = (
        median(&res.non_streamed_ms_per_token),
        median(&res.streamed_ms_per_token),
    );
    println!(
        "{} concurrent requests of {} tokens: non-streamed {:.2} ms/token, SSE-streamed {:.2} ms/token ({:+.1} %)",
        a.streams,
        a.stream_tokens,
        ns,
        st,
        (st / ns - 1.0) * 100.0
    );
    if let Some(p) = &a.json {
        std::fs::write(
            p,
            serde_json::to_string_pretty(&json!({"args": format!("{a:?}"), "results": res}))?,
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_wrk_output() {
        let out = "Running 5s test @ http://127.0.0.1:1/v1/completions\n  1 threads and 8 connections\n  Latency Distribution\n     50%  812.00us\n     75%    1.10ms\n     90%    1.50ms\n     99%    2.01s\n  4000 requests in 5.00s, 1.2MB read\nRequests/sec:    800.12\nTransfer/sec:    240.00KB\n";
        let l = parse_wrk(out).expect("parses");
        assert!((l.p50_ms - 0.812).abs() < 1e-9 && (l.p99_ms - 2010.0).abs() < 1e-9);
        assert!((l.rps - 800.12).abs() < 1e-9);
        assert!(parse_wrk("Non-2xx or 3xx responses: 3\nRequests/sec: 1\n").is_err());
        assert!(parse_wrk("garbage").is_err());
    }
}
