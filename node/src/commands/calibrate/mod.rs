//! `flow-node model calibrate`: escalation thresholds from a validation set.
//!
//! Default: the cascade's own decodes ([`cascade::cascade_decode`],
//! [`cascade::calibrate_on_policy`]). The
//! deciding exits (the device's and the edge's by default) answer a token when confident,
//! else the deepest exit does, as a deployment serves; every exit is scored on every
//! generated token against the deepest exit on the same context, and
//! `flow_partition::calibrate_cascade` picks the deciders' thresholds jointly, with a
//! Clopper–Pearson bound on the composed agreement, re-decoding with each choice.
//!
//! `--teacher-forced` (the session-2 method): for every answer token, each non-deepest exit
//! gives a confidence and a greedy token; the reference continuation is the deepest exit's
//! greedy answer (incremental decoding with the KV cache); every exit is then run
//! *teacher-forced* on `prompt + that continuation` in one batched forward, so exit `e`'s
//! record at answer position `j` is "given the deepest exit's prefix, would `e` have said
//! the same next token". `flow_partition::calibrate_family` turns the records into the
//! threshold with the least escalation whose agreement (or its lower confidence bound)
//! meets the target, per exit.
//!
//! The calibration file (`DIR/aiflow_calibration.json`, format `aiflow-calibration/1`) is
//! [`CalibrationFile`]: the measure, target and bound, where the records came from, and
//! per exit its `point` (as in `early_exit_points`), its planner `depth`, the `threshold`
//! (`null`: always escalate) and the planner curve. The agent reads `measure` and
//! `exits[].{point, threshold}`; `flow-node plan` reads the curves; `cascade` records the
//! deciders, their thresholds and the final decode's outcome (absent with --teacher-forced).
//!
//! [`prompts`] decides what is decoded (the toy tasks, or chat prompts for a family over a
//! pretrained model); [`policy`] turns a file into the request policy nodes use by default;
//! [`cascade`] is the cascade's decode and search; [`report`] prints and runs `--check`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use flow_familial::confidence::{Confidence, Measure};
use flow_familial::family::MANIFEST_FILE;
use flow_familial::tasks::{eval_set, Example, Task};
use flow_familial::train::greedy_batch;
use flow_familial::weights::Checkpoint;
use flow_familial::{FamilialModel, ModelConfig, ModelSource, Rows, Seg, SeqCache};
use flow_partition::{
    agreement_curve, calibrate_cascade, calibrate_exit, calibrate_family, cascade_curves,
    composed_agreement, Bound, BoundKind, CalibrationConfig, CascadeConfig, CascadeToken,
    ConfidenceMeasure, CurvePoint, ExitRecords, Record,
};
use serde::Serialize;

use super::OsInstant;

pub use flow_node::calibration::{CalibrationFile, CascadeEntry, ExitEntry, FILE_NAME, FORMAT};

mod cascade;
mod policy;
mod prompts;
mod report;

use cascade::{calibrate_on_policy, check_cascade, CascadeCheck};
use report::{check, print_cascade, print_exits, print_header, print_table, show_thresholds};

pub use policy::{calibrated_policy, describe};
pub use prompts::{prompts_of, Prompt};
use prompts::{validation, Validation};

/// How the reference tokens are produced (recorded in the file), `--teacher-forced`.
pub const REFERENCE: &str =
    "deepest exit's greedy continuation (KV-cached decoding); every exit teacher-forced on it";
/// How the records are produced by default (recorded in the file).
pub const REFERENCE_CASCADE: &str = "the cascade's own greedy decode (deciding exits answer when confident, else the deepest exit); every exit scored against the deepest exit on the same context";

/// Which lower bound `--bound` selects.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum BoundArg {
    /// Exact one-sided Clopper-Pearson bound (default).
    ClopperPearson,
    /// Hoeffding's bound (looser, distribution-free).
    Hoeffding,
    /// No bound: the empirical agreement must meet the target (no guarantee).
    None,
}

fn parse_measure(s: &str) -> Result<Measure, String> {
    s.parse()
}

fn parse_task(s: &str) -> Result<Task, String> {
    s.parse().map_err(|e: flow_familial::Error| e.to_string())
}

fn parse_unit(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .parse()
        .map_err(|e| format!("`{s}` is not a number: {e}"))?;
    if v > 0.0 && v < 1.0 {
        Ok(v)
    } else {
        Err(format!("must be strictly between 0 and 1, got {v}"))
    }
}

#[derive(clap::Args, Debug)]
#[command(before_long_help = "\
Calibrate the escalation thresholds of a family's early exits.

An exit that is confident answers locally; one that is not escalates the token to a deeper
tier. The threshold decides the trade: too low and shallow exits give wrong answers, too high
and everything escalates. This command measures, on a validation set of the family's own
tasks, how often each exit agrees with the deepest exit as a function of its confidence, and
picks per exit the lowest threshold (least escalation) whose agreement meets --target.

With the default Clopper-Pearson bound, thresholds are tested from the most conservative
down and the search stops at the first failure (Learn-then-Test, as in CALM): with
probability at least 1 - delta, the agreement among accepted tokens at the chosen threshold
is at least the target on new data from the same distribution.

Records (default): the cascade's own decodes. The deciding exits (--deciders, by default the
two shallowest: the device's and the edge's) answer a token when confident, else the deepest
exit does, exactly as a deployment serves; every exit is scored on every generated token
against the deepest exit on the same context. The thresholds of the deciders are chosen
jointly: over a grid of --grid candidates per exit, the combination with the least mean
--escalation-cost whose composed agreement (all tokens, the deepest exit's counted as
agreeing) has a Clopper-Pearson lower bound >= --target at level delta / combinations
(Bonferroni). The records depend on the thresholds they were decoded with, so the command
decodes with the last choice and chooses again, up to --rounds times (round 1 decodes with
the deepest exit alone); the file reports the final thresholds' own decode. Exits outside
the cascade are calibrated on their own on the cascade's contexts. Check a file on a
held-out split with --check: it decodes the cascade there and bounds its composed agreement.

With --teacher-forced (the old method): the reference is the deepest exit's greedy
continuation; every exit is run teacher-forced on it and calibrated on its own (each record
asks: given the deepest exit's prefix, does this exit pick the same next token?).")]
#[command(after_long_help = "\
Examples:
  flow-node model calibrate models/small
  flow-node model calibrate models/small --measure margin --target 0.99 --write
  flow-node model calibrate models/small --json /tmp/cal.json
  # check thresholds on a held-out split (different seed) of the same tasks:
  flow-node model calibrate models/small --check /tmp/cal.json --split-seed 2

--write stores DIR/aiflow_calibration.json (format aiflow-calibration/1):
  { \"format\": \"aiflow-calibration/1\", \"measure\": \"max_prob\", \"target_agreement\": 0.97,
    \"bound\": {\"kind\": \"clopper_pearson\", \"delta\": 0.1}, \"model_fingerprint\": \"...\",
    \"exits\": [ {\"point\": 1, \"depth\": 1, \"threshold\": 0.93, \"escalation\": 0.41,
                 \"curve\": [{\"threshold\": .., \"agreement\": .., \"escalation\": ..}, ..]}, .. ] }
  `point` is the exit point (as in config.json and `model run --exit`), `threshold` null means
  \"always escalate\", `depth` and `curve` are what `flow-node plan` feeds the planner (curve
  agreement is the lower bound, thresholds decreasing). The deepest exit is listed with
  threshold null: it answers every token that reaches it.")]
pub struct CalibrateArgs {
    /// Checkpoint directory of a trained family (config.json + model.safetensors).
    pub dir: PathBuf,
    /// Confidence measure: max_prob (largest softmax probability), margin (top-1 minus
    /// top-2 probability) or entropy (negated entropy of the softmax).
    #[arg(long, default_value = "max_prob", value_parser = parse_measure)]
    pub measure: Measure,
    /// Required agreement with the deepest exit among the tokens an exit answers.
    #[arg(long, default_value = "0.97", value_parser = parse_unit)]
    pub target: f64,
    /// Risk level of the bound: the guarantee holds with probability 1 - delta.
    #[arg(long, default_value = "0.1", value_parser = parse_unit)]
    pub delta: f64,
    /// Lower confidence bound the agreement must meet.
    #[arg(long, value_enum, default_value_t = BoundArg::ClopperPearson)]
    pub bound: BoundArg,
    /// Validation examples per task (`mix` draws this many from each of add, lookup,
    /// reverse). Each gives one record per answer token (answer + end-of-sequence).
    #[arg(long, default_value_t = 300)]
    pub examples: usize,
    /// Built-in task the validation set is drawn from: add, lookup, reverse or mix.
    #[arg(long, default_value = "mix", value_parser = parse_task)]
    pub task: Task,
    /// Most tokens decoded per chat prompt (families over a pretrained model, which are
    /// validated on chat prompts: the calibrate split, or the test split with --check).
    #[arg(long, default_value_t = 64)]
    pub max_new: usize,
    /// Evaluation split of the task generator (0 is the one `model train` reports; any
    /// split is disjoint from the training stream). Use another seed for a held-out check.
    #[arg(long, default_value_t = 1)]
    pub split_seed: u64,
    /// Also write the full report (the calibration file's content) as JSON to PATH.
    #[arg(long, value_name = "PATH")]
    pub json: Option<PathBuf>,
    /// Store the thresholds in DIR/aiflow_calibration.json for the agent and the planner.
    #[arg(long)]
    pub write: bool,
    /// Instead of calibrating, check the thresholds of a calibration file on this split:
    /// per exit, agreement and escalation when accepting confidence >= threshold.
    #[arg(long, value_name = "FILE", conflicts_with = "write")]
    pub check: Option<PathBuf>,
    /// Points of the agreement curve stored for the planner.
    #[arg(long, default_value_t = 24)]
    pub curve_points: usize,
    /// Compute threads (default: $RAYON_NUM_THREADS, else 1).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Old method: every exit calibrated on its own, teacher-forced on the deepest exit's
    /// continuation (no cascade, no on-policy decode).
    #[arg(long)]
    pub teacher_forced: bool,
    /// Exit points that decide in the cascade, shallowest first (default: the two
    /// shallowest exits: the device's and the edge's in the three-tier placement).
    #[arg(long, value_delimiter = ',', value_name = "POINTS")]
    pub deciders: Vec<usize>,
    /// Cost of a token escalating past each deciding exit (same order as --deciders),
    /// e.g. the next hop's latency in ms; the thresholds minimise the mean cost per token.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "20,45",
        value_name = "COSTS"
    )]
    pub escalation_cost: Vec<f64>,
    /// Candidate thresholds per deciding exit (the bound is Bonferroni-corrected for the
    /// number of combinations).
    #[arg(long, default_value_t = 24)]
    pub grid: usize,
    /// Decode-and-choose rounds (each decodes the validation set with the last choice).
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
}

/// Records of one exit.
pub struct ExitTokens {
    pub point: usize,
    pub depth: usize,
    pub records: Vec<Record>,
}

/// What [`collect_records`] measured.
pub struct Collected {
    /// Non-deepest exits, shallowest first.
    pub exits: Vec<ExitTokens>,
    /// Answer tokens scored.
    pub tokens: usize,
    /// Positions where the teacher-forced deepest exit disagreed with its own cached greedy
    /// decoding (floating-point ties; expected 0).
    pub reference_mismatches: usize,
    /// Point of the deepest exit.
    pub deepest: usize,
}

pub fn to_partition_measure(m: Measure) -> ConfidenceMeasure {
    match m {
        Measure::MaxProb => ConfidenceMeasure::MaxProb,
        Measure::Margin => ConfidenceMeasure::Margin,
        Measure::NegEntropy => ConfidenceMeasure::NegEntropy,
    }
}

fn from_partition_measure(m: ConfidenceMeasure) -> Measure {
    match m {
        ConfidenceMeasure::MaxProb => Measure::MaxProb,
        ConfidenceMeasure::Margin => Measure::Margin,
        ConfidenceMeasure::NegEntropy => Measure::NegEntropy,
    }
}

/// Planner depth of each exit (see [`ExitEntry::depth`]), in the config's exit order.
pub use flow_node::planning::planner_depths;

/// First 16 hex digits of the SHA-256 over every tensor (as `flow-node model inspect`);
/// for a family overlay, over the overlay's and its base's tensors.
pub fn fingerprint(dir: &Path) -> anyhow::Result<String> {
    if dir.join(MANIFEST_FILE).is_file() {
        let src = ModelSource::open(dir)?;
        let infos = src.tensor_infos();
        let fp = src.fingerprint(infos.keys().map(String::as_str))?;
        return Ok(hex::encode(&fp[..8]));
    }
    let ck = Checkpoint::open(dir)?;
    let infos = ck.tensor_infos();
    let fp = ck.fingerprint(infos.keys().map(String::as_str))?;
    Ok(hex::encode(&fp[..8]))
}

/// Runs `f` in a pool of `threads` compute threads (default $RAYON_NUM_THREADS, else 1).
pub fn in_pool<T: Send>(
    threads: Option<usize>,
    f: impl FnOnce() -> anyhow::Result<T> + Send,
) -> anyhow::Result<T> {
    let threads = threads
        .or_else(|| {
            std::env::var("RAYON_NUM_THREADS")
                .ok()
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(1)
        .max(1);
    flow_familial::set_compute_threads(threads);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .context("building the compute thread pool")?;
    pool.install(f)
}

/// The validation set: `n` examples of each component task of `task`, split `split`.
pub fn validation_set(task: Task, n: usize, split: u64) -> Vec<Example> {
    task.components()
        .into_iter()
        .flat_map(|t| eval_set(t, n, split))
        .collect()
}

/// The exit points, the deepest one, and an empty record list per non-deepest exit.
fn empty_records(cfg: &ModelConfig) -> anyhow::Result<(Vec<usize>, usize, Vec<ExitTokens>)> {
    let points = cfg.exit_points();
    let Some(&deepest) = points.last() else {
        bail!("the family has no exit");
    };
    let exits = points[..points.len() - 1]
        .iter()
        .zip(planner_depths(cfg))
        .map(|(&point, depth)| ExitTokens {
            point,
            depth,
            records: Vec::new(),
        })
        .collect();
    Ok((points, deepest, exits))
}

/// Per-exit records on `examples` (see the module docs).
pub fn collect_records(
    model: &FamilialModel,
    examples: &[Prompt],
    measure: Measure,
) -> anyhow::Result<Collected> {
    let cfg = model.config();
    let (points, deepest, mut exits) = empty_records(cfg)?;
    let (mut tokens, mut mismatches) = (0usize, 0usize);
    const CHUNK: usize = 32;
    for chunk in examples.chunks(CHUNK) {
        let prompts: Vec<Vec<u32>> = chunk.iter().map(|e| e.tokens.clone()).collect();
        let max_new = chunk.iter().map(|e| e.max_new).max().unwrap_or(1);
        let conts = greedy_batch(model, &prompts, deepest, max_new)?;
        // Teacher-forced inputs: prompt + continuation minus its last token; the rows
        // `prompt.len() - 1 ..` predict the continuation.
        let mut input: Vec<u32> = Vec::new();
        let mut segs: Vec<Seg> = Vec::new();
        let mut scored: Vec<(usize, usize)> = Vec::new(); // (row offset, count) per sequence
        let mut refs: Vec<&[u32]> = Vec::new();
        let mut offset = 0usize;
        for (p, c) in prompts.iter().zip(&conts) {
            if c.is_empty() || p.is_empty() {
                continue;
            }
            let len = p.len() + c.len() - 1;
            input.extend_from_slice(p);
            input.extend_from_slice(&c[..c.len() - 1]);
            segs.push(Seg::new(0, len));
            scored.push((offset + p.len() - 1, c.len()));
            refs.push(c);
            offset += len;
        }
        if segs.is_empty() {
            continue;
        }
        let mut caches: Vec<SeqCache> = segs.iter().map(|_| model.new_cache()).collect();
        let mut cache_refs: Vec<&mut SeqCache> = caches.iter_mut().collect();
        let mut h = model.embed(&input)?;
        let mut at = 0usize;
        for (i, &p) in points.iter().enumerate() {
            h = model.run_layers(&h, at..p, &segs, &mut cache_refs)?;
            at = p;
            let logits: Vec<Vec<f32>> = model
                .exit(&h, p, &segs, &mut cache_refs, Rows::All)?
                .to_vec2()?;
            for (&(start, n), reference) in scored.iter().zip(&refs) {
                for j in 0..n {
                    let c = Confidence::of_row(&logits[start + j]);
                    if i + 1 == points.len() {
                        tokens += 1;
                        mismatches += usize::from(c.token != reference[j]);
                    } else {
                        exits[i].records.push(Record {
                            confidence: f64::from(c.score(measure)),
                            agrees: c.token == reference[j],
                        });
                    }
                }
            }
        }
    }
    Ok(Collected {
        exits,
        tokens,
        reference_mismatches: mismatches,
        deepest,
    })
}

/// Calibrates every non-deepest exit from `collected` (the core of the command).
#[allow(clippy::too_many_arguments)]
pub fn calibrate(
    cfg: &ModelConfig,
    collected: &Collected,
    measure: Measure,
    config: &CalibrationConfig,
    curve_points: usize,
    fingerprint: String,
    task: &str,
    examples_per_task: usize,
    split: u64,
) -> anyhow::Result<CalibrationFile> {
    let pm = to_partition_measure(measure);
    let recs: Vec<ExitRecords> = collected
        .exits
        .iter()
        .map(|e| ExitRecords {
            depth: e.depth,
            records: e.records.clone(),
        })
        .collect();
    if recs.iter().any(|r| r.records.is_empty()) {
        bail!("no validation tokens: use more --examples");
    }
    let cals = calibrate_family(pm, &recs, config, curve_points)?;
    let mut exits = Vec::new();
    for (e, c) in collected.exits.iter().zip(&cals) {
        let mut curve = c.curve.clone();
        // Let the planner pick exactly the calibrated threshold.
        if let Some(t) = c.calibration.threshold {
            if !curve.iter().any(|p| p.threshold == t) {
                curve.push(CurvePoint {
                    threshold: t,
                    agreement: c.calibration.bounded_agreement,
                    escalation: c.calibration.escalation,
                });
                curve.sort_by(|a, b| b.threshold.total_cmp(&a.threshold));
            }
        }
        exits.push(ExitEntry {
            point: e.point,
            depth: c.depth,
            threshold: c.calibration.threshold,
            tokens: c.calibration.total,
            accepted: c.calibration.accepted,
            empirical_agreement: c.calibration.empirical_agreement,
            bounded_agreement: c.calibration.bounded_agreement,
            escalation: c.calibration.escalation,
            curve,
        });
    }
    exits.push(deepest_entry(
        cfg,
        collected.deepest,
        collected.tokens,
        collected.tokens,
    ));
    Ok(CalibrationFile {
        format: FORMAT.into(),
        measure: pm,
        target_agreement: config.target_agreement,
        bound: config.bound,
        model_fingerprint: fingerprint,
        task: task.into(),
        examples_per_task,
        split,
        reference: REFERENCE.into(),
        deepest_exit: collected.deepest,
        exits,
        cascade: None,
    })
}

/// The deepest exit's entry: no threshold (it answers every token reaching it).
fn deepest_entry(cfg: &ModelConfig, point: usize, tokens: usize, accepted: usize) -> ExitEntry {
    ExitEntry {
        point,
        depth: planner_depths(cfg)
            .last()
            .copied()
            .unwrap_or(cfg.num_layers),
        threshold: None,
        tokens,
        accepted,
        empirical_agreement: 1.0,
        bounded_agreement: 1.0,
        escalation: 0.0,
        curve: Vec::new(),
    }
}

fn bound_of(a: &CalibrateArgs) -> Option<Bound> {
    let kind = match a.bound {
        BoundArg::ClopperPearson => BoundKind::ClopperPearson,
        BoundArg::Hoeffding => BoundKind::Hoeffding,
        BoundArg::None => return None,
    };
    Some(Bound {
        kind,
        delta: a.delta,
    })
}

fn write_json(path: &Path, v: &impl Serialize) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(v)?;
    std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))
}

pub fn run(a: CalibrateArgs) -> anyhow::Result<()> {
    if a.examples == 0 {
        bail!("--examples must be at least 1");
    }
    let threads = a.threads;
    in_pool(threads, move || run_in_pool(a))
}

/// The family in `dir` (a checkpoint directory or a family overlay) and its source.
fn load(dir: &Path) -> anyhow::Result<(ModelSource, FamilialModel)> {
    let src = ModelSource::open(dir)?;
    let model = src
        .load()
        .with_context(|| format!("loading the family in {}", dir.display()))?;
    Ok((src, model))
}

fn run_in_pool(a: CalibrateArgs) -> anyhow::Result<()> {
    if let Some(file) = &a.check {
        return check(&a, file);
    }
    let (src, model) = load(&a.dir)?;
    let Validation {
        prompts: examples,
        task,
    } = validation(&a, &src, false)?;
    let t0 = OsInstant::now();
    let file = if a.teacher_forced {
        let collected = collect_records(&model, &examples, a.measure)?;
        let secs = t0.elapsed().as_secs_f64();
        let config = CalibrationConfig {
            target_agreement: a.target,
            bound: bound_of(&a),
            min_accepted: 1,
        };
        let file = calibrate(
            model.config(),
            &collected,
            a.measure,
            &config,
            a.curve_points,
            fingerprint(&a.dir)?,
            &task,
            a.examples,
            a.split_seed,
        )?;
        print_table(&a, &file, &collected, examples.len(), secs)?;
        file
    } else {
        let file = calibrate_on_policy(&a, &model, &examples, &task)?;
        print_header(&a, &file);
        println!(
            "validation: task {}, {} examples ({} per task, split {}), {:.1} s",
            file.task,
            examples.len(),
            file.examples_per_task,
            file.split,
            t0.elapsed().as_secs_f64()
        );
        println!("records: {REFERENCE_CASCADE}");
        if let Some(c) = &file.cascade {
            print_cascade(c);
        }
        println!();
        print_exits(&file);
        file
    };
    if let Some(p) = &a.json {
        write_json(p, &file)?;
        println!("report written to {}", p.display());
    }
    if a.write {
        let p = a.dir.join(FILE_NAME);
        write_json(&p, &file)?;
        println!("thresholds written to {}", p.display());
    }
    Ok(())
}
