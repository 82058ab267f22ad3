//! `flow-node bench split`: the same held-out task prompts through (a) one node hosting the
//! whole family, (b) device → edge → cloud on loopback escalating every token, (c) the same
//! cluster speculating, (d) the cluster escalating on a confidence threshold — plus two
//! diagnostic configurations that isolate the cost of one hop. Configurations alternate per
//! request so background load hits all of them alike; medians over rounds are reported.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use flow_familial::tasks::{eval_set, Task};
use flow_node::cluster::{single_node, ClusterSpec, LocalCluster};
use flow_node::engine::EngineStats;
use flow_node::{Agent, EngineConfig, GenEvent, GenerateRequest};
use flow_protocol::{InferMode, Policy, Sampling};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

/// Arguments.
#[derive(clap::Args, Debug)]
#[command(after_long_help = "\
Configurations (all greedy, same prompts, alternated per request: a b c d e f a b c ...):
  a  single       one node, whole family, local (the reference)
  b  escalate     device+edge+cloud, escalate-always (every token answered by the deepest exit)
  c  speculate    device drafts --draft-len tokens at its exit, the cloud verifies them
  d  escalate@T   device+edge+cloud, escalate when max-prob < --threshold (context)
  e  single@E     one node, layers up to the edge exit, local     (diagnostic: same compute
  f  route@E      device+edge, answered at the edge exit           as f, minus one hop)
Decode tokens/s = (generated tokens - 1) / (time of the last token - time of the first), per
round over all its requests; TTFT and total are per request. Medians over --reps rounds.
b and c must equal a token for token (DESIGN.md I2, I4); the command fails if they do not.
Targets (issue 4): b >= 0.85x a, c >= 1.0x b.

Examples:
  flow-node bench split
  flow-node bench split --requests 24 --reps 7 --json split.json")]
pub struct BenchSplitArgs {
    /// Model directory (a trained family with at least 3 exits).
    #[arg(value_parser = super::model_arg, long, default_value = "models/small")]
    pub model: PathBuf,
    /// Prompts per round (held-out add/lookup/reverse prompts, in turn).
    #[arg(long, default_value_t = 24)]
    pub requests: usize,
    /// Rounds; every prompt runs once per configuration per round.
    #[arg(long, default_value_t = 10)]
    pub reps: usize,
    /// Most tokens generated per request (generation also stops at <|eos|>).
    #[arg(long, default_value_t = 32)]
    pub max_tokens: usize,
    /// Tokens the device drafts per round in (c).
    #[arg(long, default_value_t = 4)]
    pub draft_len: u32,
    /// Confidence threshold (max softmax probability) of (d).
    #[arg(long, default_value_t = 0.9)]
    pub threshold: f32,
    /// Compute threads of each node's engine.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Tokio worker threads shared by the agents (QUIC, sessions, timers).
    #[arg(long, default_value_t = 2)]
    pub io_threads: usize,
    /// Engine fast path: steps of at most this many rows run on the calling (tokio)
    /// thread when the engine is idle, skipping two thread wake-ups per step; 0 sends
    /// every step through the engine queue (the pre-fast-path behaviour). Applies to
    /// every node alike, single nodes included, so the ratios stay fair.
    #[arg(long, default_value_t = EngineConfig::default().inline_max_rows)]
    pub inline_max_rows: usize,
    /// Wire encoding of hidden states between tiers: f32, f16, bf16 or int8.
    #[arg(long, default_value = "f32")]
    pub encoding: flow_protocol::Encoding,
    /// Also write the full results (every request) as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
enum Target {
    Single,
    SingleAtEdge,
    Cluster,
}

struct Config {
    key: &'static str,
    name: String,
    target: Target,
    policy: Policy,
    diagnostic: bool,
}

/// One request of one configuration.
#[derive(Debug, Clone, Serialize)]
pub struct RequestResult {
    pub round: usize,
    pub prompt: usize,
    pub tokens: Vec<u32>,
    pub ttft_ms: f64,
    pub total_ms: f64,
    /// First token → last token, measured where the tokens arrive.
    pub decode_ms: f64,
    pub bytes_device_edge: u64,
    pub bytes_edge_cloud: u64,
    pub hops: u32,
    pub drafts_proposed: usize,
    pub drafts_accepted: usize,
    pub tokens_per_exit: BTreeMap<String, usize>,
    pub same_as_reference: bool,
    pub agree_tokens: usize,
    pub compared_tokens: usize,
}

/// Summary of one configuration.
#[derive(Debug, Clone, Serialize)]
pub struct ConfigSummary {
    pub key: String,
    pub name: String,
    pub diagnostic: bool,
    /// Median over rounds of the round's decode tokens/s.
    pub decode_tok_s: f64,
    /// Median over rounds of (this config's decode tokens/s / a's) of the same round.
    pub ratio_vs_single: f64,
    /// Median over rounds of generated tokens / total time.
    pub e2e_tok_s: f64,
    /// Median over rounds of (e2e tokens/s / a's) of the same round.
    pub e2e_ratio_vs_single: f64,
    pub ttft_ms_p50: f64,
    pub total_ms_p50: f64,
    /// Median gap between consecutive tokens (ms).
    pub ms_per_decode_token: f64,
    pub agreement_pct: f64,
    pub requests_identical: usize,
    pub requests: usize,
    pub generated_tokens: usize,
    pub bytes_per_token_device_edge: f64,
    pub bytes_per_token_edge_cloud: f64,
    pub hops_per_token: f64,
    pub draft_acceptance: Option<f64>,
    pub tokens_per_exit: BTreeMap<String, usize>,
    pub per_round_decode_tok_s: Vec<f64>,
    pub per_round_e2e_tok_s: Vec<f64>,
}

/// Hand-offs of one engine over the measured rounds (every configuration that used it).
#[derive(Debug, Clone, Serialize)]
pub struct HandoffRow {
    pub engine: String,
    /// Steps computed on the caller's thread (engine idle, small step).
    pub inline_steps: u64,
    /// Steps that went through the queue to the engine thread.
    pub queued_steps: u64,
    /// Mean enqueue → batch start of queued steps (µs): waking the engine thread.
    pub queue_wait_us: f64,
    /// Mean answer → caller resumed of queued steps (µs): waking the caller back.
    pub wake_back_us: f64,
    /// Mean compute per step (µs, the step's batch).
    pub compute_us: f64,
}

fn handoff_row(engine: &str, before: &EngineStats, after: &EngineStats) -> HandoffRow {
    let inline = after.inline_steps - before.inline_steps;
    let queued = after.queued_steps - before.queued_steps;
    let per = |x: u64, n: u64| x as f64 / n.max(1) as f64;
    HandoffRow {
        engine: engine.into(),
        inline_steps: inline,
        queued_steps: queued,
        queue_wait_us: per(after.queue_wait_us - before.queue_wait_us, queued),
        wake_back_us: per(after.wake_back_us - before.wake_back_us, queued),
        compute_us: per(
            after.step_compute_us - before.step_compute_us,
            inline + queued,
        ),
    }
}

/// The whole run.
#[derive(Debug, Serialize)]
pub struct SplitReport {
    pub command: String,
    pub model: String,
    pub device_exit: usize,
    pub edge_exit: usize,
    pub last_exit: usize,
    pub encoding: String,
    pub requests: usize,
    pub reps: usize,
    pub max_tokens: usize,
    pub draft_len: u32,
    pub threshold: f32,
    pub threads: usize,
    pub cores: usize,
    pub loadavg_before: String,
    pub loadavg_after: String,
    pub prompts: Vec<String>,
    pub summaries: Vec<ConfigSummary>,
    /// Per-token cost of the hops, from the paired configurations (ms).
    pub hop_ms_device_edge: f64,
    pub hop_ms_edge_cloud: f64,
    pub target_b_vs_a: f64,
    pub target_b_met: bool,
    /// c vs b on generated tokens / total time (the target's measure; see the table note).
    pub target_c_vs_b: f64,
    pub c_vs_b_decode: f64,
    pub target_c_met: bool,
    pub outputs_equal: bool,
    pub inline_max_rows: usize,
    /// Per engine, over the measured rounds: how its steps were handed over.
    pub handoffs: Vec<HandoffRow>,
    pub results: BTreeMap<String, Vec<RequestResult>>,
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn median(v: &[f64]) -> f64 {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

pub fn run(a: BenchSplitArgs) -> anyhow::Result<()> {
    if a.requests == 0 || a.reps == 0 || a.max_tokens < 2 || a.threads == 0 || a.io_threads == 0 {
        bail!("--requests, --reps, --threads and --io-threads must be at least 1, --max-tokens at least 2");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(a.io_threads)
        .enable_all()
        .build()?;
    rt.block_on(bench(a))
}

/// Run one request, timing token arrivals here (where a client would see them).
async fn one(
    agent: &Agent,
    req: GenerateRequest,
) -> anyhow::Result<(Vec<u32>, f64, f64, f64, flow_node::GenStats)> {
    let t0 = tokio::time::Instant::now();
    let mut rx = agent.generate(req).await?;
    let mut toks = Vec::new();
    let (mut first, mut last) = (None, None);
    while let Some(ev) = rx.recv().await {
        match ev {
            GenEvent::Token { token, .. } => {
                let now = t0.elapsed();
                first.get_or_insert(now);
                last = Some(now);
                toks.push(token.id);
            }
            GenEvent::Done(s) => {
                let total = t0.elapsed().as_secs_f64() * 1e3;
                let f = first.unwrap_or_default();
                let l = last.unwrap_or_default();
                return Ok((
                    toks,
                    f.as_secs_f64() * 1e3,
                    total,
                    (l - f).as_secs_f64() * 1e3,
                    s,
                ));
            }
            GenEvent::Error(e) => bail!("request failed: {e}"),
        }
    }
    bail!("generation ended without a result")
}

async fn bench(a: BenchSplitArgs) -> anyhow::Result<()> {
    let dir = a.model.clone();
    let cfg = flow_familial::source::model_config(&dir)
        .with_context(|| format!("reading {} (train it or pass --model)", dir.display()))?;
    let exits = cfg.exit_points();
    let (dev_exit, edge_exit, last) = super::cluster::three_tier_exits(&exits, "bench split")?;
    let encoding = a.encoding;
    // Held-out prompts: add, lookup, reverse in turn.
    let per_task = a.requests.div_ceil(3);
    let sets: Vec<_> = Task::CONCRETE
        .iter()
        .map(|&t| eval_set(t, per_task, 0))
        .collect();
    let prompts: Vec<_> = (0..a.requests)
        .map(|i| sets[i % 3][i / 3].clone())
        .collect();
    let max_pos = cfg.max_position_embeddings;
    for p in &prompts {
        anyhow::ensure!(
            p.prompt.len() + a.max_tokens <= max_pos,
            "prompt {:?} + --max-tokens {} exceed the model's {max_pos} positions",
            p.prompt_text(),
            a.max_tokens
        );
    }
    let engine = EngineConfig {
        threads: a.threads,
        inline_max_rows: a.inline_max_rows,
        ..EngineConfig::default()
    };
    let loadavg_before = loadavg();
    let tmp = tempfile::tempdir()?;
    let sp = ProgressBar::new_spinner();
    sp.set_message(
        "starting device, edge and cloud (QUIC + mTLS on loopback) and the single nodes",
    );
    sp.enable_steady_tick(Duration::from_millis(120));
    let cluster = LocalCluster::start(ClusterSpec {
        model_dir: dir.clone(),
        declare_exits: None,
        device_exit: dev_exit,
        edge_exit,
        certs_dir: tmp.path().join("certs"),
        policy: Policy::default(),
        encoding,
        engine,
    })
    .await?;
    let local = Policy {
        mode: InferMode::Local,
        ..Policy::default()
    };
    let single = single_node(&dir, None, None, local.clone(), engine).await?;
    let single_e = single_node(&dir, None, Some(edge_exit), local.clone(), engine).await?;
    sp.finish_and_clear();

    let configs = vec![
        Config {
            key: "a",
            name: format!("single node (exit {last})"),
            target: Target::Single,
            policy: local.clone(),
            diagnostic: false,
        },
        Config {
            key: "b",
            name: "3-tier escalate-always".into(),
            target: Target::Cluster,
            policy: Policy {
                mode: InferMode::Escalate,
                default_threshold: 2.0,
                ..Policy::default()
            },
            diagnostic: false,
        },
        Config {
            key: "c",
            name: format!("3-tier speculate n={}", a.draft_len),
            target: Target::Cluster,
            policy: Policy {
                mode: InferMode::Speculate,
                draft_len: a.draft_len,
                ..Policy::default()
            },
            diagnostic: false,
        },
        Config {
            key: "d",
            name: format!("3-tier escalate @{}", a.threshold),
            target: Target::Cluster,
            policy: Policy {
                mode: InferMode::Escalate,
                default_threshold: a.threshold,
                ..Policy::default()
            },
            diagnostic: false,
        },
        Config {
            key: "e",
            name: format!("single node (exit {edge_exit})"),
            target: Target::SingleAtEdge,
            policy: local.clone(),
            diagnostic: true,
        },
        Config {
            key: "f",
            name: format!("2-tier route→exit {edge_exit}"),
            target: Target::Cluster,
            policy: Policy {
                mode: InferMode::Route,
                answer_exit: Some(edge_exit as u32),
                ..Policy::default()
            },
            diagnostic: true,
        },
    ];
    let agent_of = |t: Target| match t {
        Target::Single => &single,
        Target::SingleAtEdge => &single_e,
        Target::Cluster => &cluster.device,
    };
    let make_req = |p: &flow_familial::tasks::Example, c: &Config| GenerateRequest {
        prompt: p.prompt.clone(),
        max_new_tokens: a.max_tokens,
        sampling: Sampling::default(),
        policy: Some(c.policy.clone()),
        stop_tokens: vec![],
    };

    // Warm-up: every configuration once on the first prompts (connections, caches, pools).
    for c in &configs {
        for p in prompts.iter().take(3) {
            one(agent_of(c.target), make_req(p, c))
                .await
                .with_context(|| format!("warm-up of {}", c.name))?;
        }
    }

    let engines = [
        ("a single", &single),
        ("e single@edge", &single_e),
        ("device", &cluster.device),
        ("edge", &cluster.edge),
        ("cloud", &cluster.cloud),
    ];
    let mut stats0 = Vec::new();
    for (_, agent) in &engines {
        stats0.push(agent.engine_stats().await);
    }
    let pb = ProgressBar::new((a.reps * prompts.len() * configs.len()) as u64);
    pb.set_style(
        ProgressStyle::with_template(
            "{spinner} {bar:40} {pos}/{len} requests [{elapsed_precise}<{eta_precise}] {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut results: BTreeMap<String, Vec<RequestResult>> = BTreeMap::new();
    let mut ms_gaps: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for round in 0..a.reps {
        for (pi, p) in prompts.iter().enumerate() {
            // a is the reference of a–d; e (same exit as f) the reference of f.
            let mut refs: BTreeMap<Target, Vec<u32>> = BTreeMap::new();
            for c in &configs {
                pb.set_message(format!("round {}/{} {}", round + 1, a.reps, c.name));
                let agent = agent_of(c.target);
                let dev0 = cluster.device.metrics().bytes_up.get();
                let edge0 = cluster.edge.metrics().bytes_up.get();
                let (toks, ttft, total, decode, st) = one(agent, make_req(p, c))
                    .await
                    .with_context(|| format!("{} on prompt {:?}", c.name, p.prompt_text()))?;
                let dev1 = cluster.device.metrics().bytes_up.get();
                let edge1 = cluster.edge.metrics().bytes_up.get();
                if c.target == Target::Cluster && dev1 - dev0 != st.bytes_up {
                    pb.println(format!(
                        "note: device metrics bytes_up delta {} ≠ request bytes_up {} ({})",
                        dev1 - dev0,
                        st.bytes_up,
                        c.name
                    ));
                }
                if toks.len() > 1 {
                    ms_gaps
                        .entry(c.key.into())
                        .or_default()
                        .push(decode / (toks.len() - 1) as f64);
                }
                let ref_key = if c.key == "f" {
                    Target::SingleAtEdge
                } else {
                    Target::Single
                };
                if c.key == "a" || c.key == "e" {
                    refs.insert(c.target, toks.clone());
                }
                let want = refs.get(&ref_key).context("reference ran first")?;
                let agree = toks.iter().zip(want.iter()).filter(|(x, y)| x == y).count();
                results
                    .entry(c.key.into())
                    .or_default()
                    .push(RequestResult {
                        round,
                        prompt: pi,
                        same_as_reference: &toks == want,
                        agree_tokens: agree,
                        compared_tokens: toks.len().max(want.len()),
                        tokens: toks,
                        ttft_ms: ttft,
                        total_ms: total,
                        decode_ms: decode,
                        bytes_device_edge: st.bytes_up,
                        bytes_edge_cloud: if c.target == Target::Cluster {
                            edge1 - edge0
                        } else {
                            0
                        },
                        hops: st.hops,
                        drafts_proposed: st.drafts_proposed,
                        drafts_accepted: st.drafts_accepted,
                        tokens_per_exit: st.tokens_per_exit,
                    });
                pb.inc(1);
            }
        }
    }
    pb.finish_and_clear();
    let mut handoffs = Vec::new();
    for ((name, agent), before) in engines.iter().zip(&stats0) {
        handoffs.push(handoff_row(name, before, &agent.engine_stats().await));
    }
    let loadavg_after = loadavg();
    cluster.shutdown().await;
    single.shutdown().await;
    single_e.shutdown().await;

    // Per-round decode tokens/s of every configuration.
    let round_rate = |rs: &[RequestResult], round: usize| -> (f64, f64) {
        let (mut n, mut t, mut all, mut tot) = (0usize, 0f64, 0usize, 0f64);
        for r in rs.iter().filter(|r| r.round == round) {
            n += r.tokens.len().saturating_sub(1);
            t += r.decode_ms;
            all += r.tokens.len();
            tot += r.total_ms;
        }
        (n as f64 / (t / 1e3), all as f64 / (tot / 1e3))
    };
    let a_rates: Vec<f64> = (0..a.reps)
        .map(|r| round_rate(&results["a"], r).0)
        .collect();
    let a_e2e: Vec<f64> = (0..a.reps)
        .map(|r| round_rate(&results["a"], r).1)
        .collect();
    let mut summaries = Vec::new();
    for c in &configs {
        let rs = &results[c.key];
        let rates: Vec<(f64, f64)> = (0..a.reps).map(|r| round_rate(rs, r)).collect();
        let dec: Vec<f64> = rates.iter().map(|x| x.0).collect();
        let ratios: Vec<f64> = dec.iter().zip(&a_rates).map(|(x, y)| x / y).collect();
        let gen: usize = rs.iter().map(|r| r.tokens.len()).sum();
        let agree: usize = rs.iter().map(|r| r.agree_tokens).sum();
        let compared: usize = rs.iter().map(|r| r.compared_tokens).sum();
        let proposed: usize = rs.iter().map(|r| r.drafts_proposed).sum();
        let accepted: usize = rs.iter().map(|r| r.drafts_accepted).sum();
        let mut per_exit = BTreeMap::new();
        for r in rs {
            for (k, v) in &r.tokens_per_exit {
                *per_exit.entry(k.clone()).or_default() += v;
            }
        }
        summaries.push(ConfigSummary {
            key: c.key.into(),
            name: c.name.clone(),
            diagnostic: c.diagnostic,
            decode_tok_s: median(&dec),
            ratio_vs_single: median(&ratios),
            e2e_tok_s: median(&rates.iter().map(|x| x.1).collect::<Vec<_>>()),
            e2e_ratio_vs_single: median(
                &rates
                    .iter()
                    .zip(&a_e2e)
                    .map(|(x, y)| x.1 / y)
                    .collect::<Vec<_>>(),
            ),
            ttft_ms_p50: median(&rs.iter().map(|r| r.ttft_ms).collect::<Vec<_>>()),
            total_ms_p50: median(&rs.iter().map(|r| r.total_ms).collect::<Vec<_>>()),
            ms_per_decode_token: median(ms_gaps.get(c.key).map(|v| &v[..]).unwrap_or(&[])),
            agreement_pct: 100.0 * agree as f64 / compared.max(1) as f64,
            requests_identical: rs.iter().filter(|r| r.same_as_reference).count(),
            requests: rs.len(),
            generated_tokens: gen,
            bytes_per_token_device_edge: rs.iter().map(|r| r.bytes_device_edge).sum::<u64>() as f64
                / gen.max(1) as f64,
            bytes_per_token_edge_cloud: rs.iter().map(|r| r.bytes_edge_cloud).sum::<u64>() as f64
                / gen.max(1) as f64,
            hops_per_token: rs.iter().map(|r| r.hops as u64).sum::<u64>() as f64
                / gen.max(1) as f64,
            draft_acceptance: (proposed > 0).then(|| accepted as f64 / proposed as f64),
            tokens_per_exit: per_exit,
            per_round_decode_tok_s: dec,
            per_round_e2e_tok_s: rates.iter().map(|x| x.1).collect(),
        });
    }
    let by = |k: &str| {
        summaries
            .iter()
            .find(|s| s.key == k)
            .with_context(|| format!("no summary of configuration {k}"))
    };
    let (sa, sb, sc, se, sf) = (by("a")?, by("b")?, by("c")?, by("e")?, by("f")?);
    // Per-token hop costs from paired configurations with identical compute:
    // f − e = one device→edge hop; (b − a) − (f − e) = the edge→cloud hop.
    let hop_de = sf.ms_per_decode_token - se.ms_per_decode_token;
    let hop_ec = (sb.ms_per_decode_token - sa.ms_per_decode_token) - hop_de;
    let b_vs_a = sb.ratio_vs_single;
    // Speculation emits tokens in bursts (the first burst counts as TTFT), so its
    // first-to-last-token rate flatters it; c vs b is judged on generated tokens / total
    // time (end to end, prefill included for both), the decode ratio is reported too.
    let paired =
        |x: &[f64], y: &[f64]| median(&x.iter().zip(y).map(|(p, q)| p / q).collect::<Vec<_>>());
    let c_vs_b = paired(&sc.per_round_e2e_tok_s, &sb.per_round_e2e_tok_s);
    let c_vs_b_decode = paired(&sc.per_round_decode_tok_s, &sb.per_round_decode_tok_s);
    let outputs_equal =
        sb.requests_identical == sb.requests && sc.requests_identical == sc.requests;
    let report = SplitReport {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        model: dir.display().to_string(),
        device_exit: dev_exit,
        edge_exit,
        last_exit: last,
        encoding: encoding.name().to_string(),
        requests: a.requests,
        reps: a.reps,
        max_tokens: a.max_tokens,
        draft_len: a.draft_len,
        threshold: a.threshold,
        threads: a.threads,
        cores: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        loadavg_before,
        loadavg_after,
        prompts: prompts.iter().map(|p| p.prompt_text()).collect(),
        summaries: summaries.clone(),
        hop_ms_device_edge: hop_de,
        hop_ms_edge_cloud: hop_ec,
        target_b_vs_a: b_vs_a,
        target_b_met: b_vs_a >= 0.85,
        target_c_vs_b: c_vs_b,
        c_vs_b_decode,
        target_c_met: c_vs_b >= 1.0 && sc.requests_identical == sc.requests,
        outputs_equal,
        inline_max_rows: a.inline_max_rows,
        handoffs,
        results,
    };
    print_report(&report);
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_string_pretty(&report)? + "\n")
            .with_context(|| format!("writing {}", p.display()))?;
        eprintln!("wrote {}", p.display());
    }
    if !outputs_equal {
        bail!(
            "OUTPUTS DIFFER from the single node: escalate-always {}/{} requests identical, \
             speculate {}/{} (DESIGN.md I2/I4 require all)",
            sb.requests_identical,
            sb.requests,
            sc.requests_identical,
            sc.requests
        );
    }
    Ok(())
}

fn print_report(r: &SplitReport) {
    println!(
        "bench split — {} | device 0..{} | edge ..{} | cloud ..{} | hidden states {} | {} prompts × {} rounds, ≤{} tokens | engine threads {}, inline ≤{} rows | {} cores, load {} → {}",
        r.model,
        r.device_exit,
        r.edge_exit,
        r.last_exit,
        r.encoding,
        r.requests,
        r.reps,
        r.max_tokens,
        r.threads,
        r.inline_max_rows,
        r.cores,
        r.loadavg_before,
        r.loadavg_after
    );
    println!();
    println!(
        "| cfg | configuration | decode tok/s | × a | e2e tok/s | × a | TTFT p50 ms | total p50 ms | ms/token p50 | same as a | agree % | B/tok dev→edge | B/tok edge→cloud | hops/tok | draft accept |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for s in &r.summaries {
        println!(
            "| {}{} | {} | {:.0} | {:.2} | {:.0} | {:.2} | {:.2} | {:.2} | {:.3} | {}/{} | {:.1} | {:.0} | {:.0} | {:.2} | {} |",
            s.key,
            if s.diagnostic { "*" } else { "" },
            s.name,
            s.decode_tok_s,
            s.ratio_vs_single,
            s.e2e_tok_s,
            s.e2e_ratio_vs_single,
            s.ttft_ms_p50,
            s.total_ms_p50,
            s.ms_per_decode_token,
            s.requests_identical,
            s.requests,
            s.agreement_pct,
            s.bytes_per_token_device_edge,
            s.bytes_per_token_edge_cloud,
            s.hops_per_token,
            s.draft_acceptance
                .map(|x| format!("{:.0}%", 100.0 * x))
                .unwrap_or_else(|| "–".into()),
        );
    }
    println!(
        "decode tok/s = (tokens − 1) / (last token − first token) per round; e2e tok/s = tokens / total time per round; \
         × a = median of per-round ratios. Speculation delivers tokens in bursts, so its decode rate and ms/token flatter it: compare c on e2e."
    );
    println!("(* diagnostic: e and f do the same compute; f − e is the cost of one hop; f's agreement is vs e)");
    for s in &r.summaries {
        if s.key == "d" {
            let n: usize = s.tokens_per_exit.values().sum();
            let share: Vec<String> = s
                .tokens_per_exit
                .iter()
                .map(|(k, v)| format!("{k} {:.0}%", 100.0 * *v as f64 / n.max(1) as f64))
                .collect();
            println!("{}: tokens by tier:exit {}", s.name, share.join(", "));
        }
    }
    println!();
    println!("| engine | inline steps | queued steps | enqueue → batch start µs (mean, queued) | answer → caller resumed µs (mean, queued) | compute µs/step |");
    println!("|---|---:|---:|---:|---:|---:|");
    for h in &r.handoffs {
        println!(
            "| {} | {} | {} | {:.0} | {:.0} | {:.0} |",
            h.engine, h.inline_steps, h.queued_steps, h.queue_wait_us, h.wake_back_us, h.compute_us
        );
    }
    println!(
        "engine hand-offs over the measured rounds (every configuration that used the engine): \
         inline = computed on the caller's thread (engine idle, ≤ --inline-max-rows rows); \
         queued steps pay the two wake-ups in the last columns"
    );
    println!(
        "per-token hop cost (median gaps): device→edge {:.3} ms (f − e), edge→cloud {:.3} ms ((b − a) − (f − e))",
        r.hop_ms_device_edge, r.hop_ms_edge_cloud
    );
    println!(
        "target b ≥ 0.85× a (decode tok/s): {:.2}× — {} | target c ≥ 1.0× b with the same output (e2e tok/s): {:.2}× (decode: {:.2}×) — {}",
        r.target_b_vs_a,
        if r.target_b_met { "met" } else { "MISSED" },
        r.target_c_vs_b,
        r.c_vs_b_decode,
        if r.target_c_met { "met" } else { "MISSED" },
    );
}
