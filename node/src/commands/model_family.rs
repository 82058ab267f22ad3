//! `flow-node model family`: attach Ruyi-style exits to a pretrained model and train them by
//! distillation from its deepest exit (flow_familial::family).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use flow_familial::family::data::{generate, ChatEncoder, ChatSample};
use flow_familial::family::distill::{Distiller, ExitStats};
use flow_familial::family::prompts::{chat_prompts, Split};
use flow_familial::family::{
    base_digest, select_exits, BaseRef, Family, FamilyManifest, OVERLAY_FORMAT,
};
use flow_familial::tasks::Sequence;
use flow_familial::train::{TrainOptions, STATE_JSON};
use flow_familial::{ModelSource, Part};
use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::model::DtypeArg;
use super::train::step_progress;
use super::OsInstant;

const LONG_ABOUT: &str = "\
Build a family from a pretrained model: attach exits, train them, write an overlay.

Each exit at point p reads the hidden state after trunk layers [0, p) (what a device ships
to its edge) and runs its own decoder block (initialised as a copy of trunk layer p), its
own RMSNorm (initialised as the final norm) and the base's tied head. Before training an
exit is exactly the 'logit lens' of layer p; training moves it towards the deepest exit.
The trunk stays frozen (no gradient reaches it; it runs its quantized kernels).

DATA (self-distillation, offline)
  Chat prompts from templates x topics written for this project (split by topic into
  train / calibrate / test, so held-out prompts are about unseen things), rendered with
  the model's chat template and answered greedily by the full model, up to --max-new
  tokens. Stored in OUT/data/{train,test}.jsonl and reused by later runs and --resume.

LOSS (per exit, mean over answer tokens)
  KL(deepest exit || exit) over the full vocabulary + --ce-weight x CE(next token).

OUTPUT
  OUT/family.json + OUT/model.safetensors (the overlay: exit blocks and norms, --save-dtype)
  reference the base by sha256; `--model OUT` then works everywhere (node, cluster, demo,
  model run/inspect). OUT/train_state.* let --resume continue exactly; OUT/eval.json has
  the per-exit held-out KL and top-1 agreement with the deepest exit, before and after.

EXAMPLE (models/smollm2-family; see its TRAINED.md)
  flow-node model family --base smollm2-135m-instruct --exits 10,20 --out /tmp/fam";

/// Arguments of `flow-node model family`.
#[derive(clap::Args, Debug)]
#[command(before_long_help = LONG_ABOUT)]
pub struct FamilyArgs {
    /// Base model: a pulled name (smollm2-135m-instruct), a GGUF file or an HF directory.
    #[arg(long, value_parser = super::model_arg)]
    pub base: PathBuf,
    /// Exit points below the last layer, ascending (e.g. 10,20); the last layer is added.
    #[arg(long, value_delimiter = ',', required = true)]
    pub exits: Vec<usize>,
    /// Trained exits the overlay keeps (default: all). Train several candidates, measure,
    /// deploy few: every exit a tier evaluates costs its block and a head pass. With
    /// --resume at the last step, only rewrites the overlay.
    #[arg(long, value_delimiter = ',')]
    pub keep: Vec<usize>,
    /// Output directory (overlay, training state, data cache).
    #[arg(long)]
    pub out: PathBuf,
    /// Training prompts (from the train split).
    #[arg(long, default_value_t = 1200)]
    pub prompts: usize,
    /// Held-out prompts for evaluation (test split).
    #[arg(long, default_value_t = 96)]
    pub eval_prompts: usize,
    /// Answer length cap when generating the data.
    #[arg(long, default_value_t = 64)]
    pub max_new: usize,
    /// Prompts answered together while generating.
    #[arg(long, default_value_t = 16)]
    pub gen_batch: usize,
    /// Optimiser steps.
    #[arg(long, default_value_t = 600)]
    pub steps: u64,
    /// Sequences per step.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Peak learning rate (AdamW, warm-up then cosine to 0.1x).
    #[arg(long, default_value_t = 5e-4)]
    pub lr: f64,
    #[arg(long, default_value_t = 30)]
    pub warmup: u64,
    /// Decoupled weight decay on the exit blocks' matrices.
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Weight of the next-token cross-entropy beside the KL.
    #[arg(long, default_value_t = 0.0)]
    pub ce_weight: f64,
    /// Seed of the data order (and of the prompt draw).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Evaluate on the held-out prompts every N steps (0 = only before and after).
    #[arg(long, default_value_t = 100)]
    pub eval_every: u64,
    /// Write the overlay and training state every N steps.
    #[arg(long, default_value_t = 100)]
    pub save_every: u64,
    /// Dtype of the overlay tensors.
    #[arg(long, value_enum, default_value_t = DtypeArg::F16)]
    pub save_dtype: DtypeArg,
    /// Memory for the teacher's per-sequence outputs, reused by later epochs and evaluations
    /// (MiB; 0 = recompute every step): 4 x hidden bytes per token and exit point.
    #[arg(long, default_value_t = 4096)]
    pub teacher_cache_mb: usize,
    /// Matmul threads.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Continue the run in --out.
    #[arg(long)]
    pub resume: bool,
}

fn read_jsonl(path: &Path) -> anyhow::Result<Vec<ChatSample>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l).with_context(|| format!("{}:{}", path.display(), i + 1))
        })
        .collect()
}

fn write_jsonl(path: &Path, rows: &[ChatSample]) -> anyhow::Result<()> {
    let mut s = String::new();
    for r in rows {
        s.push_str(&serde_json::to_string(r)?);
        s.push('\n');
    }
    let tmp = path.with_extension("jsonl.tmp");
    std::fs::write(&tmp, s).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

/// The cached samples of `split` in `out/data`, generated with the base model if absent.
fn samples(
    src: &ModelSource,
    out: &Path,
    split: Split,
    n: usize,
    args: &FamilyArgs,
) -> anyhow::Result<Vec<ChatSample>> {
    let name = if split == Split::Test {
        "test"
    } else {
        "train"
    };
    let path = out.join("data").join(format!("{name}.jsonl"));
    if path.exists() {
        let rows = read_jsonl(&path)?;
        if rows.len() >= n {
            return Ok(rows.into_iter().take(n).collect());
        }
        eprintln!(
            "{}: {} samples, {n} wanted; regenerating",
            path.display(),
            rows.len()
        );
    }
    std::fs::create_dir_all(path.parent().unwrap_or(out))?;
    let prompts = chat_prompts(split, n, args.seed);
    if prompts.len() < n {
        bail!(
            "only {} distinct {name} prompts exist (asked for {n})",
            prompts.len()
        );
    }
    let mut cfg = src.config()?;
    cfg.declare_exits(&[cfg.num_layers - 1])?;
    let model = src.load_part(cfg.clone(), Part::full(&cfg))?;
    let enc = ChatEncoder::new(src)?;
    let pb = step_progress(n as u64)?;
    pb.set_message(format!(
        "answering {name} prompts (max {} tokens)",
        args.max_new
    ));
    let t0 = OsInstant::now();
    let rows = generate(&model, &enc, &prompts, args.max_new, args.gen_batch, |d| {
        pb.set_position(d as u64)
    })?;
    pb.finish_and_clear();
    let toks: usize = rows.iter().map(|r| r.answer_ids.len()).sum();
    eprintln!(
        "generated {n} {name} answers, {toks} tokens in {:.0} s ({:.0} tokens/s)",
        t0.elapsed().as_secs_f64(),
        toks as f64 / t0.elapsed().as_secs_f64()
    );
    write_jsonl(&path, &rows)?;
    Ok(rows)
}

fn evaluate(d: &Distiller, eval: &[Sequence], batch: usize) -> anyhow::Result<Vec<ExitStats>> {
    let mut acc: Vec<ExitStats> = Vec::new();
    let mut rows_total = 0usize;
    for chunk in eval.chunks(batch.max(1)) {
        let (stats, rows) = d.evaluate(chunk)?;
        if acc.is_empty() {
            acc = stats
                .iter()
                .map(|s| ExitStats {
                    kl: 0.0,
                    ce: 0.0,
                    agree: 0.0,
                    ..*s
                })
                .collect();
        }
        for (a, s) in acc.iter_mut().zip(&stats) {
            a.kl += s.kl * rows as f64;
            a.ce += s.ce * rows as f64;
            a.agree += s.agree * rows as f64;
        }
        rows_total += rows;
    }
    for a in &mut acc {
        a.kl /= rows_total.max(1) as f64;
        a.ce /= rows_total.max(1) as f64;
        a.agree /= rows_total.max(1) as f64;
    }
    Ok(acc)
}

fn fmt_stats(s: &[ExitStats]) -> String {
    s.iter()
        .map(|e| {
            format!(
                "exit {}: KL {:.3} agree {:.1}%",
                e.point,
                e.kl,
                100.0 * e.agree
            )
        })
        .collect::<Vec<_>>()
        .join(" | ")
}

fn stats_json(s: &[ExitStats]) -> serde_json::Value {
    serde_json::Value::Array(
        s.iter()
            .map(|e| serde_json::json!({"point": e.point, "kl": e.kl, "ce": e.ce, "top1_agreement": e.agree}))
            .collect(),
    )
}

/// The base reference of `path` (cache name when it came from the cache).
fn base_ref(path: &Path) -> anyhow::Result<BaseRef> {
    let (sha256, bytes) = base_digest(path)?;
    let name = if path.file_name().is_some_and(|f| f == "model.gguf") {
        path.parent().and_then(Path::file_name)
    } else {
        path.file_stem()
    }
    .map(|s| s.to_string_lossy().into_owned())
    .unwrap_or_else(|| "base".into());
    Ok(BaseRef {
        name,
        sha256,
        bytes,
        path: None,
    })
}

pub fn run(args: FamilyArgs) -> anyhow::Result<()> {
    flow_familial::set_compute_threads(args.threads);
    super::train::tune_malloc();
    let src = ModelSource::open(&args.base)?;
    if matches!(src, ModelSource::Family(_)) {
        bail!(
            "--base {} is already a family overlay; pass its base model",
            args.base.display()
        );
    }
    let n_layers = src.config()?.num_layers;
    let mut points = args.exits.clone();
    if points.last() != Some(&(n_layers - 1)) {
        points.push(n_layers - 1);
    }
    std::fs::create_dir_all(&args.out)?;
    let train = samples(&src, &args.out, Split::Train, args.prompts, &args)?;
    let test = samples(&src, &args.out, Split::Test, args.eval_prompts, &args)?;
    let train: Vec<Sequence> = train.iter().map(ChatSample::sequence).collect();
    let test: Vec<Sequence> = test.iter().map(ChatSample::sequence).collect();
    let opts = TrainOptions {
        steps: args.steps,
        batch: args.batch,
        lr: args.lr,
        warmup: args.warmup,
        weight_decay: args.weight_decay,
        seed: args.seed,
        workers: 1,
        ..TrainOptions::default()
    };
    let (mut d, mut before, prior_wall) = if args.resume {
        if !args.out.join(STATE_JSON).exists() {
            bail!("--resume: no training state in {}", args.out.display());
        }
        let (d, st) =
            Distiller::resume(src.clone(), &points, &args.out, Some(opts), args.ce_weight)?;
        let before = st.extra.get("before").cloned().unwrap_or_default();
        let wall = st
            .extra
            .get("wall_s")
            .and_then(|w| w.as_f64())
            .unwrap_or(0.0);
        (d, before, wall)
    } else {
        (
            Distiller::new(src.clone(), &points, None, opts, args.ce_weight)?,
            serde_json::Value::Null,
            0.0,
        )
    };
    d.set_teacher_cache(args.teacher_cache_mb << 20);
    eprintln!(
        "family: exits {:?} over {} ({} trainable parameters); {} training / {} held-out sequences",
        points,
        args.base.display(),
        d.num_parameters(),
        train.len(),
        test.len()
    );
    if before.is_null() {
        let s = evaluate(&d, &test, args.batch)?;
        eprintln!("before training (logit lens): {}", fmt_stats(&s));
        before = stats_json(&s);
    }
    let base = base_ref(&args.base)?;
    let save = |d: &Distiller, after: &serde_json::Value, wall: f64| -> anyhow::Result<()> {
        let extra = serde_json::json!({"before": before, "after": after, "wall_s": wall});
        d.save_state(&args.out, extra.clone())?;
        let (tensors, exit_points) = if args.keep.is_empty() {
            (d.exit_tensors(), points.clone())
        } else {
            let mut kept = args.keep.clone();
            kept.push(n_layers - 1);
            (select_exits(&d.exit_tensors(), &points, &args.keep)?, kept)
        };
        let manifest = FamilyManifest {
            format: OVERLAY_FORMAT.into(),
            base: base.clone(),
            exit_points,
            trained: serde_json::json!({
                "command": std::env::args().collect::<Vec<_>>().join(" "),
                "trained_exits": points,
                "steps": d.step_count(),
                "seed": args.seed,
                "data": "self-distillation: flow_familial::family::prompts (project-written) answered greedily by the base",
                "eval": extra,
            }),
        };
        Family::write(&args.out, &manifest, &tensors, args.save_dtype.dtype())?;
        Ok(())
    };
    let pb = step_progress(args.steps)?;
    pb.set_position(d.step_count());
    let mut order: Vec<usize> = Vec::new();
    let t0 = OsInstant::now();
    let first_step = d.step_count();
    let mut toks = 0usize;
    let mut last = serde_json::Value::Null;
    while d.step_count() < args.steps {
        let step = d.step_count();
        let per_epoch = train.len() / args.batch.max(1);
        let epoch = step / per_epoch.max(1) as u64;
        if order.is_empty() || step % per_epoch.max(1) as u64 == 0 {
            order = (0..train.len()).collect();
            order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(args.seed ^ epoch));
        }
        let at = (step as usize % per_epoch.max(1)) * args.batch;
        let batch: Vec<Sequence> = order[at..at + args.batch]
            .iter()
            .map(|&i| train[i].clone())
            .collect();
        let s = d.step(&batch)?;
        toks += s.tokens;
        pb.set_position(s.step);
        pb.set_message(format!(
            "loss {:.3} {} | {:.0} tok/s",
            s.loss,
            s.exits
                .iter()
                .map(|e| format!("e{} {:.0}%", e.point, 100.0 * e.agree))
                .collect::<Vec<_>>()
                .join(" "),
            toks as f64 / t0.elapsed().as_secs_f64()
        ));
        let end = s.step == args.steps;
        if (args.eval_every > 0 && s.step % args.eval_every == 0) || end {
            let e = evaluate(&d, &test, args.batch)?;
            let done = s.step - first_step;
            let msg = format!(
                "step {}: held-out {} ({:.1} s/step, {:.0} tok/s)",
                s.step,
                fmt_stats(&e),
                t0.elapsed().as_secs_f64() / done.max(1) as f64,
                toks as f64 / t0.elapsed().as_secs_f64()
            );
            // A hidden bar (no terminal: logs, CI) drops println: write the line itself.
            if pb.is_hidden() {
                eprintln!("{msg}");
            } else {
                pb.println(msg);
            }
            last = stats_json(&e);
        }
        if (args.save_every > 0 && s.step % args.save_every == 0) || end {
            save(&d, &last, prior_wall + t0.elapsed().as_secs_f64())?;
        }
    }
    pb.finish_and_clear();
    if d.step_count() == first_step {
        // Nothing left to train (--resume at the last step): evaluate and rewrite.
        let e = evaluate(&d, &test, args.batch)?;
        eprintln!("step {}: held-out {}", d.step_count(), fmt_stats(&e));
        last = stats_json(&e);
        save(&d, &last, prior_wall)?;
    }
    let report = serde_json::json!({"before": before, "after": last, "steps": d.step_count()});
    std::fs::write(
        args.out.join("eval.json"),
        serde_json::to_string_pretty(&report)? + "\n",
    )?;
    eprintln!(
        "wrote the overlay to {} (use --model {0})",
        args.out.display()
    );
    Ok(())
}
