//! `flow-node bench batching`: a BurstGPT-style replay (Gamma arrivals, Zipf prompt and
//! answer lengths: mostly short prompts, a few long ones) served by one model with
//! continuous batching, chunked prefill vs prefill-first, in one run.

use std::path::{Path, PathBuf};

use anyhow::Context;
use flow_familial::config::Layout;
use flow_familial::init::{init_checkpoint, preset_config, Preset};
use flow_familial::{FamilialModel, ModelConfig};
use flow_moe::scheduler::{IterationCost, Policy, SchedulerConfig, TimeLimit};
use flow_moe::serve::{
    measure_iteration_cost, quantile, replay, time_chunks, ReplayReport, ReplayRequest,
};
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

Models: by default the trained `models/small` (hidden 128, 1024 positions) with prompts up
to 900 tokens: it prefills a 700-token prompt in a few ms, so a stall behind it costs
little. --preset medium generates (once, cached under $XDG_CACHE_HOME/aiflow or
~/.cache/aiflow) a seeded checkpoint of the `medium` preset (hidden 384, 6 layers, 4096
positions, ~10M parameters; seed 1, layout qwen2) and replays long prompts, as BurstGPT
has: prompts up to 3968 tokens, answers up to 128, 48 requests at 1 req/s (a rate one
core sustains). Its weights are random (its text is meaningless), but
its compute is real: a 2000-token prefill costs hundreds of ms on a CPU core, the regime
chunked prefill is for (a 7B model on a GPU). The two policies must still produce
identical tokens.

The chunk size comes from a time-between-tokens SLO, as in Sarathi-Serve: before the
replays, prefill chunks of 8-64 tokens are timed after 0, half and all of the workload's
longest prompt as context, and `time = fixed + per-token x tokens + per-pair x attention
pairs` is fitted (a chunk deep into a long prompt attends to every position before it,
so it costs more than the same tokens at the prompt's start). Each iteration then takes
the running decodes and as many prompt tokens as the fit predicts will keep the
iteration within the SLO. The SLO is --tbt-slo-ms, or by default --slo-factor (5) times
one decode iteration measured after the longest prompt: Sarathi-Serve's strict SLO is 5x
a decode iteration without prefill interference. --budget N instead uses a fixed N-token
budget with no time model (the scheduler before the SLO mode).

Chunk sizes on a CPU: a prefill token costs a CPU about as much as a decode token (both
are compute-bound), while on a GPU decodes are memory-bound and a 256-512-token chunk
rides along almost free. So the chunks that keep an iteration near a decode iteration are
tens of tokens here; with --budget 256 a chunk iteration costs as much as a short
prompt's whole prefill and chunked loses on p99 TBT.

Policies (same requests, same model, same process; alternated per --reps round):
  chunked        per iteration: every running decode, then chunks of in-progress
                 prefills, then new requests FCFS (Sarathi-Serve), cut to the SLO (or to
                 --budget tokens)
  prefill-first  whole new prompts first (decodes wait), decodes when no prompt can start
                 (vLLM without chunked prefill), prompts up to --prefill-budget per batch
TBT = time between consecutive tokens of a request (all gaps of all requests pooled);
throughput = generated tokens / wall time of the replay. Target (issue 7): chunked p99
TBT >= 2x lower than prefill-first at equal or better throughput.

The report says how many chunked iterations ran over the SLO (the fit's error plus
decode-only iterations, which are never cut; a prefill always advances by at least one
token, so a decode-heavy iteration can exceed it by that token).

Throughput is only comparable while the server keeps up with the arrivals: the report
prints when the last request arrived and how long each policy took to drain after it.
If the drain grows to seconds, lower --rate. --rate takes a list (--rate 1,2,3,4) to
sweep the load in one run (same requests, arrivals compressed to each rate; one
calibration); the sweep table marks the rates where both policies kept up.

Ratios: every round runs both policies back to back on the same requests, so each round
gives a p99 TBT ratio (prefill-first / chunked) and a throughput ratio (chunked /
prefill-first) measured under nearly the same machine load; the headline ratios are the
medians over rounds of those per-round ratios (robust to a round disturbed by other
load), printed with the per-round values. The table pools all rounds.

Examples:
  flow-node bench batching
  flow-node bench batching --requests 80 --rate 12 --budget 32 --json batching.json
  flow-node bench batching --preset medium
  flow-node bench batching --preset medium --rate 1,2,3,4 --reps 3
  flow-node bench batching --preset medium --tbt-slo-ms 8
  flow-node bench batching --preset medium --budget 32
At a low --rate the server is mostly idle, batches stay small and both policies look
alike; the difference shows when long prompts arrive while others decode.")]
pub struct BenchBatchingArgs {
    /// Model directory (any family; the deepest exit answers). Default: models/small.
    #[arg(long, conflicts_with = "preset")]
    pub model: Option<PathBuf>,
    /// Generate and serve a seeded checkpoint of this preset instead (`medium`: the
    /// long-prompt workload; see below). Generated once into the cache directory.
    #[arg(long, value_parser = super::model::parse_preset)]
    pub preset: Option<Preset>,
    /// Requests in the replay [default: 64; 48 with --preset medium].
    #[arg(long)]
    pub requests: Option<usize>,
    /// Mean arrival rate (requests/s); a comma-separated list sweeps the load [default:
    /// 16; 1 with --preset medium].
    #[arg(long, value_delimiter = ',')]
    pub rate: Vec<f64>,
    /// Longest prompt (tokens) [default: 900; 3968 with --preset medium].
    #[arg(long)]
    pub max_prompt: Option<u32>,
    /// Longest answer (tokens) [default: 64; 128 with --preset medium].
    #[arg(long)]
    pub max_new: Option<u32>,
    /// A fixed token budget per chunked iteration, instead of cutting chunks to the TBT
    /// SLO.
    #[arg(long, conflicts_with_all = ["tbt_slo_ms", "slo_factor"])]
    pub budget: Option<usize>,
    /// Time-between-tokens SLO (ms) the chunked iterations are cut to [default:
    /// --slo-factor x a measured decode iteration].
    #[arg(long, conflicts_with = "slo_factor")]
    pub tbt_slo_ms: Option<f64>,
    /// The default SLO as a multiple of one decode iteration after the longest prompt
    /// (Sarathi-Serve's strict SLO: 5).
    #[arg(long)]
    pub slo_factor: Option<f64>,
    /// Most prompt tokens per prefill batch of the prefill-first policy [default: the
    /// larger of 2048 and the model's positions, as vLLM requires without chunking].
    #[arg(long)]
    pub prefill_budget: Option<usize>,
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

/// The workload after the preset's defaults are applied.
#[derive(Debug, Clone, PartialEq)]
struct Settings {
    requests: usize,
    rates: Vec<f64>,
    max_prompt: u32,
    max_new: u32,
}

impl Settings {
    fn resolve(a: &BenchBatchingArgs) -> Self {
        let long = a.preset == Some(Preset::Medium);
        Settings {
            requests: a.requests.unwrap_or(if long { 48 } else { 64 }),
            rates: if a.rate.is_empty() {
                vec![if long { 1.0 } else { 16.0 }]
            } else {
                a.rate.clone()
            },
            max_prompt: a.max_prompt.unwrap_or(if long { 3968 } else { 900 }),
            max_new: a.max_new.unwrap_or(if long { 128 } else { 64 }),
        }
    }
}

/// Sarathi-Serve's strict TBT SLO: 5x a decode iteration without prefill interference.
const DEFAULT_SLO_FACTOR: f64 = 5.0;

#[derive(Debug, Clone, Serialize)]
struct CostReport {
    fixed_ms: f64,
    per_token_ms: f64,
    /// Milliseconds per attention (query, key) pair.
    per_attended_ms: f64,
    /// (context tokens, chunk tokens, median ms)
    samples: Vec<(usize, usize, f64)>,
    /// One decode after the longest prompt (the base of --slo-factor), ms.
    decode_ms: f64,
}

#[derive(Debug, Serialize)]
struct PolicyResult {
    policy: String,
    tbt_p50_ms: f64,
    tbt_p99_ms: f64,
    /// The longest gap between two tokens of a request (the worst stall).
    tbt_max_ms: f64,
    ttft_p50_ms: f64,
    ttft_p99_ms: f64,
    throughput_tok_s: f64,
    wall_s: f64,
    /// Median over rounds of the time from the last arrival to the end of the replay: a
    /// server that keeps up drains in about one request's service time.
    drain_s: f64,
    iterations: u64,
    preemptions: u64,
    stalled_iterations: u64,
    max_batch_tokens: usize,
    /// p99 of the iterations' wall times.
    iteration_p99_ms: f64,
    /// Iterations that ran longer than the TBT SLO (SLO mode only).
    iterations_over_slo: Option<u64>,
}

#[derive(Debug, Serialize)]
struct Report {
    model: String,
    rate: f64,
    /// Chunked token budget: --budget, or in SLO mode the most tokens an iteration can
    /// hold within the SLO (chunks are cut further by the time model).
    budget: usize,
    prefill_budget: usize,
    /// The TBT SLO the chunked iterations are cut to and the fitted iteration cost (SLO
    /// mode; absent with --budget).
    tbt_slo_ms: Option<f64>,
    iteration_cost: Option<CostReport>,
    /// When the last request arrived (s after the start).
    last_arrival_s: f64,
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

fn workload(
    s: &Settings,
    rate: f64,
    seed: u64,
    max_pos: usize,
) -> anyhow::Result<Vec<ReplayRequest>> {
    let trace = SyntheticConfig {
        requests: s.requests,
        request_tokens: (8, s.max_prompt.max(8)),
        response_tokens: (4, s.max_new.max(4)),
        failure_rate: 0.0,
        seed,
        ..Default::default()
    }
    .generate()?
    .speed_up(rate)?;
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
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
                s.max_prompt,
                s.max_new
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

/// Seed and layout of the checkpoints `--preset` generates.
const PRESET_SEED: u64 = 1;
const PRESET_LAYOUT: Layout = Layout::Qwen2;

/// The directory of `preset`'s generated checkpoint under `root`, named by what decides
/// its contents so a changed preset never reuses a stale checkpoint.
fn preset_dir(root: &Path, preset: Preset, cfg: &ModelConfig) -> PathBuf {
    let name = serde_json::to_value(preset)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| format!("{preset:?}").to_lowercase());
    root.join(format!(
        "{name}-h{}-l{}-p{}-{}-seed{PRESET_SEED}",
        cfg.hidden_size,
        cfg.num_layers,
        cfg.max_position_embeddings,
        PRESET_LAYOUT.model_type()
    ))
}

/// The checkpoint of `preset` under `root`, generated (seeded, into a temporary directory
/// renamed into place) unless a complete one with the same configuration is there.
fn preset_checkpoint(root: &Path, preset: Preset) -> anyhow::Result<PathBuf> {
    let cfg = preset_config(preset, PRESET_LAYOUT)?;
    let dir = preset_dir(root, preset, &cfg);
    if let Ok(have) = flow_familial::source::model_config(&dir) {
        if have == cfg && dir.join("model.safetensors").is_file() {
            return Ok(dir);
        }
    }
    std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
    let tmp = root.join(format!(".tmp-{}", std::process::id()));
    eprintln!(
        "generating the seeded {} checkpoint in {} (once) ...",
        dir.file_name().and_then(|n| n.to_str()).unwrap_or("preset"),
        root.display()
    );
    init_checkpoint(preset, PRESET_LAYOUT, PRESET_SEED, &tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    if dir.exists() {
        std::fs::remove_dir_all(&dir)
            .with_context(|| format!("removing the stale {}", dir.display()))?;
    }
    std::fs::rename(&tmp, &dir)
        .with_context(|| format!("moving {} to {}", tmp.display(), dir.display()))?;
    Ok(dir)
}

fn model_dir(a: &BenchBatchingArgs) -> anyhow::Result<PathBuf> {
    match (&a.model, a.preset) {
        (Some(m), _) => Ok(m.clone()),
        (None, Some(p)) => {
            let root = super::plan::cache_dir()
                .unwrap_or_else(|| std::env::temp_dir().join("aiflow"))
                .join("bench-models");
            preset_checkpoint(&root, p)
        }
        (None, None) => Ok(PathBuf::from("models/small")),
    }
}

/// Calibration chunk sizes (each timed after 0, half and all of the longest prompt). No
/// 1-token chunks: on a CPU a one-row iteration runs matrix-vector products, while any
/// wider batch pays the matrix-matrix kernel's packing (an iteration of 2 rows costs
/// about as much as one of 8), so the line is fitted where chunks are cut, 8 rows up.
const SLO_CHUNKS: [usize; 4] = [8, 16, 32, 64];

/// Fit the iteration cost of `model` for a workload whose longest prompt is `longest`
/// tokens (clamped so the largest chunk fits the positions).
fn calibrate(
    model: &FamilialModel,
    point: usize,
    longest: usize,
) -> anyhow::Result<(IterationCost, CostReport)> {
    let max_pos = model.config().max_position_embeddings;
    let largest = SLO_CHUNKS[SLO_CHUNKS.len() - 1];
    let deep = longest.min(max_pos.saturating_sub(largest));
    let contexts = [0, deep / 2, deep];
    let (cost, samples) = measure_iteration_cost(model, point, &contexts, &SLO_CHUNKS, 5)
        .context("measuring the iteration cost")?;
    let decode_ms = time_chunks(model, point, &[deep], &[1], 9)
        .context("timing a decode")?
        .first()
        .map_or(f64::NAN, |x| x.seconds * 1e3);
    let mut rows = Vec::with_capacity(samples.len());
    for (i, x) in samples.iter().enumerate() {
        rows.push((contexts[i / SLO_CHUNKS.len()], x.tokens, x.seconds * 1e3));
    }
    let report = CostReport {
        fixed_ms: cost.fixed_s * 1e3,
        per_token_ms: cost.per_token_s * 1e3,
        per_attended_ms: cost.per_attended_s * 1e3,
        samples: rows,
        decode_ms,
    };
    Ok((cost, report))
}

/// How the chunked policy is limited: a fixed token budget, or a time model and SLO.
struct ChunkLimit {
    budget: usize,
    time: Option<TimeLimit>,
    cost: Option<CostReport>,
}

fn chunk_limit(
    a: &BenchBatchingArgs,
    model: &FamilialModel,
    point: usize,
    longest: usize,
) -> anyhow::Result<ChunkLimit> {
    if let Some(budget) = a.budget {
        return Ok(ChunkLimit {
            budget,
            time: None,
            cost: None,
        });
    }
    let (cost, report) = calibrate(model, point, longest)?;
    let slo_ms = match (a.tbt_slo_ms, a.slo_factor) {
        (Some(ms), _) => ms,
        (None, f) => {
            let f = f.unwrap_or(DEFAULT_SLO_FACTOR);
            if !(f.is_finite() && f >= 1.0) {
                anyhow::bail!("--slo-factor {f} must be a number >= 1");
            }
            f * report.decode_ms
        }
    };
    let budget = cost
        .budget_for(slo_ms / 1e3, 0)
        .context("choosing the chunk size from the TBT SLO")?;
    Ok(ChunkLimit {
        budget,
        time: Some(TimeLimit {
            cost,
            slo_s: slo_ms / 1e3,
        }),
        cost: Some(report),
    })
}

fn bench(a: BenchBatchingArgs) -> anyhow::Result<()> {
    let dir = model_dir(&a)?;
    let cfg = flow_familial::source::model_config(&dir)
        .with_context(|| format!("reading {}/config.json", dir.display()))?;
    let model = FamilialModel::load(&dir)?;
    let point = *cfg.exit_points().last().unwrap_or(&cfg.num_layers);
    let set = Settings::resolve(&a);
    if let Some(r) = set.rates.iter().find(|r| !(r.is_finite() && **r > 0.0)) {
        anyhow::bail!("--rate {r} must be a positive number of requests per second");
    }
    let longest = workload(&set, set.rates[0], a.seed, cfg.max_position_embeddings)?
        .iter()
        .map(|r| r.prompt.len())
        .max()
        .unwrap_or(0);
    let limit = chunk_limit(&a, &model, point, longest)?;
    if let (Some(t), Some(c)) = (&limit.time, &limit.cost) {
        let pts: Vec<String> = c
            .samples
            .iter()
            .map(|(ctx, n, ms)| format!("{n}@{ctx}: {ms:.2}"))
            .collect();
        println!(
            "iteration = {:.3} ms + {:.4} ms/token + {:.2e} ms/attention pair (chunk@context: ms {}); decode after the longest prompt {:.2} ms",
            c.fixed_ms,
            c.per_token_ms,
            c.per_attended_ms,
            pts.join(", "),
            c.decode_ms
        );
        println!(
            "TBT SLO {:.2} ms{}: chunks cut to fit it (at most {} tokens per iteration)",
            t.slo_s * 1e3,
            match a.tbt_slo_ms {
                Some(_) => String::new(),
                None => format!(" = {} x decode", a.slo_factor.unwrap_or(DEFAULT_SLO_FACTOR)),
            },
            limit.budget
        );
    }
    let prefill_budget = a
        .prefill_budget
        .unwrap_or(cfg.max_position_embeddings.max(2048));
    let setup = Setup {
        a: &a,
        model: &model,
        point,
        dir: &dir,
        limit: &limit,
        prefill_budget,
    };
    let mut reports = Vec::with_capacity(set.rates.len());
    for &rate in &set.rates {
        let reqs = workload(&set, rate, a.seed, cfg.max_position_embeddings)?;
        let report = run_rate(&setup, &reqs, rate)?;
        print_report(&report, &reqs, a.reps.max(1));
        reports.push(report);
    }
    if reports.len() > 1 {
        print_sweep(&reports);
    }
    if let Some(p) = &a.json {
        let json = match reports.as_slice() {
            [one] => serde_json::to_string_pretty(one)?,
            many => serde_json::to_string_pretty(many)?,
        };
        std::fs::write(p, json + "\n").with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

/// What every rate of a run shares.
struct Setup<'a> {
    a: &'a BenchBatchingArgs,
    model: &'a FamilialModel,
    /// The exit that answers.
    point: usize,
    dir: &'a Path,
    limit: &'a ChunkLimit,
    prefill_budget: usize,
}

/// Both policies, --reps rounds, at one arrival rate.
fn run_rate(setup: &Setup<'_>, reqs: &[ReplayRequest], rate: f64) -> anyhow::Result<Report> {
    let Setup {
        a,
        model,
        point,
        dir,
        limit,
        prefill_budget,
    } = *setup;
    let policies = [
        ("chunked", Policy::Chunked, limit.budget, limit.time),
        ("prefill-first", Policy::PrefillFirst, prefill_budget, None),
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
        for (i, (name, policy, budget, time_limit)) in policies.iter().enumerate() {
            pb.set_message(format!("{rate} req/s, round {} {name}", round + 1));
            let sc = SchedulerConfig {
                token_budget: *budget,
                kv_capacity: a.kv_capacity,
                policy: *policy,
                time_limit: *time_limit,
            };
            runs[i].push(replay(model, point, sc, reqs)?);
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
    let last_arrival_s = reqs.last().map_or(0.0, |r| r.arrival_ms as f64 / 1e3);
    let slo_s = limit.time.map(|t| t.slo_s);
    let results: Vec<PolicyResult> = policies
        .iter()
        .zip(&runs)
        .map(|((name, _, _, time_limit), rs)| {
            let tbt: Vec<f64> = rs
                .iter()
                .flat_map(|r| r.requests.iter().flat_map(|q| q.tbt()))
                .collect();
            let ttft: Vec<f64> = rs
                .iter()
                .flat_map(|r| r.requests.iter().filter_map(|q| q.ttft()))
                .collect();
            let iters: Vec<f64> = rs.iter().flat_map(|r| r.iteration_s.clone()).collect();
            let mut thr: Vec<f64> = rs.iter().map(ReplayReport::throughput).collect();
            thr.sort_by(f64::total_cmp);
            let sum = |f: fn(&ReplayReport) -> u64| rs.iter().map(f).sum::<u64>();
            PolicyResult {
                policy: name.to_string(),
                tbt_p50_ms: quantile(&tbt, 0.5) * 1e3,
                tbt_p99_ms: quantile(&tbt, 0.99) * 1e3,
                tbt_max_ms: tbt.iter().copied().fold(0.0, f64::max) * 1e3,
                ttft_p50_ms: quantile(&ttft, 0.5) * 1e3,
                ttft_p99_ms: quantile(&ttft, 0.99) * 1e3,
                throughput_tok_s: thr[thr.len() / 2],
                wall_s: rs.iter().map(|r| r.wall_s).sum::<f64>() / rs.len() as f64,
                drain_s: quantile(
                    &rs.iter()
                        .map(|r| r.wall_s - last_arrival_s)
                        .collect::<Vec<_>>(),
                    0.5,
                ),
                iterations: sum(|r| r.stats.iterations),
                preemptions: sum(|r| r.stats.preemptions),
                stalled_iterations: sum(|r| r.stats.stalled_iterations),
                max_batch_tokens: rs.iter().map(|r| r.max_batch_tokens).max().unwrap_or(0),
                iteration_p99_ms: quantile(&iters, 0.99) * 1e3,
                iterations_over_slo: time_limit
                    .and(slo_s)
                    .map(|slo| iters.iter().filter(|&&t| t > slo).count() as u64),
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
    Ok(Report {
        model: dir.display().to_string(),
        rate,
        budget: limit.budget,
        prefill_budget,
        tbt_slo_ms: slo_s.map(|s| s * 1e3),
        iteration_cost: limit.cost.clone(),
        last_arrival_s,
        requests: reqs.len(),
        prompt_tokens: reqs.iter().map(|r| r.prompt.len()).sum(),
        output_tokens: reqs.iter().map(|r| r.max_new).sum(),
        p99_tbt_ratio: quantile(&round_p99_tbt_ratios, 0.5),
        throughput_ratio: quantile(&round_throughput_ratios, 0.5),
        pooled_p99_tbt_ratio: results[1].tbt_p99_ms / results[0].tbt_p99_ms,
        round_p99_tbt_ratios,
        round_throughput_ratios,
        results,
    })
}

fn fmt_ratios(v: &[f64]) -> String {
    v.iter()
        .map(|x| format!("{x:.2}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn print_report(report: &Report, reqs: &[ReplayRequest], reps: usize) {
    println!(
        "\nbench batching: {} requests ({} prompt tokens, longest {}; {} generated), {} at {} req/s, {} round(s)",
        report.requests,
        report.prompt_tokens,
        reqs.iter().map(|r| r.prompt.len()).max().unwrap_or(0),
        report.output_tokens,
        report.model,
        report.rate,
        reps
    );
    let chunked = match report.tbt_slo_ms {
        Some(slo) => format!("chunked to a {slo:.2} ms SLO"),
        None => format!("chunked budget {} tokens/iteration", report.budget),
    };
    println!(
        "{chunked}, prefill-first up to {} prompt tokens/batch; last arrival at {:.1} s, drained after it (median): chunked {:.2} s, prefill-first {:.2} s",
        report.prefill_budget,
        report.last_arrival_s,
        report.results[0].drain_s,
        report.results[1].drain_s
    );
    println!("| policy | TBT p50 | TBT p99 | TBT max | TTFT p50 | TTFT p99 | throughput | iterations | iteration p99 | over SLO | stalled | preemptions | max batch |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in &report.results {
        println!(
            "| {} | {:.1} ms | {:.1} ms | {:.0} ms | {:.0} ms | {:.0} ms | {:.1} tok/s | {} | {:.1} ms | {} | {} | {} | {} |",
            r.policy,
            r.tbt_p50_ms,
            r.tbt_p99_ms,
            r.tbt_max_ms,
            r.ttft_p50_ms,
            r.ttft_p99_ms,
            r.throughput_tok_s,
            r.iterations,
            r.iteration_p99_ms,
            r.iterations_over_slo
                .map_or_else(|| "-".to_string(), |n| n.to_string()),
            r.stalled_iterations,
            r.preemptions,
            r.max_batch_tokens
        );
    }
    println!(
        "p99 TBT prefill-first / chunked, median over rounds = {:.2}x (rounds: {}; pooled {:.2}x)",
        report.p99_tbt_ratio,
        fmt_ratios(&report.round_p99_tbt_ratios),
        report.pooled_p99_tbt_ratio
    );
    println!(
        "throughput chunked / prefill-first, median over rounds = {:.2}x (rounds: {})",
        report.throughput_ratio,
        fmt_ratios(&report.round_throughput_ratios)
    );
}

/// Both policies kept up with the arrivals: each drained within half a second of the last
/// arrival and their throughputs are within 1% (then throughput is set by the arrivals).
fn kept_up(r: &Report) -> bool {
    r.results.iter().all(|p| p.drain_s <= 0.5) && (0.99..=1.01).contains(&r.throughput_ratio)
}

fn print_sweep(reports: &[Report]) {
    println!("\nload sweep (kept up = both policies drained within 0.5 s of the last arrival at throughput ratio 0.99-1.01):");
    println!("| rate | chunked p99 TBT | prefill-first p99 TBT | p99 ratio (rounds) | throughput ratio | drains | kept up |");
    println!("|---:|---:|---:|---|---:|---|---|");
    for r in reports {
        println!(
            "| {} req/s | {:.1} ms | {:.1} ms | {:.2}x ({}) | {:.2}x | {:.2} / {:.2} s | {} |",
            r.rate,
            r.results[0].tbt_p99_ms,
            r.results[1].tbt_p99_ms,
            r.p99_tbt_ratio,
            fmt_ratios(&r.round_p99_tbt_ratios),
            r.throughput_ratio,
            r.results[0].drain_s,
            r.results[1].drain_s,
            if kept_up(r) { "yes" } else { "no" }
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        a: BenchBatchingArgs,
    }

    fn args(v: &[&str]) -> BenchBatchingArgs {
        Cli::try_parse_from(std::iter::once("bench").chain(v.iter().copied()))
            .unwrap()
            .a
    }

    #[test]
    fn medium_preset_defaults_to_the_long_prompt_workload() {
        let small = Settings::resolve(&args(&[]));
        assert_eq!(
            small,
            Settings {
                requests: 64,
                rates: vec![16.0],
                max_prompt: 900,
                max_new: 64,
            }
        );
        let medium = Settings::resolve(&args(&["--preset", "medium"]));
        assert_eq!((medium.max_prompt, medium.max_new), (3968, 128));
        assert_eq!(medium.rates, [1.0]);
        // Explicit values win over the preset's defaults; --rate takes a sweep.
        let m = Settings::resolve(&args(&["--preset", "medium", "--rate", "1,2.5,4"]));
        assert_eq!(m.rates, [1.0, 2.5, 4.0]);
        // A fixed budget and an SLO exclude each other, as do model and preset.
        let cli = |v: &[&str]| Cli::try_parse_from(std::iter::once("b").chain(v.iter().copied()));
        assert!(cli(&["--budget", "32", "--tbt-slo-ms", "20"]).is_err());
        assert!(cli(&["--budget", "32", "--slo-factor", "5"]).is_err());
        assert!(cli(&["--tbt-slo-ms", "8", "--slo-factor", "5"]).is_err());
        assert!(cli(&["--model", "x", "--preset", "medium"]).is_err());
        assert!(cli(&["--preset", "huge"]).is_err());
    }

    #[test]
    fn long_workload_fits_the_medium_positions_and_has_long_prompts() {
        let set = Settings::resolve(&args(&["--preset", "medium"]));
        let cfg = preset_config(Preset::Medium, PRESET_LAYOUT).unwrap();
        let reqs = workload(&set, 1.0, 7, cfg.max_position_embeddings).unwrap();
        assert_eq!(reqs.len(), set.requests);
        assert!(reqs.iter().any(|r| r.prompt.len() >= 1000));
        assert!(reqs
            .iter()
            .all(|r| r.prompt.len() + r.max_new <= cfg.max_position_embeddings));
        // The default small model cannot take these prompts: refused, not truncated.
        assert!(workload(&set, 1.0, 7, 1024).is_err());
    }

    #[test]
    fn preset_checkpoint_is_generated_once_and_reused() {
        let root = tempfile::tempdir().unwrap();
        let dir = preset_checkpoint(root.path(), Preset::Tiny).unwrap();
        let cfg = preset_config(Preset::Tiny, PRESET_LAYOUT).unwrap();
        assert_eq!(flow_familial::source::model_config(&dir).unwrap(), cfg);
        FamilialModel::load(&dir).unwrap();
        let st = dir.join("model.safetensors");
        let before = std::fs::metadata(&st).unwrap().modified().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(preset_checkpoint(root.path(), Preset::Tiny).unwrap(), dir);
        assert_eq!(std::fs::metadata(&st).unwrap().modified().unwrap(), before);
        // A damaged checkpoint (config of another size) is regenerated.
        std::fs::write(dir.join("config.json"), "{}").unwrap();
        preset_checkpoint(root.path(), Preset::Tiny).unwrap();
        assert_eq!(flow_familial::source::model_config(&dir).unwrap(), cfg);
        // No temporary directory is left behind.
        let left: Vec<_> = std::fs::read_dir(root.path()).unwrap().collect();
        assert_eq!(left.len(), 1);
    }
}
