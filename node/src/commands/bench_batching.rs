//! `flow-node bench batching`: a BurstGPT-style replay (Gamma arrivals, Zipf prompt and
//! answer lengths: mostly short prompts, a few long ones) served by one model with
//! continuous batching, chunked prefill vs prefill-first, in one run.

use std::path::{Path, PathBuf};

use anyhow::Context;
use flow_familial::config::Layout;
use flow_familial::init::{init_checkpoint, preset_config, Preset};
use flow_familial::{FamilialModel, ModelConfig};
use flow_moe::scheduler::{Policy, SchedulerConfig};
use flow_moe::serve::{measure_iteration_cost, quantile, replay, ReplayReport, ReplayRequest};
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
core sustains), chunked budget 32. Its weights are random (its text is meaningless), but
its compute is real: a 2000-token prefill costs hundreds of ms on a CPU core, the regime
chunked prefill is for (a 7B model on a GPU). The two policies must still produce
identical tokens.

Budget on a CPU: a prefill token costs a CPU about as much as a decode token (both are
compute-bound), while on a GPU decodes are memory-bound and a 256-512-token chunk rides
along almost free. So the budget that keeps a chunked iteration near a decode iteration
is tens of tokens here; with --budget 256 a chunk iteration costs as much as a short
prompt's whole prefill and chunked loses on p99 TBT.

Policies (same requests, same model, same process; alternated per --reps round):
  chunked        per iteration a token budget (--budget, or from --tbt-slo-ms): every
                 running decode, then chunks of in-progress prefills, then new requests
                 FCFS (Sarathi-Serve)
  prefill-first  whole new prompts first (decodes wait), decodes when no prompt can start
                 (vLLM without chunked prefill), prompts up to --prefill-budget per batch
TBT = time between consecutive tokens of a request (all gaps of all requests pooled);
throughput = generated tokens / wall time of the replay. Target (issue 7): chunked p99
TBT >= 2x lower than prefill-first at equal or better throughput.

--tbt-slo-ms picks the budget as Sarathi-Serve does: before the replays, time prefill
chunks of 1..128 tokens that follow the workload's longest prompt as context (the
costliest chunks it will run), fit time = fixed + per-token x tokens, and take the
largest budget predicted to fit the SLO (decodes count in the budget, one token each).

Throughput is only comparable while the server keeps up with the arrivals: the report
prints when the last request arrived and how long each policy took to drain after it.
If the drain grows to seconds, lower --rate.

Ratios: every round runs both policies back to back on the same requests, so each round
gives a p99 TBT ratio (prefill-first / chunked) and a throughput ratio (chunked /
prefill-first) measured under nearly the same machine load; the headline ratios are the
medians over rounds of those per-round ratios (robust to a round disturbed by other
load), printed with the per-round values. The table pools all rounds.

Examples:
  flow-node bench batching
  flow-node bench batching --requests 80 --rate 12 --budget 32 --json batching.json
  flow-node bench batching --preset medium
  flow-node bench batching --preset medium --tbt-slo-ms 40
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
    /// Mean arrival rate (requests/s) [default: 16; 1 with --preset medium].
    #[arg(long)]
    pub rate: Option<f64>,
    /// Longest prompt (tokens) [default: 900; 3968 with --preset medium].
    #[arg(long)]
    pub max_prompt: Option<u32>,
    /// Longest answer (tokens) [default: 64; 128 with --preset medium].
    #[arg(long)]
    pub max_new: Option<u32>,
    /// Token budget per iteration of the chunked policy [default: 64; 32 with --preset
    /// medium].
    #[arg(long, conflicts_with = "tbt_slo_ms")]
    pub budget: Option<usize>,
    /// Choose the chunked budget from this time-between-tokens SLO (ms) and the model's
    /// measured iteration cost, instead of --budget.
    #[arg(long)]
    pub tbt_slo_ms: Option<f64>,
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

/// The workload and budget after the preset's defaults are applied.
#[derive(Debug, Clone, PartialEq)]
struct Settings {
    requests: usize,
    rate: f64,
    max_prompt: u32,
    max_new: u32,
    budget: usize,
}

impl Settings {
    fn resolve(a: &BenchBatchingArgs) -> Self {
        let long = a.preset == Some(Preset::Medium);
        Settings {
            requests: a.requests.unwrap_or(if long { 48 } else { 64 }),
            rate: a.rate.unwrap_or(if long { 1.0 } else { 16.0 }),
            max_prompt: a.max_prompt.unwrap_or(if long { 3968 } else { 900 }),
            max_new: a.max_new.unwrap_or(if long { 128 } else { 64 }),
            budget: a.budget.unwrap_or(if long { 32 } else { 64 }),
        }
    }
}

#[derive(Debug, Serialize)]
struct CostReport {
    fixed_ms: f64,
    per_token_ms: f64,
    context_tokens: usize,
    /// (chunk tokens, median ms)
    samples: Vec<(usize, f64)>,
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
    /// Median over rounds of the time from the last arrival to the end of the replay: a
    /// server that keeps up drains in about one request's service time.
    drain_s: f64,
    iterations: u64,
    preemptions: u64,
    stalled_iterations: u64,
    max_batch_tokens: usize,
}

#[derive(Debug, Serialize)]
struct Report {
    model: String,
    rate: f64,
    /// Chunked token budget (given, or chosen from the TBT SLO).
    budget: usize,
    prefill_budget: usize,
    /// The SLO and the fitted iteration cost, when the budget came from --tbt-slo-ms.
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

fn workload(s: &Settings, seed: u64, max_pos: usize) -> anyhow::Result<Vec<ReplayRequest>> {
    let trace = SyntheticConfig {
        requests: s.requests,
        request_tokens: (8, s.max_prompt.max(8)),
        response_tokens: (4, s.max_new.max(4)),
        failure_rate: 0.0,
        seed,
        ..Default::default()
    }
    .generate()?
    .speed_up(s.rate)?;
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
    if let Ok(have) = ModelConfig::from_file(&dir.join("config.json")) {
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

/// Calibration chunk sizes for --tbt-slo-ms (those that fit after `context` tokens).
const SLO_CHUNKS: [usize; 6] = [1, 8, 16, 32, 64, 128];

/// The chunked budget for a TBT SLO: iteration cost measured on `model` for chunks after
/// `context` tokens of context (clamped so the largest chunk fits the positions).
fn budget_from_slo(
    model: &FamilialModel,
    point: usize,
    context: usize,
    slo_ms: f64,
) -> anyhow::Result<(usize, CostReport)> {
    let max_pos = model.config().max_position_embeddings;
    let largest = SLO_CHUNKS[SLO_CHUNKS.len() - 1];
    let context = context.min(max_pos.saturating_sub(largest));
    let (cost, samples) = measure_iteration_cost(model, point, context, &SLO_CHUNKS, 5)?;
    let budget = cost
        .budget_for(slo_ms / 1e3)
        .context("choosing the budget from --tbt-slo-ms")?;
    let report = CostReport {
        fixed_ms: cost.fixed_s * 1e3,
        per_token_ms: cost.per_token_s * 1e3,
        context_tokens: context,
        samples: samples.iter().map(|&(n, t)| (n, t * 1e3)).collect(),
    };
    Ok((budget, report))
}

fn bench(a: BenchBatchingArgs) -> anyhow::Result<()> {
    let dir = model_dir(&a)?;
    let cfg = ModelConfig::from_file(&dir.join("config.json"))
        .with_context(|| format!("reading {}/config.json", dir.display()))?;
    let model = FamilialModel::load(&dir)?;
    let point = *cfg.exit_points().last().unwrap_or(&cfg.num_layers);
    let mut set = Settings::resolve(&a);
    let reqs = workload(&set, a.seed, cfg.max_position_embeddings)?;
    let mut cost_report = None;
    if let Some(slo) = a.tbt_slo_ms {
        let longest = reqs.iter().map(|r| r.prompt.len()).max().unwrap_or(0);
        let (b, report) = budget_from_slo(&model, point, longest, slo)?;
        set.budget = b;
        cost_report = Some(report);
    }
    let prefill_budget = a
        .prefill_budget
        .unwrap_or(cfg.max_position_embeddings.max(2048));
    let policies = [
        ("chunked", Policy::Chunked, set.budget),
        ("prefill-first", Policy::PrefillFirst, prefill_budget),
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
    let last_arrival_s = reqs.last().map_or(0.0, |r| r.arrival_ms as f64 / 1e3);
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
        model: dir.display().to_string(),
        rate: set.rate,
        budget: set.budget,
        prefill_budget,
        tbt_slo_ms: a.tbt_slo_ms,
        iteration_cost: cost_report,
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
    };
    println!(
        "bench batching: {} requests ({} prompt tokens, longest {}; {} generated), {} at {} req/s, {} round(s)",
        report.requests,
        report.prompt_tokens,
        reqs.iter().map(|r| r.prompt.len()).max().unwrap_or(0),
        report.output_tokens,
        report.model,
        set.rate,
        a.reps.max(1)
    );
    if let (Some(slo), Some(c)) = (a.tbt_slo_ms, &report.iteration_cost) {
        let pts: Vec<String> = c
            .samples
            .iter()
            .map(|(n, ms)| format!("{n}: {ms:.1} ms"))
            .collect();
        println!(
            "TBT SLO {slo} ms: iteration = {:.2} ms + {:.4} ms/token (chunks after {} tokens of context; {}) -> budget {} tokens",
            c.fixed_ms,
            c.per_token_ms,
            c.context_tokens,
            pts.join(", "),
            report.budget
        );
    }
    println!(
        "chunked budget {} tokens/iteration, prefill-first up to {} prompt tokens/batch; last arrival at {:.1} s, drained after it (median): chunked {:.2} s, prefill-first {:.2} s",
        report.budget,
        report.prefill_budget,
        report.last_arrival_s,
        report.results[0].drain_s,
        report.results[1].drain_s
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
                rate: 16.0,
                max_prompt: 900,
                max_new: 64,
                budget: 64
            }
        );
        let medium = Settings::resolve(&args(&["--preset", "medium"]));
        assert_eq!((medium.max_prompt, medium.max_new), (3968, 128));
        // Explicit values win over the preset's defaults.
        let m = Settings::resolve(&args(&["--preset", "medium", "--budget", "32"]));
        assert_eq!(m.budget, 32);
        // A fixed budget and an SLO-chosen one exclude each other, as do model and preset.
        let cli = |v: &[&str]| Cli::try_parse_from(std::iter::once("b").chain(v.iter().copied()));
        assert!(cli(&["--budget", "32", "--tbt-slo-ms", "20"]).is_err());
        assert!(cli(&["--model", "x", "--preset", "medium"]).is_err());
        assert!(cli(&["--preset", "huge"]).is_err());
    }

    #[test]
    fn long_workload_fits_the_medium_positions_and_has_long_prompts() {
        let set = Settings::resolve(&args(&["--preset", "medium"]));
        let cfg = preset_config(Preset::Medium, PRESET_LAYOUT).unwrap();
        let reqs = workload(&set, 7, cfg.max_position_embeddings).unwrap();
        assert_eq!(reqs.len(), set.requests);
        assert!(reqs.iter().any(|r| r.prompt.len() >= 1000));
        assert!(reqs
            .iter()
            .all(|r| r.prompt.len() + r.max_new <= cfg.max_position_embeddings));
        // The default small model cannot take these prompts: refused, not truncated.
        assert!(workload(&set, 7, 1024).is_err());
    }

    #[test]
    fn preset_checkpoint_is_generated_once_and_reused() {
        let root = tempfile::tempdir().unwrap();
        let dir = preset_checkpoint(root.path(), Preset::Tiny).unwrap();
        let cfg = preset_config(Preset::Tiny, PRESET_LAYOUT).unwrap();
        assert_eq!(
            ModelConfig::from_file(&dir.join("config.json")).unwrap(),
            cfg
        );
        FamilialModel::load(&dir).unwrap();
        let st = dir.join("model.safetensors");
        let before = std::fs::metadata(&st).unwrap().modified().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(preset_checkpoint(root.path(), Preset::Tiny).unwrap(), dir);
        assert_eq!(std::fs::metadata(&st).unwrap().modified().unwrap(), before);
        // A damaged checkpoint (config of another size) is regenerated.
        std::fs::write(dir.join("config.json"), "{}").unwrap();
        preset_checkpoint(root.path(), Preset::Tiny).unwrap();
        assert_eq!(
            ModelConfig::from_file(&dir.join("config.json")).unwrap(),
            cfg
        );
        // No temporary directory is left behind.
        let left: Vec<_> = std::fs::read_dir(root.path()).unwrap().collect();
        assert_eq!(left.len(), 1);
    }
}
