//! `flow-node plan`: where to cut the family across device, edge and cloud.
//!
//! Builds a `flow_partition::PlanInput` from
//! - the model shape (`config.json`: layers, hidden size, exits mapped to planner depths,
//!   see [`super::calibrate::planner_depths`]);
//! - a per-layer / per-exit compute profile of *this* machine from a short self-benchmark
//!   (decode steps at three context lengths, prefills of three lengths, each block timed on
//!   its own with the real `FamilialModel` parts), cached on disk under its `ProfileKey`;
//!   the device is this machine slowed down by `--device-slowdown`, the edge is this
//!   machine, the cloud this machine sped up by `--cloud-speedup`;
//! - fixed link estimates from the flags;
//! - per-exit agreement curves from `DIR/aiflow_calibration.json`, or from a small
//!   calibration run on the fly when the file is absent;
//!
//! and prints the adaptive plan next to cloud-only, device-only and the best static split.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use flow_familial::confidence::{Confidence, Measure};
use flow_familial::config::ExitBlock;
use flow_familial::tasks::Task;
use flow_familial::weights::Checkpoint;
use flow_familial::{FamilialModel, ModelConfig, Part, Rows, Seg, SeqCache};
use flow_partition::planner::{ExitSpec, ModelShape, TierRole, TierSpec};
use flow_partition::profile::{BlockSamples, ProfileSamples, Sample};
use flow_partition::{
    best_static_split, cloud_only, device_only, fit_node_profile, plan, Bound, BoundKind,
    CalibrationConfig, LinkEstimate, NodeProfile, Plan, PlanInput, PlannerConfig, ProfileKey,
};
use serde::Serialize;

use super::calibrate::{self, CalibrationFile};
use super::OsInstant;

/// Version of the self-benchmark; part of the cache file name, bump when it changes.
const BENCH_VERSION: &str = "v1";

fn parse_positive(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .parse()
        .map_err(|e| format!("`{s}` is not a number: {e}"))?;
    if v.is_finite() && v > 0.0 {
        Ok(v)
    } else {
        Err(format!("must be a positive number, got {v}"))
    }
}

fn parse_non_negative(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .parse()
        .map_err(|e| format!("`{s}` is not a number: {e}"))?;
    if v.is_finite() && v >= 0.0 {
        Ok(v)
    } else {
        Err(format!("must be a number >= 0, got {v}"))
    }
}

fn parse_target(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .parse()
        .map_err(|e| format!("`{s}` is not a number: {e}"))?;
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("must be in [0, 1], got {v}"))
    }
}

#[derive(clap::Args, Debug)]
#[command(before_long_help = "\
Plan where to cut a familial model across device -> edge -> cloud, and when to escalate.

The planner (flow-partition) searches every split of the trunk layers over the three tiers,
every deciding exit and threshold, and predicts the expected latency per generated token:
compute of each tier weighted by the probability a token reaches it, plus one link round
trip and transfer for every token that crosses a link. It keeps the fastest plan whose
predicted agreement with the deepest exit meets --target.

Inputs:
  compute   a short self-benchmark of this machine (each layer, exit block and head timed
            on its own, decode at 3 context lengths, prefill at 3 lengths), cached under
            $XDG_CACHE_HOME/aiflow (or ~/.cache/aiflow), keyed by model fingerprint + CPU.
            device = this machine x --device-slowdown; edge = this machine;
            cloud = this machine / --cloud-speedup.
  links     device->edge: --device-mbit, --device-rtt-ms; edge->cloud: --cloud-mbit,
            --cloud-rtt-ms (fixed estimates; the agent uses live QUIC measurements).
  accuracy  per-exit agreement-vs-threshold curves from DIR/aiflow_calibration.json
            (`flow-node model calibrate DIR --write`); without it, a small calibration
            (100 examples per task of `mix`, max_prob, Clopper-Pearson delta 0.1) runs first.

Exits are named by planner depth: the trunk layers a tier hosts before the exit decides
(an exit with its own block at point E has depth E; the deepest exit has depth = layers).")]
#[command(after_long_help = "\
Examples:
  flow-node plan --model models/small --explain
  flow-node plan --model models/small --device-mbit 1 --explain      # a poor uplink
  flow-node plan --model models/small --device-slowdown 20 --json    # a very slow device

Output: the adaptive plan as one line (tier layer ranges, `>f32>` = hidden states in f32 on
that link, `>ids>` = token ids, `[exit D >= T]` = answers at exit depth D when confidence
>= T, else escalates), then cloud-only, device-only and the best static split (no early
exit) with their predicted ms/token and agreement. --explain adds per-tier and per-link
predictions and the rejected alternatives with the reason each lost.")]
pub struct PlanArgs {
    /// Checkpoint directory of the family.
    #[arg(long, default_value = "models/small")]
    pub model: PathBuf,
    /// Device->edge goodput (Mbit/s).
    #[arg(long, default_value = "10", value_parser = parse_positive)]
    pub device_mbit: f64,
    /// Device->edge round-trip time (ms).
    #[arg(long, default_value = "20", value_parser = parse_non_negative)]
    pub device_rtt_ms: f64,
    /// Edge->cloud goodput (Mbit/s).
    #[arg(long, default_value = "100", value_parser = parse_positive)]
    pub cloud_mbit: f64,
    /// Edge->cloud round-trip time (ms).
    #[arg(long, default_value = "40", value_parser = parse_non_negative)]
    pub cloud_rtt_ms: f64,
    /// How much slower the device computes than this machine.
    #[arg(long, default_value = "4", value_parser = parse_positive)]
    pub device_slowdown: f64,
    /// How much faster the cloud computes than this machine.
    #[arg(long, default_value = "4", value_parser = parse_positive)]
    pub cloud_speedup: f64,
    /// Device memory for weights and KV caches (MiB).
    #[arg(long, default_value = "512", value_parser = parse_positive)]
    pub device_memory_mib: f64,
    /// Required predicted agreement with the deepest exit.
    #[arg(long, default_value = "0.97", value_parser = parse_target)]
    pub target: f64,
    /// Prompt tokens of the planned-for request.
    #[arg(long, default_value_t = 128)]
    pub prompt_tokens: u32,
    /// Generated tokens of the planned-for request (>= 1): the expected count, not the cap
    /// (requests that stop at end-of-sequence generate fewer). The prompt's prefill is
    /// amortised over it.
    #[arg(long, default_value_t = 128)]
    pub gen_tokens: u32,
    /// Calibration file (default: MODEL/aiflow_calibration.json).
    #[arg(long, value_name = "FILE")]
    pub calibration: Option<PathBuf>,
    /// Print the full explanation (per tier, per link, rejected alternatives).
    #[arg(long)]
    pub explain: bool,
    /// Print JSON (inputs and the four plans) instead of text.
    #[arg(long)]
    pub json: bool,
    /// Neither read nor write the profile cache: always run the self-benchmark.
    #[arg(long)]
    pub no_cache: bool,
    /// Compute threads for the self-benchmark (default: $RAYON_NUM_THREADS, else 1).
    #[arg(long)]
    pub threads: Option<usize>,
}

/// What `--json` prints.
#[derive(Serialize)]
struct Report {
    profile_source: String,
    accuracy_source: String,
    input: PlanInput,
    adaptive: Plan,
    cloud_only: Plan,
    device_only: Option<Plan>,
    best_static_split: Option<Plan>,
}

pub fn run(a: PlanArgs) -> anyhow::Result<()> {
    if a.gen_tokens == 0 {
        bail!("--gen-tokens must be at least 1");
    }
    let threads = a.threads;
    calibrate::in_pool(threads, move || run_in_pool(a))
}

fn run_in_pool(a: PlanArgs) -> anyhow::Result<()> {
    let (input, profile_source, accuracy_source) = planner_input(&a)?;
    let adaptive = plan(&input).context("planning")?;
    let cloud = cloud_only(&input).context("planning cloud-only")?;
    // These two can be infeasible (memory, accuracy); report why instead of failing.
    let device = device_only(&input);
    let fixed = best_static_split(&input);
    if a.json {
        let report = Report {
            profile_source,
            accuracy_source,
            input,
            adaptive,
            cloud_only: cloud,
            device_only: device.ok(),
            best_static_split: fixed.ok(),
        };
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let fingerprint = &input.tiers[0].profile.key.model_fingerprint;
    println!(
        "model {} ({} layers, hidden {}, exit depths {:?}), fingerprint {fingerprint}",
        a.model.display(),
        input.model.num_layers,
        input.model.hidden_size,
        input
            .model
            .exits
            .iter()
            .map(|e| e.depth)
            .collect::<Vec<_>>()
    );
    println!("profile: {profile_source}");
    // The edge tier plans with this machine's profile unscaled.
    let measured = &input.tiers[1].profile;
    println!(
        "  this machine, per decoded token at context {}: layers {:.3} ms total, overhead {:.3} ms; device x{}, edge x1, cloud x1/{}",
        a.prompt_tokens + a.gen_tokens / 2,
        measured
            .layers
            .iter()
            .map(|l| l.decode.eval(f64::from(a.prompt_tokens + a.gen_tokens / 2)))
            .sum::<f64>(),
        measured
            .overhead
            .decode
            .eval(f64::from(a.prompt_tokens + a.gen_tokens / 2)),
        a.device_slowdown,
        a.cloud_speedup
    );
    println!("accuracy: {accuracy_source}");
    println!(
        "links: device->edge {} Mbit/s, rtt {} ms; edge->cloud {} Mbit/s, rtt {} ms",
        a.device_mbit, a.device_rtt_ms, a.cloud_mbit, a.cloud_rtt_ms
    );
    println!();
    if a.explain {
        print!("{}", adaptive.explain());
    } else {
        println!(
            "plan: {} -- {:.3} ms/token, agreement {:.4}",
            adaptive.summary(),
            adaptive.predicted_latency_ms,
            adaptive.predicted_agreement
        );
    }
    println!();
    println!("comparison (predicted ms/token, agreement with the deepest exit):");
    let line = |name: &str, p: &Plan| {
        println!(
            "  {name:<18} {:>9.3} ms  {:.4}  {:.2}x cloud-only  {}",
            p.predicted_latency_ms,
            p.predicted_agreement,
            p.predicted_latency_ms / cloud.predicted_latency_ms,
            p.summary()
        );
    };
    line("adaptive", &adaptive);
    line("cloud-only", &cloud);
    match &device {
        Ok(p) => line("device-only", p),
        Err(e) => println!("  {:<18} infeasible: {e}", "device-only"),
    }
    match &fixed {
        Ok(p) => line("best static split", p),
        Err(e) => println!("  {:<18} infeasible: {e}", "best static split"),
    }
    Ok(())
}

/// What `flow-node plan` plans with (see its help): this machine's cached self-benchmark
/// profile (device scaled by `--device-slowdown`, cloud by `--cloud-speedup`), the
/// calibration curves and the links of the arguments. Returns the input and where the
/// profile and the curves came from. Run it inside [`calibrate::in_pool`].
pub(crate) fn planner_input(a: &PlanArgs) -> anyhow::Result<(PlanInput, String, String)> {
    let dir = &a.model;
    let cfg = flow_familial::source::model_config(dir)
        .with_context(|| format!("reading {}", dir.join("config.json").display()))?;
    let fingerprint = calibrate::fingerprint(dir)?;
    let model = FamilialModel::load(dir)
        .with_context(|| format!("loading the family in {}", dir.display()))?;
    let key = ProfileKey {
        model_fingerprint: fingerprint.clone(),
        cpu: cpu_description(),
    };
    let (measured, profile_source) = measured_profile(a, &model, &key)?;
    let (exits, accuracy_source) = exit_specs(a, &model, &cfg, &fingerprint)?;
    let shape = ModelShape {
        num_layers: cfg.num_layers,
        hidden_size: cfg.hidden_size,
        token_id_bytes: 4,
        exits,
    };
    let tier = |role: TierRole, profile: NodeProfile, mem: f64| TierSpec {
        role,
        profile,
        memory_limit_bytes: (mem * 1024.0 * 1024.0) as u64,
        load_factor: 1.0,
        compute_power_w: if role == TierRole::Device { 2.0 } else { 0.0 },
        radio_power_w: if role == TierRole::Device { 1.0 } else { 0.0 },
    };
    let input = PlanInput {
        model: shape,
        tiers: vec![
            tier(
                TierRole::Device,
                measured.time_scaled(a.device_slowdown),
                a.device_memory_mib,
            ),
            tier(TierRole::Edge, measured.clone(), 16.0 * 1024.0),
            tier(
                TierRole::Cloud,
                measured.time_scaled(1.0 / a.cloud_speedup),
                256.0 * 1024.0,
            ),
        ],
        links: vec![
            LinkEstimate::fixed(a.device_rtt_ms, a.device_mbit * 1e6),
            LinkEstimate::fixed(a.cloud_rtt_ms, a.cloud_mbit * 1e6),
        ],
        config: PlannerConfig {
            accuracy_target: a.target,
            workload: flow_partition::planner::Workload {
                prompt_tokens: a.prompt_tokens,
                gen_tokens: a.gen_tokens,
                concurrent_sessions: 1,
            },
            // What the agent does: rows a tier answered travel to its parent as a backfill
            // with the next escalation and are computed before it.
            backfill: flow_partition::planner::BackfillMode::CriticalPath,
            ..PlannerConfig::default()
        },
    };
    Ok((input, profile_source, accuracy_source))
}

impl PlanArgs {
    /// The command's defaults, planning for the family in `model`.
    pub(crate) fn defaults(model: PathBuf) -> Self {
        use clap::Parser;
        #[derive(Parser)]
        struct Wrap {
            #[command(flatten)]
            a: PlanArgs,
        }
        let mut a = Wrap::parse_from(["plan"]).a;
        a.model = model;
        a
    }
}

/// Build profile of this binary: `debug` or `release`. Part of the profile cache key,
/// because the same CPU spends very different times in a debug and a release build.
pub(crate) fn build_profile() -> &'static str {
    if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    }
}

/// CPU model from /proc/cpuinfo (or the architecture), core count, compute threads and
/// the build profile (see [`build_profile`]).
pub(crate) fn cpu_description() -> String {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    format!(
        "{model} x{cores} t{} {}",
        rayon::current_num_threads().max(1),
        build_profile()
    )
}

pub(crate) fn cache_dir() -> Option<PathBuf> {
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(x).join("aiflow"));
    }
    std::env::var_os("HOME")
        .filter(|v| !v.is_empty())
        .map(|h| PathBuf::from(h).join(".cache").join("aiflow"))
}

pub(crate) fn measured_profile(
    a: &PlanArgs,
    model: &FamilialModel,
    key: &ProfileKey,
) -> anyhow::Result<(NodeProfile, String)> {
    let path =
        cache_dir().map(|d| d.join(format!("profile-{BENCH_VERSION}-{}.json", key.file_stem())));
    if !a.no_cache {
        if let Some(p) = &path {
            if let Ok(text) = std::fs::read_to_string(p) {
                match serde_json::from_str::<NodeProfile>(&text) {
                    Ok(prof)
                        if prof.key == *key && prof.layers.len() == model.config().num_layers =>
                    {
                        return Ok((prof, format!("cached self-benchmark {}", p.display())));
                    }
                    _ => eprintln!("note: ignoring unreadable profile cache {}", p.display()),
                }
            }
        }
    }
    let t0 = OsInstant::now();
    let samples = self_benchmark(model, &a.model)?;
    let prof = fit_node_profile(key.clone(), &samples).context("fitting the profile")?;
    let secs = t0.elapsed().as_secs_f64();
    let mut source = format!("self-benchmark measured now ({secs:.1} s)");
    if a.no_cache {
        source.push_str(", cache not used (--no-cache)");
    } else if let Some(p) = &path {
        let write = || -> anyhow::Result<()> {
            if let Some(d) = p.parent() {
                std::fs::create_dir_all(d)?;
            }
            std::fs::write(p, serde_json::to_string_pretty(&prof)?)?;
            Ok(())
        };
        match write() {
            Ok(()) => source.push_str(&format!(", cached in {}", p.display())),
            Err(e) => eprintln!(
                "warning: could not cache the profile in {}: {e:#}",
                p.display()
            ),
        }
    } else {
        source.push_str(", not cached (no $XDG_CACHE_HOME or $HOME)");
    }
    Ok((prof, source))
}

pub(crate) fn exit_specs(
    a: &PlanArgs,
    model: &FamilialModel,
    cfg: &ModelConfig,
    fingerprint: &str,
) -> anyhow::Result<(Vec<ExitSpec>, String)> {
    let path = a
        .calibration
        .clone()
        .unwrap_or_else(|| a.model.join(calibrate::FILE_NAME));
    let (file, source) = if path.exists() {
        let f = CalibrationFile::read(&path)?;
        if f.model_fingerprint != fingerprint {
            bail!(
                "{} was calibrated for model {}, but {} is {fingerprint}; re-run `flow-node model calibrate {} --write`",
                path.display(),
                f.model_fingerprint,
                a.model.display(),
                a.model.display()
            );
        }
        let src = format!(
            "{} (measure {}, target {}, {} tokens per exit)",
            path.display(),
            f.measure.name(),
            f.target_agreement,
            f.exits.first().map_or(0, |e| e.tokens)
        );
        (f, src)
    } else {
        if a.calibration.is_some() {
            bail!("calibration file {} does not exist", path.display());
        }
        const N: usize = 100;
        let examples = calibrate::validation_set(Task::Mix, N, 1);
        let collected =
            calibrate::collect_records(model, &calibrate::prompts_of(&examples), Measure::MaxProb)?;
        let config = CalibrationConfig {
            target_agreement: a.target,
            bound: Some(Bound {
                kind: BoundKind::ClopperPearson,
                delta: 0.1,
            }),
            min_accepted: 1,
        };
        let f = calibrate::calibrate(
            cfg,
            &collected,
            Measure::MaxProb,
            &config,
            24,
            fingerprint.to_string(),
            Task::Mix.name(),
            N,
            1,
        )?;
        let src = format!(
            "no {} -- calibrated on the fly ({N} examples per task of mix, split 1, {} tokens per exit, max_prob, Clopper-Pearson delta 0.1); run `flow-node model calibrate {} --write` for a larger set",
            path.display(),
            collected.tokens,
            a.model.display()
        );
        (f, src)
    };
    let specs = file
        .exit_specs(cfg)
        .with_context(|| format!("{}: planner exits", path.display()))?;
    Ok((specs, source))
}

fn ms(t: OsInstant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn numel(
    infos: &std::collections::BTreeMap<String, (String, Vec<usize>)>,
    names: &[String],
) -> u64 {
    names
        .iter()
        .filter_map(|n| infos.get(n))
        .map(|(_, s)| s.iter().product::<usize>() as u64)
        .sum()
}

/// Bytes (f32 in memory) of weights and KV per token, per block: overhead (embedding),
/// each trunk layer, each exit head (its own block, norm and head; norm and head only
/// when its block is a trunk layer).
fn block_sizes(dir: &Path, cfg: &ModelConfig) -> anyhow::Result<(u64, Vec<u64>, Vec<u64>)> {
    let ck = Checkpoint::open(dir)?;
    let infos = ck.tensor_infos();
    let part = |trunk: std::ops::Range<usize>, exits: Vec<usize>, embed| Part {
        embed,
        trunk,
        exits,
    };
    let embed = 4 * numel(
        &infos,
        &FamilialModel::tensor_names(cfg, &part(0..0, vec![], true))?,
    );
    let mut layers = Vec::new();
    for l in 0..cfg.num_layers {
        let names = FamilialModel::tensor_names(cfg, &part(l..l + 1, vec![], false))?;
        layers.push(4 * numel(&infos, &names));
    }
    let mut exits = Vec::new();
    for e in &cfg.exits {
        let mut names = FamilialModel::tensor_names(cfg, &part(0..0, vec![e.point], false))?;
        if let ExitBlock::Trunk(l) = e.block {
            let block = FamilialModel::tensor_names(cfg, &part(l..l + 1, vec![], false))?;
            names.retain(|n| !block.contains(n));
        }
        exits.push(4 * numel(&infos, &names));
    }
    Ok((embed, layers, exits))
}

/// Times every block of the family on this machine: decode steps at contexts 16, 128 and
/// 384 (median of 5 steps each), prefills of 8, 32 and 128 tokens (median of 3).
fn self_benchmark(model: &FamilialModel, dir: &Path) -> anyhow::Result<ProfileSamples> {
    let cfg = model.config();
    let n_layers = cfg.num_layers;
    let points = cfg.exit_points();
    let kv = (2 * cfg.num_kv_heads * cfg.head_dim * 4) as u64;
    // Which exits run before trunk layer l (own block, reads the state after [0, l)), and
    // which run after it (block = trunk layer l: norm + head on its output).
    let own_before = |l: usize| -> Vec<usize> {
        cfg.exits
            .iter()
            .filter(|e| matches!(e.block, ExitBlock::Own(_)) && e.point == l)
            .map(|e| e.point)
            .collect()
    };
    let head_after = |l: usize| -> Vec<usize> {
        cfg.exits
            .iter()
            .filter(|e| e.block == ExitBlock::Trunk(l))
            .map(|e| e.point)
            .collect()
    };
    let exit_idx = |p: usize| points.iter().position(|&q| q == p).unwrap_or(0);
    let mut layer_t: Vec<Vec<(f64, Vec<f64>)>> = vec![Vec::new(); n_layers];
    let mut exit_t: Vec<Vec<(f64, Vec<f64>)>> = vec![Vec::new(); points.len()];
    let mut over_t: Vec<(f64, Vec<f64>)> = Vec::new();
    let mut prefill = |x: usize, decode_steps: usize, record: bool| -> anyhow::Result<()> {
        // Prefill `x` tokens block by block, timed, then `decode_steps` timed decode steps.
        let mut cache: SeqCache = model.new_cache();
        let toks: Vec<u32> = (0..x).map(|i| u32::from(b'a') + (i % 26) as u32).collect();
        let pass = |tokens: &[u32],
                    start: usize,
                    cache: &mut SeqCache|
         -> anyhow::Result<(Vec<f64>, Vec<f64>, f64)> {
            let segs = [Seg::new(start, tokens.len())];
            let mut lt = vec![0.0; n_layers];
            let mut et = vec![0.0; points.len()];
            let t = OsInstant::now();
            let mut h = model.embed(tokens)?;
            let mut over = ms(t);
            for (l, slot) in lt.iter_mut().enumerate() {
                for p in own_before(l) {
                    let t = OsInstant::now();
                    let logits = model.exit(&h, p, &segs, &mut [&mut *cache], Rows::Last)?;
                    let _ = logits.to_vec2::<f32>()?;
                    et[exit_idx(p)] = ms(t);
                }
                let t = OsInstant::now();
                h = model.run_layers(&h, l..l + 1, &segs, &mut [&mut *cache])?;
                *slot = ms(t);
                for p in head_after(l) {
                    let t = OsInstant::now();
                    let last = h.narrow(0, tokens.len() - 1, 1)?;
                    let logits: Vec<Vec<f32>> = model.exit_head(&last, p)?.to_vec2()?;
                    et[exit_idx(p)] = ms(t);
                    let t = OsInstant::now();
                    let _ = Confidence::of_row(&logits[0]);
                    over += ms(t);
                }
            }
            Ok((lt, et, over))
        };
        let (lt, et, ov) = pass(&toks, 0, &mut cache)?;
        if !record {
            for s in 0..decode_steps {
                pass(&[u32::from(b'a')], x + s, &mut cache)?;
            }
            return Ok(());
        }
        if decode_steps == 0 {
            for (l, v) in lt.into_iter().enumerate() {
                layer_t[l].push((-(x as f64), vec![v]));
            }
            for (e, v) in et.into_iter().enumerate() {
                exit_t[e].push((-(x as f64), vec![v]));
            }
            over_t.push((-(x as f64), vec![ov]));
            return Ok(());
        }
        let mut lts = vec![Vec::new(); n_layers];
        let mut ets = vec![Vec::new(); points.len()];
        let mut ovs = Vec::new();
        for s in 0..decode_steps {
            let (lt, et, ov) = pass(&[u32::from(b'a')], x + s, &mut cache)?;
            for (l, v) in lt.into_iter().enumerate() {
                lts[l].push(v);
            }
            for (e, v) in et.into_iter().enumerate() {
                ets[e].push(v);
            }
            ovs.push(ov);
        }
        for (l, v) in lts.into_iter().enumerate() {
            layer_t[l].push((x as f64, v));
        }
        for (e, v) in ets.into_iter().enumerate() {
            exit_t[e].push((x as f64, v));
        }
        over_t.push((x as f64, ovs));
        Ok(())
    };
    // Warm-up (allocations, page faults), not recorded.
    prefill(16, 2, false)?;
    for ctx in [16usize, 128, 384] {
        prefill(
            ctx.min(cfg.max_position_embeddings.saturating_sub(8))
                .max(1),
            5,
            true,
        )?;
    }
    for x in [8usize, 32, 128] {
        for _ in 0..3 {
            prefill(x.min(cfg.max_position_embeddings).max(1), 0, true)?;
        }
    }
    let (embed_bytes, layer_bytes, exit_bytes) = block_sizes(dir, cfg)?;
    // Encoded as (x, times): x > 0 decode at context x (times = steps), x < 0 prefill of
    // |x| tokens (one time per repetition; repetitions are merged below).
    let to_block = |v: &[(f64, Vec<f64>)], weight_bytes: u64, kv_bytes_per_token: u64| {
        let mut decode = Vec::new();
        let mut pre: std::collections::BTreeMap<u64, Vec<f64>> = Default::default();
        for (x, ts) in v {
            if *x > 0.0 {
                let mut ts = ts.clone();
                decode.push(Sample {
                    x: *x,
                    y: median(&mut ts),
                });
            } else {
                pre.entry((-x) as u64).or_default().extend(ts);
            }
        }
        let prefill = pre
            .into_iter()
            .map(|(x, mut ts)| Sample {
                x: x as f64,
                y: median(&mut ts),
            })
            .collect();
        BlockSamples {
            prefill,
            decode,
            weight_bytes,
            kv_bytes_per_token,
        }
    };
    let depths = calibrate::planner_depths(cfg);
    Ok(ProfileSamples {
        overhead: to_block(&over_t, embed_bytes, 0),
        layers: (0..n_layers)
            .map(|l| to_block(&layer_t[l], layer_bytes[l], kv))
            .collect(),
        exits: cfg
            .exits
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let kv_e = if matches!(e.block, ExitBlock::Own(_)) {
                    kv
                } else {
                    0
                };
                (depths[i], to_block(&exit_t[i], exit_bytes[i], kv_e))
            })
            .collect(),
    })
}
