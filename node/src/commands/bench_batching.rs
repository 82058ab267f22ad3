//! `flow-node bench batching`: a BurstGPT-style replay (Gamma arrivals, Zipf prompt and
//! answer lengths: mostly short prompts, a few long ones) served by one model with
//! continuous batching, chunked prefill vs prefill-first, in one run.

use std::path::PathBuf;

use anyhow::Context;
use flow_familial::{FamilialModel, ModelConfig};
use flow_moe::scheduler::{Policy, SchedulerConfig};
use flow_moe::serve::{quantile, replay, ReplayReport, ReplayRequest};
use flow_testbed::trace::SyntheticConfig;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

/// Arguments.
#[derive(clap::Args, Debug)]
#[command(after_long_help = "\
Workload: flow-testbed's BurstGPT generator (inter-arrival Gamma(0.5, 2.0) s compressed to
--rate requests/s; prompt lengths Zipf(1.1) in [8, --max-prompt], answer lengths Zipf(1.1)
in [4, --max-new]; failed records dropped). Prompts are seeded random bytes; every answer
runs to its length (end-of-sequence ignored), greedy, at the deepest exit.

Policies (same requests, same model, same process; alternated per --reps round):
  chunked        per iteration a --budget token budget: every running decode, then chunks
                 of in-progress prefills, then new requests FCFS (Sarathi-Serve)
  prefill-first  whole new prompts first (decodes wait), decodes when no prompt can start
                 (vLLM without chunked prefill), prompts up to --prefill-budget per batch
TBT = time between consecutive tokens of a request (all gaps of all requests pooled);
throughput = generated tokens / wall time of the replay. Target (issue 7): chunked p99
TBT >= 2x lower than prefill-first at equal or better throughput.

Ratios: every round runs both policies back to back on the same requests, so each round
gives a p99 TBT ratio (prefill-first / chunked) and a throughput ratio (chunked /
prefill-first) measured under nearly the same machine load; the headline ratios are the
medians over rounds of those per-round ratios (robust to a round disturbed by other
load), printed with the per-round values. The table pools all rounds.

Examples:
  flow-node bench batching
  flow-node bench batching --requests 80 --rate 12 --budget 32 --json batching.json
At a low --rate the server is mostly idle, batches stay small and both policies look
alike; the difference shows when long prompts arrive while others decode.")]
pub struct BenchBatchingArgs {
    /// Model directory (any family; the deepest exit answers).
    #[arg(long, default_value = "models/small")]
    pub model: PathBuf,
    /// Requests in the replay.
    #[arg(long, default_value_t = 64)]
    pub requests: usize,
    /// Mean arrival rate (requests/s).
    #[arg(long, default_value_t = 16.0)]
    pub rate: f64,
    /// Longest prompt (tokens).
    #[arg(long, default_value_t = 900)]
    pub max_prompt: u32,
    /// Longest answer (tokens).
    #[arg(long, default_value_t = 64)]
    pub max_new: u32,
    /// Token budget per iteration of the chunked policy.
    #[arg(long, default_value_t = 64)]
    pub budget: usize,
    /// Most prompt tokens per prefill batch of the prefill-first policy.
    #[arg(long, default_value_t = 2048)]
    pub prefill_budget: usize,
    /// KV capacity in tokens (both policies).
    #[arg(long, default_value_t = 16384)]
    pub kv_capacity: usize,
    /// Rounds (each runs both policies); ratios are medians over rounds.
    #[arg(long, default_value_t = 7)]
    pub reps: usize,
    /// Trace seed.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Compute threads (default $RAYON_NUM_THREADS, else 1).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Also write the results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
struct PolicyResult {
    policy: String,
    tbt_p50_ms: f64,
    tbt_p99_ms: f64,
    ttft_p50_ms: f64,
    ttft_p99_ms: f64,
    throughput_tok_s: f64,
    wall_s: f64,
    iterations: u64,
    preemptions: u64,
    stalled_iterations: u64,
    max_batch_tokens: usize,
}

#[derive(Debug, Serialize)]
struct Report {
    model: String,
    requests: usize,
    prompt_tokens: usize,
    output_tokens: usize,
    results: Vec<PolicyResult>,
    /// Median over rounds of the per-round p99 TBT ratio (prefill-first / chunked).
    p99_tbt_ratio: f64,
    /// Median over rounds of the per-round throughput ratio (chunked / prefill-first).
    throughput_ratio: f64,
    round_p99_tbt_ratios: Vec<f64>,
    round_throughput_ratios: Vec<f64>,
    /// The p99 TBT ratio of all rounds pooled.
    pooled_p99_tbt_ratio: f64,
}

/// p99 of the time between tokens of one replay (all requests' gaps pooled).
fn p99_tbt(r: &ReplayReport) -> f64 {
    let tbt: Vec<f64> = r.requests.iter().flat_map(|q| q.tbt()).collect();
    quantile(&tbt, 0.99)
}

pub fn run(a: BenchBatchingArgs) -> anyhow::Result<()> {
    let threads = a.threads;
    super::calibrate::in_pool(threads, move || bench(a))
}

fn workload(a: &BenchBatchingArgs, max_pos: usize) -> anyhow::Result<Vec<ReplayRequest>> {
    let trace = SyntheticConfig {
        requests: a.requests,
        request_tokens: (8, a.max_prompt.max(8)),
        response_tokens: (4, a.max_new.max(4)),
        failure_rate: 0.0,
        seed: a.seed,
        ..Default::default()
    }
    .generate()?
    .speed_up(a.rate)?;
    let mut state = a.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut byte = || {
        // xorshift64: printable bytes, deterministic per seed.
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        32 + (state % 95) as u32
    };
    let mut out = Vec::new();
    for r in &trace.records {
        let p = r.request_tokens as usize;
        let n = r.response_tokens as usize;
        if p + n > max_pos {
            anyhow::bail!(
                "--max-prompt {} + --max-new {} exceed the model's {max_pos} positions",
                a.max_prompt,
                a.max_new
            );
        }
        out.push(ReplayRequest {
            arrival_ms: (r.timestamp * 1e3).round() as u64,
            prompt: (0..p).map(|_| byte()).collect(),
            max_new: n,
        });
    }
    Ok(out)
}

fn bench(a: BenchBatchingArgs) -> anyhow::Result<()> {
    let cfg = ModelConfig::from_file(&a.model.join("config.json"))
        .with_context(|| format!("reading {}/config.json", a.model.display()))?;
    let model = FamilialModel::load(&a.model)?;
    let point = *cfg.exit_points().last().unwrap_or(&cfg.num_layers);
    let reqs = workload(&a, cfg.max_position_embeddings)?;
    let policies = [
        ("chunked", Policy::Chunked, a.budget),
        ("prefill-first", Policy::PrefillFirst, a.prefill_budget),
    ];
    let pb = ProgressBar::new((a.reps.max(1) * policies.len()) as u64);
    pb.set_style(
        ProgressStyle::with_template(
            "{spinner} {bar:40} {pos}/{len} replays [{elapsed_precise}] {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut runs: Vec<Vec<ReplayReport>> = vec![Vec::new(); policies.len()];
    for round in 0..a.reps.max(1) {
        for (i, (name, policy, budget)) in policies.iter().enumerate() {
            pb.set_message(format!("round {} {name}", round + 1));
            let sc = SchedulerConfig {
                token_budget: *budget,
                kv_capacity: a.kv_capacity,
                policy: *policy,
            };
            runs[i].push(replay(&model, point, sc, &reqs)?);
            pb.inc(1);
        }
    }
    pb.finish_and_clear();
    // The same tokens either way: batching changes when work runs, not what it computes.
    for (r0, r1) in runs[0].iter().zip(&runs[1]) {
        for (i, (x, y)) in r0.requests.iter().zip(&r1.requests).enumerate() {
            if x.output != y.output {
                anyhow::bail!("request {i}: chunked and prefill-first outputs differ");
            }
        }
    }
    let results: Vec<PolicyResult> = policies
        .iter()
        .zip(&runs)
        .map(|((name, _, _), rs)| {
            let tbt: Vec<f64> = rs
                .iter()
                .flat_map(|r| r.requests.iter().flat_map(|q| q.tbt()))
                .collect();
            let ttft: Vec<f64> = rs
                .iter()
                .flat_map(|r| r.requests.iter().filter_map(|q| q.ttft()))
                .collect();
            let mut thr: Vec<f64> = rs.iter().map(ReplayReport::throughput).collect();
            thr.sort_by(f64::total_cmp);
            let sum = |f: fn(&ReplayReport) -> u64| rs.iter().map(f).sum::<u64>();
            PolicyResult {
                policy: name.to_string(),
                tbt_p50_ms: quantile(&tbt, 0.5) * 1e3,
                tbt_p99_ms: quantile(&tbt, 0.99) * 1e3,
                ttft_p50_ms: quantile(&ttft, 0.5) * 1e3,
                ttft_p99_ms: quantile(&ttft, 0.99) * 1e3,
                throughput_tok_s: thr[thr.len() / 2],
                wall_s: rs.iter().map(|r| r.wall_s).sum::<f64>() / rs.len() as f64,
                iterations: sum(|r| r.stats.iterations),
                preemptions: sum(|r| r.stats.preemptions),
                stalled_iterations: sum(|r| r.stats.stalled_iterations),
                max_batch_tokens: rs.iter().map(|r| r.max_batch_tokens).max().unwrap_or(0),
            }
        })
        .collect();
    let round_p99_tbt_ratios: Vec<f64> = runs[0]
        .iter()
        .zip(&runs[1])
        .map(|(c, p)| p99_tbt(p) / p99_tbt(c))
        .collect();
    let round_throughput_ratios: Vec<f64> = runs[0]
        .iter()
        .zip(&runs[1])
        .map(|(c, p)| c.throughput() / p.throughput())
        .collect();
    let report = Report {
        model: a.model.display().to_string(),
        requests: reqs.len(),
        prompt_tokens: reqs.iter().map(|r| r.prompt.len()).sum(),
        output_tokens: reqs.iter().map(|r| r.max_new).sum(),
        p99_tbt_ratio: quantile(&round_p99_tbt_ratios, 0.5),
        throughput_ratio: quantile(&round_throughput_ratios, 0.5),
        pooled_p99_tbt_ratio: results[1].tbt_p99_ms / results[0].tbt_p99_ms,
        round_p99_tbt_ratios,
        round_throughput_ratios,
        results,
    };
    println!(
        "bench batching: {} requests ({} prompt tokens, {} generated), {} at {} req/s, {} round(s)",
        report.requests,
        report.prompt_tokens,
        report.output_tokens,
        report.model,
        a.rate,
        a.reps.max(1)
    );
    println!("| policy | TBT p50 | TBT p99 | TTFT p50 | TTFT p99 | throughput | iterations | stalled | preemptions | max batch |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for r in &report.results {
        println!(
            "| {} | {:.1} ms | {:.1} ms | {:.0} ms | {:.0} ms | {:.1} tok/s | {} | {} | {} | {} |",
            r.policy,
            r.tbt_p50_ms,
            r.tbt_p99_ms,
            r.ttft_p50_ms,
            r.ttft_p99_ms,
            r.throughput_tok_s,
            r.iterations,
            r.stalled_iterations,
            r.preemptions,
            r.max_batch_tokens
        );
    }
    let fmt = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.2}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    println!(
        "p99 TBT prefill-first / chunked, median over rounds = {:.2}x (rounds: {}; pooled {:.2}x)",
        report.p99_tbt_ratio,
        fmt(&report.round_p99_tbt_ratios),
        report.pooled_p99_tbt_ratio
    );
    println!(
        "throughput chunked / prefill-first, median over rounds = {:.2}x (rounds: {})",
        report.throughput_ratio,
        fmt(&report.round_throughput_ratios)
    );
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_string_pretty(&report)? + "\n")
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}
