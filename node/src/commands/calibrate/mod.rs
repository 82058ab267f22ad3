//! `flow-node model calibrate`: escalation thresholds from a validation set.
//!
//! Default: the cascade's own decodes ([`cascade_decode`], [`calibrate_on_policy`]). The
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
//! pretrained model); [`policy`] turns a file into the request policy nodes use by default.

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

pub use flow_node::calibration::{CalibrationFile, CascadeEntry, ExitEntry, FILE_NAME, FORMAT};

mod policy;
mod prompts;

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

/// What [`cascade_decode`] recorded.
pub struct CascadeDecode {
    /// One per generated token: the deciding exits' records.
    pub tokens: Vec<CascadeToken>,
    /// Every non-deepest exit's records on the same tokens, shallowest first.
    pub exits: Vec<ExitTokens>,
    /// Point of the deepest exit.
    pub deepest: usize,
}

/// Decodes `examples` greedily with the cascade `deciders` (indices into the exit points)
/// at `thresholds`: a token is the first deciding exit's whose confidence reaches its
/// threshold, else the deepest exit's. Every exit runs on every token (what a split
/// deployment computes once it has back-filled), so each token records, per exit, its
/// confidence and whether its token equals the deepest exit's on this context.
pub fn cascade_decode(
    model: &FamilialModel,
    examples: &[Prompt],
    measure: Measure,
    deciders: &[usize],
    thresholds: &[Option<f64>],
) -> anyhow::Result<CascadeDecode> {
    let cfg = model.config();
    let (points, deepest, mut exits) = empty_records(cfg)?;
    let eos: Vec<u32> = if cfg.eos_token_ids.is_empty() {
        vec![flow_familial::tokenizer::BYTE_EOS]
    } else {
        cfg.eos_token_ids.clone()
    };
    let mut tokens = Vec::new();
    const CHUNK: usize = 32;
    for chunk in examples.chunks(CHUNK) {
        let prompts: Vec<Vec<u32>> = chunk.iter().map(|e| e.tokens.clone()).collect();
        let max_new = chunk.iter().map(|e| e.max_new).max().unwrap_or(1);
        let mut caches: Vec<SeqCache> = prompts.iter().map(|_| model.new_cache()).collect();
        let mut done = vec![false; prompts.len()];
        let mut segs: Vec<Seg> = prompts.iter().map(|p| Seg::new(0, p.len())).collect();
        let mut input: Vec<u32> = prompts.concat();
        for _ in 0..max_new {
            let mut refs: Vec<&mut SeqCache> = caches.iter_mut().collect();
            let mut h = model.embed(&input)?;
            let mut at = 0usize;
            let mut conf: Vec<Vec<Confidence>> = Vec::new(); // [exit][sequence]
            for &p in &points {
                h = model.run_layers(&h, at..p, &segs, &mut refs)?;
                at = p;
                let logits: Vec<Vec<f32>> =
                    model.exit(&h, p, &segs, &mut refs, Rows::Last)?.to_vec2()?;
                conf.push(logits.iter().map(|r| Confidence::of_row(r)).collect());
            }
            let mut next = Vec::with_capacity(prompts.len());
            for s in 0..prompts.len() {
                let deep = conf[points.len() - 1][s].token;
                let record = |i: usize| Record {
                    confidence: f64::from(conf[i][s].score(measure)),
                    agrees: conf[i][s].token == deep,
                };
                let answer = deciders
                    .iter()
                    .zip(thresholds)
                    .find(|(&i, t)| t.is_some_and(|t| record(i).confidence >= t))
                    .map_or(deep, |(&i, _)| conf[i][s].token);
                next.push(answer);
                if done[s] {
                    continue;
                }
                for (i, e) in exits.iter_mut().enumerate() {
                    e.records.push(record(i));
                }
                tokens.push(CascadeToken {
                    exits: deciders.iter().map(|&i| record(i)).collect(),
                });
                done[s] = eos.contains(&answer);
            }
            if done.iter().all(|d| *d) {
                break;
            }
            segs = segs.iter().map(|s| Seg::new(s.start + s.len, 1)).collect();
            input = next;
        }
    }
    Ok(CascadeDecode {
        tokens,
        exits,
        deepest,
    })
}

/// Indices (into the exit points) of the deciding exits named by `points` (default: the
/// two shallowest non-deepest exits).
fn decider_indices(cfg: &ModelConfig, points: &[usize]) -> anyhow::Result<Vec<usize>> {
    let all = cfg.exit_points();
    let shallow = &all[..all.len().saturating_sub(1)];
    if points.is_empty() {
        return Ok((0..shallow.len().min(2)).collect());
    }
    let mut out = Vec::new();
    for &p in points {
        let Some(i) = shallow.iter().position(|&x| x == p) else {
            bail!("--deciders: {p} is no exit point below the deepest (exits: {shallow:?})");
        };
        if out.last().is_some_and(|&l| l >= i) {
            bail!("--deciders must be increasing, got {points:?}");
        }
        out.push(i);
    }
    Ok(out)
}

/// Calibrates the cascade on its own decodes (see the command's help) and builds the file.
pub fn calibrate_on_policy(
    a: &CalibrateArgs,
    model: &FamilialModel,
    examples: &[Prompt],
    task: &str,
) -> anyhow::Result<CalibrationFile> {
    let cfg = model.config();
    let deciders = decider_indices(cfg, &a.deciders)?;
    let points = cfg.exit_points();
    if a.escalation_cost.len() != deciders.len() {
        bail!(
            "--escalation-cost has {} values for {} deciding exits ({:?})",
            a.escalation_cost.len(),
            deciders.len(),
            deciders.iter().map(|&i| points[i]).collect::<Vec<_>>()
        );
    }
    let bound = bound_of(a);
    let ccfg = CascadeConfig {
        target_agreement: a.target,
        bound,
        costs: a.escalation_cost.clone(),
        grid: a.grid,
    };
    let mut thresholds: Vec<Option<f64>> = vec![None; deciders.len()];
    let (mut rounds, mut converged) = (0usize, false);
    let mut dec = cascade_decode(model, examples, a.measure, &deciders, &thresholds)?;
    let mut candidates = 0;
    while rounds < a.rounds.max(1) {
        rounds += 1;
        let c = calibrate_cascade(&dec.tokens, &ccfg)?;
        candidates = c.candidates;
        println!(
            "round {rounds}: decoded {} tokens with {}; chose {} (composed agreement {:.4}, bound {:.4}, cost {:.2})",
            dec.tokens.len(),
            show_thresholds(&thresholds),
            show_thresholds(&c.thresholds),
            c.empirical_agreement,
            c.bounded_agreement,
            c.cost
        );
        if c.thresholds == thresholds {
            converged = true;
            break;
        }
        thresholds = c.thresholds;
        dec = cascade_decode(model, examples, a.measure, &deciders, &thresholds)?;
    }
    // `dec` is the decode with `thresholds`: the on-policy outcome.
    let (agreeing, answered, cost) =
        composed_agreement(&dec.tokens, &thresholds, &a.escalation_cost);
    let n = dec.tokens.len();
    let lower = |k: usize, n: usize| match bound {
        Some(b) => b.lower(k as u64, n as u64),
        None => k as f64 / n.max(1) as f64,
    };
    let curves = cascade_curves(&dec.tokens, &thresholds, a.curve_points, bound)?;
    let config = CalibrationConfig {
        target_agreement: a.target,
        bound,
        min_accepted: 1,
    };
    let mut exits = Vec::new();
    for (i, e) in dec.exits.iter().enumerate() {
        if let Some(j) = deciders.iter().position(|&d| d == i) {
            let th = thresholds[j];
            // Tokens this decider answered, and how many agreed.
            let mut agr = 0usize;
            for t in &dec.tokens {
                let first = t
                    .exits
                    .iter()
                    .zip(&thresholds)
                    .position(|(r, th)| th.is_some_and(|th| r.confidence >= th));
                if first == Some(j) && t.exits[j].agrees {
                    agr += 1;
                }
            }
            let acc = answered[j];
            exits.push(ExitEntry {
                point: e.point,
                depth: e.depth,
                threshold: th,
                tokens: n,
                accepted: acc,
                empirical_agreement: if acc == 0 {
                    1.0
                } else {
                    agr as f64 / acc as f64
                },
                bounded_agreement: if acc == 0 { 1.0 } else { lower(agr, acc) },
                escalation: answered[j + 1..].iter().sum::<usize>() as f64 / n.max(1) as f64,
                curve: curves[j].clone(),
            });
        } else {
            // Not in the cascade: on its own, on the cascade's contexts.
            let c = calibrate_exit(&e.records, &config)?;
            exits.push(ExitEntry {
                point: e.point,
                depth: e.depth,
                threshold: c.threshold,
                tokens: c.total,
                accepted: c.accepted,
                empirical_agreement: c.empirical_agreement,
                bounded_agreement: c.bounded_agreement,
                escalation: c.escalation,
                curve: agreement_curve(&e.records, a.curve_points, bound)?,
            });
        }
    }
    exits.push(deepest_entry(
        cfg,
        dec.deepest,
        n,
        answered.last().copied().unwrap_or(0),
    ));
    Ok(CalibrationFile {
        format: FORMAT.into(),
        measure: to_partition_measure(a.measure),
        target_agreement: a.target,
        bound,
        model_fingerprint: fingerprint(&a.dir)?,
        task: task.into(),
        examples_per_task: a.examples,
        split: a.split_seed,
        reference: REFERENCE_CASCADE.into(),
        deepest_exit: dec.deepest,
        exits,
        cascade: Some(CascadeEntry {
            deciders: deciders.iter().map(|&i| points[i]).collect(),
            thresholds,
            escalation_cost: a.escalation_cost.clone(),
            candidates,
            rounds,
            converged,
            tokens: n,
            agreeing,
            agreement: agreeing as f64 / n.max(1) as f64,
            bounded_agreement: lower(agreeing, n),
            answered,
            cost,
        }),
    })
}

/// The file's cascade decoded on `examples` with its thresholds.
fn check_cascade(
    model: &FamilialModel,
    examples: &[Prompt],
    measure: Measure,
    f: &CalibrationFile,
    c: &CascadeEntry,
) -> anyhow::Result<CascadeCheck> {
    let deciders = decider_indices(model.config(), &c.deciders)?;
    if c.thresholds.len() != deciders.len() {
        bail!(
            "the calibration file's cascade has {} thresholds for {} deciders",
            c.thresholds.len(),
            deciders.len()
        );
    }
    let dec = cascade_decode(model, examples, measure, &deciders, &c.thresholds)?;
    let zero = vec![0.0; deciders.len()];
    let (agreeing, answered, _) = composed_agreement(&dec.tokens, &c.thresholds, &zero);
    let n = dec.tokens.len();
    Ok(CascadeCheck {
        deciders: c.deciders.clone(),
        thresholds: c.thresholds.clone(),
        tokens: n,
        agreeing,
        agreement: agreeing as f64 / n.max(1) as f64,
        bounded_agreement: match f.bound {
            Some(b) => b.lower(agreeing as u64, n as u64),
            None => agreeing as f64 / n.max(1) as f64,
        },
        layers_per_token: layers_per_token(&c.deciders, &answered, model.config().num_layers),
        full_layers: model.config().num_layers,
        answered,
    })
}

fn show_thresholds(t: &[Option<f64>]) -> String {
    let v: Vec<String> = t
        .iter()
        .map(|t| t.map_or_else(|| "escalate".to_string(), |t| format!("{t:.4}")))
        .collect();
    format!("[{}]", v.join(", "))
}

/// Prints the cascade of a calibration file (its own decode's outcome).
fn print_cascade(c: &CascadeEntry) {
    println!(
        "cascade: deciding exits {:?} at {} ({} rounds, {}), escalation cost {:?}, {} combinations searched",
        c.deciders,
        show_thresholds(&c.thresholds),
        c.rounds,
        if c.converged { "converged" } else { "not converged: last choice decoded once more" },
        c.escalation_cost,
        c.candidates
    );
    println!(
        "  on its own decode: {} tokens, composed agreement {:.4} (lower bound {:.4}), answered per stage {:?}, mean cost {:.2}",
        c.tokens, c.agreement, c.bounded_agreement, c.answered, c.cost
    );
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

/// Held-out check of one exit.
#[derive(Debug, Clone, Serialize)]
pub struct CheckEntry {
    pub point: usize,
    pub threshold: Option<f64>,
    pub tokens: usize,
    pub accepted: usize,
    /// Agreement among accepted tokens (1 when none is accepted).
    pub agreement: f64,
    pub escalation: f64,
}

/// Report of `--check`.
#[derive(Debug, Clone, Serialize)]
pub struct CheckReport {
    pub calibration: PathBuf,
    pub measure: ConfidenceMeasure,
    pub target_agreement: f64,
    pub task: String,
    pub examples_per_task: usize,
    pub split: u64,
    pub calibrated_on_split: u64,
    pub exits: Vec<CheckEntry>,
    /// The file's cascade on its own decode of this split: tokens, agreeing tokens,
    /// composed agreement, its lower bound at the file's delta (thresholds fixed before
    /// this split was seen: a valid held-out bound), tokens answered per stage.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cascade: Option<CascadeCheck>,
}

/// Held-out check of a cascade.
#[derive(Debug, Clone, Serialize)]
pub struct CascadeCheck {
    pub deciders: Vec<usize>,
    pub thresholds: Vec<Option<f64>>,
    pub tokens: usize,
    pub agreeing: usize,
    pub agreement: f64,
    pub bounded_agreement: f64,
    pub answered: Vec<usize>,
    /// Mean layers on a token's path (see [`layers_per_token`]) and the full model's.
    pub layers_per_token: f64,
    pub full_layers: usize,
}

/// Mean layers computed on the path of a generated token: a token answered at decider
/// exit `p` ran trunk layers `[0, p)` and the exit's own block (`p + 1`), one answered by
/// the deepest exit all `num_layers`. The skipped layers' KV that a later escalated token
/// back-fills (in one batched pass with it) is not counted.
pub fn layers_per_token(deciders: &[usize], answered: &[usize], num_layers: usize) -> f64 {
    let n: usize = answered.iter().sum();
    let layers: usize = answered
        .iter()
        .enumerate()
        .map(|(j, a)| a * deciders.get(j).map_or(num_layers, |p| p + 1))
        .sum();
    layers as f64 / n.max(1) as f64
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
    let t0 = std::time::Instant::now();
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

fn print_header(a: &CalibrateArgs, f: &CalibrationFile) {
    let bound = match f.bound {
        Some(b) => format!(
            "{} lower bound at delta {}",
            match b.kind {
                BoundKind::ClopperPearson => "Clopper-Pearson",
                BoundKind::Hoeffding => "Hoeffding",
            },
            b.delta
        ),
        None => "empirical agreement (no bound)".into(),
    };
    println!(
        "calibrated {}: measure {}, target agreement {:.3}, {bound}",
        a.dir.display(),
        f.measure.name(),
        f.target_agreement
    );
}

/// Per exit: threshold, accepted tokens, agreement, bound, escalation.
fn print_exits(f: &CalibrationFile) {
    println!(
        "{:>5}  {:>10}  {:>13}  {:>10}  {:>11}  {:>10}",
        "exit", "threshold", "accepted", "agreement", "lower bound", "escalation"
    );
    for e in &f.exits {
        if e.point == f.deepest_exit {
            println!(
                "{:>5}  {:>10}  {:>13}  {:>10}  {:>11}  {:>10}",
                e.point, "-", "all", "1 (ref)", "-", "0.0%"
            );
            continue;
        }
        match e.threshold {
            Some(t) => println!(
                "{:>5}  {:>10.4}  {:>13}  {:>10.4}  {:>11.4}  {:>9.1}%",
                e.point,
                t,
                format!("{}/{}", e.accepted, e.tokens),
                e.empirical_agreement,
                e.bounded_agreement,
                e.escalation * 100.0
            ),
            None => println!(
                "{:>5}  {:>10}  {:>13}  {:>10}  {:>11}  {:>9.1}%",
                e.point,
                "none",
                format!("0/{}", e.tokens),
                "-",
                "-",
                100.0
            ),
        }
    }
}

fn print_table(
    a: &CalibrateArgs,
    f: &CalibrationFile,
    c: &Collected,
    n_examples: usize,
    secs: f64,
) -> anyhow::Result<()> {
    print_header(a, f);
    println!(
        "validation: task {}, {} examples ({} per task, split {}), {} answer tokens per exit, {:.1} s",
        f.task, n_examples, f.examples_per_task, f.split, c.tokens, secs
    );
    println!(
        "reference: {REFERENCE} ({} teacher-forced mismatches)",
        c.reference_mismatches
    );
    println!();
    print_exits(f);
    println!();
    println!("agreement with the deepest exit vs threshold (empirical; accept when confidence >= threshold):");
    for e in &c.exits {
        let pts = agreement_curve(&e.records, 6, None)?;
        let row: Vec<String> = pts
            .iter()
            .map(|p| {
                format!(
                    ">={:.4}: {:.3} ({:.0}% esc)",
                    p.threshold,
                    p.agreement,
                    p.escalation * 100.0
                )
            })
            .collect();
        println!("  exit {}: {}", e.point, row.join(" | "));
    }
    Ok(())
}

fn check(a: &CalibrateArgs, path: &Path) -> anyhow::Result<()> {
    let f = CalibrationFile::read(path)?;
    let fp = fingerprint(&a.dir)?;
    if fp != f.model_fingerprint {
        bail!(
            "{} was calibrated for model {}, but {} is {fp}",
            path.display(),
            f.model_fingerprint,
            a.dir.display()
        );
    }
    let (src, model) = load(&a.dir)?;
    let measure = from_partition_measure(f.measure);
    let Validation {
        prompts: examples,
        task,
    } = validation(a, &src, true)?;
    let collected = collect_records(&model, &examples, measure)?;
    let mut exits = Vec::new();
    for e in &collected.exits {
        let entry = f
            .exits
            .iter()
            .find(|x| x.point == e.point)
            .with_context(|| format!("{} has no entry for exit {}", path.display(), e.point))?;
        let (mut acc, mut agr) = (0usize, 0usize);
        if let Some(t) = entry.threshold {
            for r in e.records.iter().filter(|r| r.confidence >= t) {
                acc += 1;
                agr += usize::from(r.agrees);
            }
        }
        exits.push(CheckEntry {
            point: e.point,
            threshold: entry.threshold,
            tokens: e.records.len(),
            accepted: acc,
            agreement: if acc == 0 {
                1.0
            } else {
                agr as f64 / acc as f64
            },
            escalation: 1.0 - acc as f64 / e.records.len().max(1) as f64,
        });
    }
    let report = CheckReport {
        calibration: path.to_path_buf(),
        measure: f.measure,
        target_agreement: f.target_agreement,
        task,
        examples_per_task: a.examples,
        split: a.split_seed,
        calibrated_on_split: f.split,
        exits,
        cascade: match &f.cascade {
            Some(c) => Some(check_cascade(&model, &examples, measure, &f, c)?),
            None => None,
        },
    };
    println!(
        "held-out check of {} (calibrated on split {}) on task {}, split {}, {} answer tokens per exit; target {:.3}",
        path.display(),
        f.split,
        report.task,
        report.split,
        collected.tokens,
        f.target_agreement
    );
    if f.split == a.split_seed && f.task == report.task {
        println!("warning: this is the calibration split itself, not a held-out set");
    }
    println!(
        "{:>5}  {:>10}  {:>13}  {:>10}  {:>10}",
        "exit", "threshold", "accepted", "agreement", "escalation"
    );
    for e in &report.exits {
        println!(
            "{:>5}  {:>10}  {:>13}  {:>10.4}  {:>9.1}%",
            e.point,
            e.threshold
                .map_or_else(|| "none".to_string(), |t| format!("{t:.4}")),
            format!("{}/{}", e.accepted, e.tokens),
            e.agreement,
            e.escalation * 100.0
        );
    }
    if let Some(c) = &report.cascade {
        println!(
            "cascade {:?} at {} on its own decode: {} tokens, composed agreement {:.4} (lower bound {:.4}), answered per stage {:?}",
            c.deciders,
            show_thresholds(&c.thresholds),
            c.tokens,
            c.agreement,
            c.bounded_agreement,
            c.answered
        );
        println!(
            "  layers per token {:.2} of {} ({:.3}x the full model; exit blocks counted, back-fill not)",
            c.layers_per_token,
            c.full_layers,
            c.layers_per_token / c.full_layers.max(1) as f64
        );
    }
    if let Some(p) = &a.json {
        write_json(p, &report)?;
        println!("report written to {}", p.display());
    }
    Ok(())
}
