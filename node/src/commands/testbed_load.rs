//! `flow-node testbed load` (open-loop load against nodes' HTTP APIs) and `testbed health`.
//!
//! The image has no curl and the workspace no HTTP client crate, so this file carries a
//! minimal HTTP/1.1 client (one request per connection, `Connection: close`, Content-Length
//! or chunked bodies) over tokio's TcpStream.

use std::collections::BTreeMap;
use std::io::Read;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use flow_testbed::loadgen::{
    run_open_loop, run_sequential, OpenLoopConfig, Reply, Schedule, ScheduledRequest,
};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest HTTP response read.
const MAX_RESPONSE: u64 = 16 << 20;

/// A parsed HTTP response.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub body: Vec<u8>,
}

/// `http://HOST:PORT/path` → (address, host header, path).
fn parse_url(url: &str) -> anyhow::Result<(String, String)> {
    let rest = url
        .strip_prefix("http://")
        .with_context(|| format!("{url:?}: only http:// URLs are supported"))?;
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    anyhow::ensure!(!host.is_empty(), "{url:?}: no host");
    Ok((host.to_string(), path.to_string()))
}

/// Decode a chunked body.
fn dechunk(mut b: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = b
            .windows(2)
            .position(|w| w == b"\r\n")
            .context("chunked body: missing chunk size line")?;
        let size_txt = std::str::from_utf8(&b[..eol])?;
        let size_txt = size_txt.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_txt, 16)
            .with_context(|| format!("chunked body: bad chunk size {size_txt:?}"))?;
        b = &b[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        anyhow::ensure!(b.len() >= size, "chunked body: truncated chunk");
        out.extend_from_slice(&b[..size]);
        b = b.get(size + 2..).unwrap_or(&[]);
    }
}

fn parse_response(raw: &[u8]) -> anyhow::Result<HttpResponse> {
    let head_end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("HTTP response without a header end")?;
    let head = std::str::from_utf8(&raw[..head_end]).context("HTTP header is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad HTTP status line {status_line:?}"))?;
    let chunked = lines.any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = &raw[head_end + 4..];
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_vec()
    };
    Ok(HttpResponse { status, body })
}

/// One HTTP/1.1 request (GET without a body, POST with a JSON body).
pub async fn http_request(
    url: &str,
    body: Option<&Value>,
    timeout: Duration,
) -> anyhow::Result<HttpResponse> {
    let (host, path) = parse_url(url)?;
    let fut = async {
        let mut s = TcpStream::connect(&host)
            .await
            .with_context(|| format!("connecting to {host}"))?;
        let req = match body {
            Some(b) => {
                let b = b.to_string();
                format!(
                    "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{b}",
                    b.len()
                )
            }
            None => format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
        };
        s.write_all(req.as_bytes()).await?;
        let mut raw = Vec::new();
        (&mut s).take(MAX_RESPONSE).read_to_end(&mut raw).await?;
        parse_response(&raw)
    };
    tokio::time::timeout(timeout, fut)
        .await
        .with_context(|| format!("{url}: no complete answer within {timeout:?}"))?
}

/// Flags of `testbed health`.
#[derive(clap::Args, Debug)]
pub struct HealthArgs {
    /// URL to probe, e.g. http://127.0.0.1:8080/healthz.
    #[arg(default_value = "http://127.0.0.1:8080/healthz")]
    pub url: String,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 3.0)]
    pub timeout_s: f64,
}

pub fn health(a: HealthArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let r = rt.block_on(http_request(
        &a.url,
        None,
        Duration::from_secs_f64(a.timeout_s.max(0.01)),
    ))?;
    anyhow::ensure!(r.status == 200, "{}: HTTP {}", a.url, r.status);
    Ok(())
}

/// Flags of `testbed load`.
#[derive(clap::Args, Debug)]
pub struct LoadArgs {
    /// Entry nodes' HTTP APIs, e.g. http://10.231.0.21:8080; repeatable. A request goes to
    /// the target its session hashes to (sessionless ones round-robin by id).
    #[arg(long = "target", required = true)]
    pub targets: Vec<String>,
    /// Inference mode asked for per request (`aiflow.mode`): route, escalate, speculate, local.
    #[arg(long, default_value = "escalate")]
    pub mode: String,
    /// A request not answered within this many seconds is recorded as an error `timeout`.
    #[arg(long, default_value_t = 20.0)]
    pub timeout_s: f64,
    /// Most requests in flight; one more is recorded as shed.
    #[arg(long, default_value_t = 128)]
    pub max_in_flight: usize,
    /// Send one request at a time, each after the previous reply, ignoring the schedule's
    /// times: the undisturbed reference that `testbed run --check-greedy` compares a
    /// faulted run's answers with.
    #[arg(long)]
    pub sequential: bool,
    /// Start at this wall-clock time (ms since the Unix epoch) so the host's fault timeline
    /// and the load share one clock. Default: now.
    #[arg(long)]
    pub start_at_unix_ms: Option<u64>,
    /// Read the schedule (JSON of flow_testbed::loadgen::Schedule) from this file instead
    /// of stdin.
    #[arg(long)]
    pub schedule: Option<std::path::PathBuf>,
}

/// A prompt of about `tokens` bytes (the byte-level family) in the trained `lookup` format.
pub fn prompt_of(id: u64, tokens: u32) -> String {
    let mut p = String::new();
    let mut k = id;
    while p.len() + 8 < tokens as usize {
        k = k
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let key = (b'a' + (k >> 33) as u8 % 26) as char;
        p.push_str(&format!("{key}={:02},", (k >> 40) % 100));
    }
    let q = (b'a' + (id % 26) as u8) as char;
    format!("{p}?{q}=")
}

/// The `Reply` of a completion response's `aiflow` object.
pub fn reply_of(v: &Value) -> Reply {
    let a = &v["aiflow"];
    let mut per_tier: BTreeMap<String, u64> = BTreeMap::new();
    if let Some(m) = a["tokens_per_exit"].as_object() {
        for (k, n) in m {
            let tier = k.split(':').next().unwrap_or(k).to_string();
            *per_tier.entry(tier).or_default() += n.as_u64().unwrap_or(0);
        }
    }
    let tier = per_tier
        .iter()
        .max_by_key(|(_, n)| **n)
        .map(|(t, _)| t.clone());
    Reply {
        ttft: a["ttft_ms"]
            .as_f64()
            .filter(|t| t.is_finite() && *t >= 0.0)
            .map(|t| Duration::from_secs_f64(t / 1000.0)),
        tokens_out: v["usage"]["completion_tokens"].as_u64().unwrap_or(0) as u32,
        // escalated = a parent tier produced tokens (a failed attempt that fell back to the
        // local exit counts as degraded, not escalated)
        escalated: per_tier.iter().any(|(t, n)| t != "device" && *n > 0),
        degraded: a["degraded_tokens"].as_u64().unwrap_or(0) > 0,
        tier,
        text: v["choices"][0]["text"].as_str().map(str::to_string),
    }
}

async fn send_one(
    url: String,
    mode: String,
    req: ScheduledRequest,
    timeout: Duration,
) -> anyhow::Result<Reply> {
    let body = json!({
        "prompt": prompt_of(req.id, req.prompt_tokens),
        "max_tokens": req.max_tokens.max(1),
        "temperature": 0.0,
        "aiflow": {"mode": mode},
    });
    let r = http_request(&url, Some(&body), timeout).await?;
    let v: Value = serde_json::from_slice(&r.body)
        .with_context(|| format!("HTTP {} with a body that is not JSON", r.status))?;
    if r.status != 200 {
        bail!(
            "HTTP {}: {}",
            r.status,
            v["error"]["message"].as_str().unwrap_or("no message")
        );
    }
    Ok(reply_of(&v))
}

fn target_of(req: &ScheduledRequest, n: usize) -> usize {
    match &req.session {
        Some(s) => {
            // FNV-1a: stable across runs and platforms
            let h = s.bytes().fold(0xcbf29ce484222325u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
            });
            (h % n as u64) as usize
        }
        None => (req.id % n as u64) as usize,
    }
}

pub fn load(a: LoadArgs) -> anyhow::Result<()> {
    let mut text = String::new();
    match &a.schedule {
        Some(p) => {
            text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?
        }
        None => {
            std::io::stdin()
                .read_to_string(&mut text)
                .context("reading the schedule from stdin")?;
        }
    }
    let schedule: Schedule = serde_json::from_str(&text).context("parsing the schedule JSON")?;
    let timeout = Duration::from_secs_f64(a.timeout_s.max(0.1));
    let targets: Vec<String> = a
        .targets
        .iter()
        .map(|t| format!("{}/v1/completions", t.trim_end_matches('/')))
        .collect();
    for t in &targets {
        parse_url(t)?;
    }
    let cfg = OpenLoopConfig {
        max_in_flight: a.max_in_flight,
        // the driver's timeout is the backstop; the HTTP timeout fires first
        request_timeout: timeout + Duration::from_secs(1),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let records = rt.block_on(async {
        if let Some(at) = a.start_at_unix_ms {
            let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis() as u64;
            tokio::time::sleep(Duration::from_millis(at.saturating_sub(now))).await;
        }
        eprintln!(
            "load: {} requests over {:.1} s to {} targets",
            schedule.len(),
            schedule
                .requests
                .last()
                .map_or(0.0, |r| r.send_at.as_secs_f64()),
            targets.len()
        );
        let n = targets.len();
        let send = |req: ScheduledRequest| {
            let url = targets[target_of(&req, n)].clone();
            send_one(url, a.mode.clone(), req, timeout)
        };
        let recs = if a.sequential {
            run_sequential(&schedule, &cfg, send).await
        } else {
            run_open_loop(&schedule, &cfg, send).await
        };
        anyhow::Ok(recs)
    })?;
    println!("{}", serde_json::to_string(&records)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_parse_plain_and_chunked() {
        let r = parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n").unwrap();
        assert_eq!((r.status, r.body.as_slice()), (200, &b"ok\n"[..]));
        let r = parse_response(
            b"HTTP/1.1 502 Bad Gateway\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!((r.status, r.body.as_slice()), (502, &b"abcde"[..]));
        assert!(parse_response(b"garbage").is_err());
        assert!(parse_url("https://x/").is_err());
    }

    #[test]
    fn replies_name_the_dominant_tier() {
        let v = json!({"usage": {"completion_tokens": 5}, "aiflow": {"tokens_per_exit":
            {"device:1": 1, "edge:5": 3, "cloud:7": 1}, "hops": 2, "degraded_tokens": 0, "ttft_ms": 12.5}});
        let r = reply_of(&v);
        assert_eq!(r.tier.as_deref(), Some("edge"));
        assert!(r.escalated && !r.degraded);
        assert_eq!(r.text, None);
        assert_eq!(r.tokens_out, 5);
        assert_eq!(r.ttft, Some(Duration::from_micros(12_500)));
        let t = reply_of(&json!({"choices": [{"text": "=42", "index": 0}]}));
        assert_eq!(t.text.as_deref(), Some("=42"));
        let v = json!({"usage": {"completion_tokens": 2}, "aiflow": {"tokens_per_exit":
            {"device:1": 2}, "hops": 0, "degraded_tokens": 2}});
        let r = reply_of(&v);
        assert_eq!(r.tier.as_deref(), Some("device"));
        assert!(!r.escalated && r.degraded);
    }

    #[test]
    fn prompts_have_the_asked_length_and_end_with_a_query() {
        for n in [1u32, 10, 100, 300] {
            let p = prompt_of(7, n);
            assert!(p.ends_with('='), "{p}");
            assert!(p.len() <= (n as usize).max(4) + 4, "{n}: {}", p.len());
        }
    }
}
