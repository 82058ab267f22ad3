//! `flow-node bench finetune`: sparse schemes against full fine-tuning on a domain shift.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{bail, Context};
use flow_finetune::data::FtData;
use flow_finetune::mem::{counting, PeakScope};
use flow_finetune::select::{batch_shape, estimate};
use flow_finetune::sparse::exact_match;
use flow_finetune::{FtOptions, Scheme, SparseTrainer};
use serde::Serialize;

use super::bench_model::{loadavg, median};
use super::finetune::run_steps;
use super::finetune::{family_with, load_base};

const LONG_ABOUT: &str = "\
Sparse fine-tuning schemes against full fine-tuning of the device member, on a domain shift.

The family in --model was trained on one distribution (models/small: the `mix` task);
every scheme fine-tunes the device member (the shallowest exit, or the member of --exit)
on a shifted one
(--task, default add-long: only 3-4 digit sums, where the device exit is weak; add-5,
sums with a 5-digit operand, for deeper members: exit 3 already solves add-long), from the
same base, with the same data, steps and schedule (warm-up, then cosine decay); sparse
schemes use --lr, full fine-tuning --full-lr (a smaller step: the whole member moves,
and at the sparse rate it forgets faster than it learns). Per scheme it reports:
  - trainable parameters, and the estimated training memory `--scheme auto` uses
  - peak training memory: the peak heap growth (counting allocator) while training, above
    the resident base weights (frozen tensors share the base's storage)
  - time per step (median over the run) and its ratio to full fine-tuning
  - device-exit exact-match accuracy on held-out shifted examples, before and after
The target: the best sparse scheme within 1 point of full fine-tuning's accuracy with
>= 3x less peak memory and >= 2x faster steps (best = the most accurate of those meeting
both ratios, else the most accurate overall). `flow-node finetune --help` says what
candle does not permit of PockEngine's per-parameter update reordering.

PRETRAINED MODELS
  --model smollm2-135m-instruct (a pulled name or a GGUF file) runs the same comparison
  on the whole pretrained model (its last layer is the exit) and the `word-category` task
  (see `flow-node finetune --help`): default schemes bias-norm:30 (every norm), lora:4:8,
  blocks:1, blocks:2, then full; defaults --steps 60 --batch 8 --lr 1e-3 --full-lr 1e-4.
  Frozen weights stay quantized and mapped (not heap), so peak heap is what training
  adds; VmHWM (the process's peak RSS so far, mapped file pages included) is printed too
  and only grows from row to row. Accuracy is exact match on 72 held-out words (and a
  lenient score: the answer names the right category only). Per scheme also the f16
  delta's size (vs the GGUF file) and the time to apply it: parse, check the base's
  SHA-256 and shapes, build the model.";

/// Arguments of `flow-node bench finetune`.
#[derive(clap::Args, Debug)]
#[command(before_long_help = LONG_ABOUT)]
pub struct BenchFinetuneArgs {
    /// Base family, or a pretrained model (pulled name or GGUF file).
    #[arg(long, default_value = "models/small", value_parser = super::model_arg)]
    pub model: PathBuf,
    /// Shifted task to fine-tune on.
    #[arg(long, default_value = "add-long")]
    pub task: String,
    /// Schemes to compare (full fine-tuning is always added unless --no-full); default
    /// exit-heads,ffn-out:1:1,ffn-out:1:0.5,channels:1:0.5,lora:1:8 (families) or
    /// bias-norm:30,lora:4:8,blocks:1,blocks:2 (pretrained).
    #[arg(long, value_delimiter = ',')]
    pub schemes: Vec<String>,
    /// Leave full fine-tuning out (pretrained models only: to measure schemes in
    /// separate processes).
    #[arg(long)]
    pub no_full: bool,
    /// Steps per scheme (default 300; 60 on a pretrained model).
    #[arg(long)]
    pub steps: Option<u64>,
    /// Sequences per step (default 16; 8 on a pretrained model).
    #[arg(long)]
    pub batch: Option<usize>,
    /// Peak learning rate of the sparse schemes (default 1e-3; few parameters, which
    /// tolerate and need a larger step than the whole member).
    #[arg(long)]
    pub lr: Option<f64>,
    /// Peak learning rate of full fine-tuning (default 3e-4; 1e-4 on a pretrained model:
    /// the whole member moves, and too large a step forgets what the base knew faster than
    /// it learns the shift).
    #[arg(long)]
    pub full_lr: Option<f64>,
    /// Compute threads on a pretrained model (quantized kernels).
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Warm-up steps (linear), then a cosine decay to --min-lr-ratio x the peak.
    #[arg(long, default_value_t = 20)]
    pub warmup: u64,
    /// Final learning rate as a fraction of the peak (1 = constant after warm-up).
    #[arg(long, default_value_t = 0.1)]
    pub min_lr_ratio: f64,
    /// Held-out examples for accuracy.
    #[arg(long, default_value_t = 200)]
    pub eval_examples: usize,
    /// Data seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Exit point of the member to fine-tune (default: the shallowest). The member is the
    /// embedding, trunk layers [0, EXIT) and the exit's own block, norm and head, so a
    /// deeper exit is a deeper member: `--exit 3` on models/small is 4 blocks deep,
    /// where a scheme confined to the last block leaves 3 of 4 blocks frozen (no graph,
    /// no activations kept, inference kernels) while full fine-tuning trains them all.
    #[arg(long)]
    pub exit: Option<usize>,
    /// Print the report as JSON too.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
struct Row {
    scheme: String,
    lr: f64,
    trainable: usize,
    est_mb: f64,
    peak_mb: f64,
    step_ms: f64,
    acc_before: f64,
    acc_after: f64,
    final_loss: f64,
}

pub fn run(a: BenchFinetuneArgs) -> anyhow::Result<()> {
    if super::finetune_real::is_pretrained(&a.model) {
        return super::bench_finetune_real::run(a);
    }
    super::train::tune_malloc();
    let (steps, batch) = (a.steps.unwrap_or(300), a.batch.unwrap_or(16));
    let (lr, full_lr) = (a.lr.unwrap_or(1e-3), a.full_lr.unwrap_or(3e-4));
    let names: Vec<String> = if a.schemes.is_empty() {
        "exit-heads,ffn-out:1:1,ffn-out:1:0.5,channels:1:0.5,lora:1:8"
            .split(',')
            .map(str::to_string)
            .collect()
    } else {
        a.schemes.clone()
    };
    if !counting() {
        bail!("the counting allocator is not installed; peak memory cannot be measured");
    }
    let base = load_base(&a.model)?;
    let data = FtData::task(&a.task)?;
    let mut schemes: Vec<Scheme> = names
        .iter()
        .map(|s| s.parse::<Scheme>())
        .collect::<Result<_, _>>()?;
    schemes.retain(|s| *s != Scheme::Full);
    schemes.push(Scheme::Full);
    let opts = FtOptions {
        steps,
        batch,
        lr,
        warmup: a.warmup,
        min_lr_ratio: a.min_lr_ratio,
        seed: a.seed,
        exits: a.exit.into_iter().collect(),
        ..Default::default()
    };
    let point = opts.points(&base.cfg)?[0];
    let eval = data.eval_examples(a.eval_examples, 0);
    let before = exact_match(&family_with(&base, &HashMap::new())?, &eval, point)?;
    let (len, rows) = batch_shape(&data, a.seed);
    let load_start = loadavg();
    let mut out = Vec::new();
    for s in &schemes {
        let opts = FtOptions {
            lr: if *s == Scheme::Full { full_lr } else { lr },
            ..opts.clone()
        };
        let est = estimate(&base.cfg, s, &opts, len, rows)?;
        let scope = PeakScope::start();
        let mut tr = SparseTrainer::new(base.cfg.clone(), &base.tensors, s.clone(), opts.clone())
            .with_context(|| format!("scheme {s}"))?;
        let (times, last) = run_steps(&mut tr, &data, steps, batch, a.seed, &s.to_string())?;
        let peak = scope.peak_bytes();
        let acc = exact_match(&tr.infer_model()?, &eval, point)?;
        let row = Row {
            scheme: s.to_string(),
            lr: opts.lr,
            trainable: tr.num_trainable(),
            est_mb: est.total() as f64 / 1e6,
            peak_mb: peak as f64 / 1e6,
            step_ms: median(&times),
            acc_before: before,
            acc_after: acc,
            final_loss: last,
        };
        eprintln!(
            "{}: {:.2} MB peak, {:.2} ms/step, exit {point} {:.1}% -> {:.1}%",
            row.scheme,
            row.peak_mb,
            row.step_ms,
            before * 100.0,
            acc * 100.0
        );
        out.push(row);
    }
    let full = out.last().context("no schemes")?;
    println!(
        "bench finetune: {} -> {} (member of exit {point}), {} steps x {} seqs, warm-up {} + cosine to {}x, {} held-out; load {} -> {}",
        a.model.display(),
        data.name(),
        steps,
        batch,
        a.warmup,
        a.min_lr_ratio,
        a.eval_examples,
        load_start,
        loadavg()
    );
    println!("| scheme | lr | trainable params | est. MB | peak MB | mem vs full | ms/step | speed vs full | exit {point} before | after | final loss |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for r in &out {
        println!(
            "| {} | {:e} | {} | {:.2} | {:.2} | {:.1}x less | {:.2} | {:.1}x | {:.1}% | {:.1}% | {:.3} |",
            r.scheme,
            r.lr,
            r.trainable,
            r.est_mb,
            r.peak_mb,
            full.peak_mb / r.peak_mb.max(1e-9),
            r.step_ms,
            full.step_ms / r.step_ms.max(1e-9),
            r.acc_before * 100.0,
            r.acc_after * 100.0,
            r.final_loss
        );
    }
    let cheap = |r: &&Row| {
        full.peak_mb / r.peak_mb.max(1e-9) >= 3.0 && full.step_ms / r.step_ms.max(1e-9) >= 2.0
    };
    let sparse = &out[..out.len() - 1];
    let best = sparse
        .iter()
        .filter(cheap)
        .max_by(|x, y| x.acc_after.total_cmp(&y.acc_after))
        .or_else(|| {
            sparse
                .iter()
                .max_by(|x, y| x.acc_after.total_cmp(&y.acc_after))
        });
    if full.acc_after <= full.acc_before {
        println!(
            "full fine-tuning did not improve exit {point} ({:.1}% -> {:.1}%): this task is no \
             domain shift this member can learn in {} steps, and matching full FT here means nothing",
            full.acc_before * 100.0,
            full.acc_after * 100.0,
            steps
        );
    }
    if let Some(b) = best {
        let gap = (full.acc_after - b.acc_after) * 100.0;
        let mem = full.peak_mb / b.peak_mb.max(1e-9);
        let speed = full.step_ms / b.step_ms.max(1e-9);
        println!(
            "best sparse: {} ({:.1} points {} full FT, {mem:.1}x less peak memory, {speed:.1}x faster steps): target {}",
            b.scheme,
            gap.abs(),
            if gap >= 0.0 { "below" } else { "above" },
            if gap <= 1.0 && mem >= 3.0 && speed >= 2.0 && full.acc_after > full.acc_before {
                "met"
            } else {
                "NOT met"
            }
        );
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    Ok(())
}
