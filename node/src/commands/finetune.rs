//! `flow-node finetune`: sparse fine-tuning of a family's shallow member(s) into a delta.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::{DType, Tensor};
use flow_familial::init::tensor_shapes;
use flow_familial::tasks::TextCorpus;
use flow_familial::train::evaluate_examples;
use flow_familial::weights::{Checkpoint, MemorySource, TensorSource};
use flow_familial::{FamilialModel, Mode, ModelConfig, Part};
use flow_finetune::data::FtData;
use flow_finetune::delta::{base_fingerprint, Delta};
use flow_finetune::scheme::member_blocks;
use flow_finetune::select::{batch_shape, choose, estimate, Candidates};
use flow_finetune::{FtOptions, Scheme, SparseTrainer};

use super::model::DtypeArg;
use super::OsInstant;

const LONG_ABOUT: &str = "\
Fine-tune the shallow member(s) of a family on local data and write a delta checkpoint.

An edge personalises the family for its devices: it trains only a small slice of the
device member (PockEngine / tiny-training style sparse updates), then pushes the changed
tensors to its devices. The member of exit e is the embedding, trunk layers [0, e), the
exit's own block, norm and head; --exits picks which members' losses are trained
(default: the shallowest, the device's).

SCHEMES (--scheme)
  exit-heads          norm + LM head of every trained exit
  bias-norm:N         + biases and norm weights of the member's last N blocks
  channels:N:RATIO    + RATIO of the output channels (rows of largest L2 norm) of every
                        weight matrix of the last N blocks, plus their biases/norms
  ffn-out:N:RATIO     + RATIO of the output channels of the FFN output projection
                        (down_proj) of the last N blocks; with N = 1 the backward pass
                        stops at that projection (RATIO 1 = the whole matrix)
  lora:N:RANK         + rank-RANK LoRA adapters on every projection of the last N blocks
  full                every tensor of the member (the baseline)
  auto                the best scheme whose estimated training memory fits --budget-mb:
                        each fitting candidate trains --probe-steps steps and the one
                        that lowers the validation loss most wins (contribution analysis)
Only the trained slices are candle variables, so no backward graph is built below the
first of them; gradients are applied and freed parameter by parameter.

WHAT CANDLE DOES NOT PERMIT (PockEngine's update-as-soon-as-the-gradient-exists)
  candle's Tensor::backward walks the whole graph in one call and returns a GradStore
  with every gradient; there is no per-parameter hook during the pass. So the optimizer
  step cannot be interleaved with backpropagation, and all of one step's gradients are
  alive together at the end of backward. What runs instead: the graph and activations
  are dropped right after backward, then each gradient is taken out of the store, used
  for its parameter's AdamW update (per-parameter norm clip, no global clip) and freed
  before the next. Peak = max(forward+backward, weights + optimizer state + remaining
  gradients), not their sum. Row-sliced matrices (channels, ffn-out < 1) go through a
  sliced matmul: the trainable rows are merged into the frozen matrix inside the op,
  and its backward pass computes the input's gradient and the trained rows' gradient
  only, never the whole matrix's.

PRETRAINED MODELS (SmolLM2)
  --model smollm2-135m-instruct (a pulled name or a GGUF file) fine-tunes the whole
  pretrained model (its last layer is the exit) on --task word-category: which of eight
  categories a word belongs to, answered in exactly one lowercase word then <|im_end|>,
  with the model's own chat template; 288 words written for this project, split by word
  (176 train, 40 validation for `auto`'s probes, 72 held-out test words). The frozen
  weights stay quantized and mapped (quantized kernels, no gradient graph below the
  first trained slice); only the trained slices are f32 master copies, so --budget-mb
  counts those, their optimizer state and the activations kept for backward. More
  schemes there: blocks:N (every tensor of the last N blocks) and bias-norm:30 (SmolLM2
  has no biases: the norms of every block). The tied embedding (= the LM head) is
  trained by `full` only. `auto` probes bias-norm:30, channels:2:0.25, lora:4:8,
  blocks:1, blocks:2 and full. Defaults there: --steps 60 --batch 8 --lr 1e-3, and
  full fine-tuning at --full-lr 1e-4. Accuracy before/after is exact match on the
  held-out words (plus a lenient score: the answer names the right category and no
  other). The delta is bound to the SHA-256 of the GGUF file, stored in --delta-dtype.

DATA
  --task add|lookup|reverse|mix   the built-in tasks (see `flow-node model train --help`)
  --task add-long                 sums with 3-4 digit operands: the shifted domain of
                                  `flow-node bench finetune`
  --task add-5                    sums with a 5-digit operand (training stopped at 4):
                                  the shift for deeper members (`bench finetune --exit 3`)
  --data FILE                     next-byte language modelling on a UTF-8 file

OUTPUT
  --out FILE gets a safetensors delta: only the tensors that changed (in the base's
  dtype), with the base checkpoint's SHA-256 fingerprint and --delta-version in its metadata.
  A device refuses it unless its base has that fingerprint and the version is newer
  than what it runs. Per-exit accuracy before/after is printed (tasks only).

EXAMPLES
  flow-node finetune --model models/small --task add-long --scheme auto --budget-mb 8 \\
      --steps 300 --out /tmp/delta-v1.safetensors
  flow-node finetune --model smollm2-135m-instruct --budget-mb 300 \\
      --out /tmp/smollm2-delta-v1.safetensors";

/// Arguments of `flow-node finetune`.
#[derive(clap::Args, Debug)]
#[command(before_long_help = LONG_ABOUT)]
pub struct FinetuneArgs {
    /// Base: a family checkpoint directory (HF layout), or a pretrained model (a pulled
    /// name like smollm2-135m-instruct, or a GGUF file).
    #[arg(long, value_parser = super::model_arg)]
    pub model: PathBuf,
    /// Task: add, lookup, reverse, mix, add-long or add-5 (default add-long) for a family;
    /// word-category (the default) for a pretrained model.
    #[arg(long, conflicts_with = "data")]
    pub task: Option<String>,
    /// UTF-8 text file to fine-tune on (next-byte prediction) instead of --task.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Bytes per text window (with --data).
    #[arg(long, default_value_t = 64)]
    pub window: usize,
    /// Scheme name (see above) or `auto`.
    #[arg(long, default_value = "auto")]
    pub scheme: String,
    /// Training memory budget in MB (estimate; decides `auto`, and refuses a named scheme
    /// that does not fit).
    #[arg(long, default_value_t = 64.0)]
    pub budget_mb: f64,
    /// Exit points whose members are trained, e.g. 1 or 1,3 (default: the shallowest).
    #[arg(long, value_delimiter = ',')]
    pub exits: Vec<usize>,
    /// Optimiser steps (default 300; 60 on a pretrained model).
    #[arg(long)]
    pub steps: Option<u64>,
    /// Sequences per step (default 16; 8 on a pretrained model).
    #[arg(long)]
    pub batch: Option<usize>,
    /// Peak learning rate (AdamW; default 1e-3). Sparse schemes: ~1e-3; full: <= 3e-4.
    #[arg(long)]
    pub lr: Option<f64>,
    /// Peak learning rate when the scheme is `full` on a pretrained model (default 1e-4).
    #[arg(long)]
    pub full_lr: Option<f64>,
    /// Warm-up steps (linear), then a cosine decay to --min-lr-ratio x the peak.
    #[arg(long, default_value_t = 20)]
    pub warmup: u64,
    /// Final learning rate as a fraction of the peak (1 = constant after warm-up).
    #[arg(long, default_value_t = 0.1)]
    pub min_lr_ratio: f64,
    /// Per-parameter gradient-norm clip (0 = off).
    #[arg(long, default_value_t = 1.0)]
    pub clip: f64,
    /// Data / LoRA seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Steps each candidate trains during `--scheme auto`.
    #[arg(long, default_value_t = 20)]
    pub probe_steps: u64,
    /// Held-out examples per evaluation.
    #[arg(long, default_value_t = 100)]
    pub eval_examples: usize,
    /// Version of the delta (>= 1, newer than what the devices run).
    #[arg(long, default_value_t = 1)]
    pub delta_version: u64,
    /// Where to write the delta (safetensors).
    #[arg(long)]
    pub out: PathBuf,
    /// Dtype of the delta's tensors on a pretrained model (a family's delta uses the
    /// base checkpoint's dtype).
    #[arg(long, value_enum, default_value_t = DtypeArg::F16)]
    pub delta_dtype: DtypeArg,
    /// Compute threads on a pretrained model (quantized kernels).
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
}

/// A base checkpoint in memory.
pub(crate) struct Base {
    pub cfg: ModelConfig,
    /// Every tensor, f32.
    pub tensors: HashMap<String, Tensor>,
    /// Stored dtype (deltas use it).
    pub dtype: DType,
    pub fingerprint: [u8; 32],
}

pub(crate) fn load_base(dir: &Path) -> anyhow::Result<Base> {
    let cfg = flow_familial::source::model_config(dir)
        .with_context(|| format!("reading {}", dir.display()))?;
    let ck = Checkpoint::open(dir).with_context(|| format!("opening {}", dir.display()))?;
    let fingerprint = base_fingerprint(&ck)?;
    let dtype = match ck.tensor_infos().values().next().map(|(d, _)| d.as_str()) {
        Some("F16") => DType::F16,
        Some("BF16") => DType::BF16,
        _ => DType::F32,
    };
    let mut tensors = HashMap::new();
    for (n, s) in tensor_shapes(&cfg)? {
        let t = ck.get(&n, &s)?;
        tensors.insert(n, t);
    }
    Ok(Base {
        cfg,
        tensors,
        dtype,
        fingerprint,
    })
}

/// The whole family with `updated` tensors over `base`, for inference.
pub(crate) fn family_with(
    base: &Base,
    updated: &HashMap<String, Tensor>,
) -> anyhow::Result<FamilialModel> {
    let mut t = base.tensors.clone();
    t.extend(updated.iter().map(|(k, v)| (k.clone(), v.clone())));
    Ok(FamilialModel::from_source(
        base.cfg.clone(),
        Part::full(&base.cfg),
        &MemorySource::new(t),
        Mode::Infer,
    )?)
}

fn per_exit(model: &FamilialModel, data: &FtData, n: usize) -> anyhow::Result<Option<Vec<f64>>> {
    let ex = data.eval_examples(n, 0);
    if ex.is_empty() {
        return Ok(None);
    }
    Ok(Some(
        evaluate_examples(model, &ex)?
            .iter()
            .map(|s| s.exact)
            .collect(),
    ))
}

/// `steps` optimiser steps of `tr` on `data` (batches of `batch`, seeded by `seed`) behind
/// a progress bar labelled `label`: each step's time (ms) and the last training loss.
pub(crate) fn run_steps(
    tr: &mut SparseTrainer,
    data: &FtData,
    steps: u64,
    batch: usize,
    seed: u64,
    label: &str,
) -> anyhow::Result<(Vec<f64>, f64)> {
    let pb = super::train::step_progress(steps)?;
    let mut times = Vec::with_capacity(steps as usize);
    let mut last = f64::NAN;
    for step in 0..steps {
        let seqs = data.train_batch(batch, seed, step);
        let t0 = OsInstant::now();
        last = tr.train_step(&seqs)?.loss;
        times.push(t0.elapsed().as_secs_f64() * 1e3);
        pb.inc(1);
        pb.set_message(format!("{label} loss {last:.4}"));
        if (step + 1) % 50 == 0 {
            tracing::info!(step = step + 1, loss = last, "finetune");
        }
    }
    pb.finish_and_clear();
    Ok((times, last))
}

pub fn run(a: FinetuneArgs) -> anyhow::Result<()> {
    if super::finetune_real::is_pretrained(&a.model) {
        return super::finetune_real::run(a);
    }
    super::train::tune_malloc();
    let (steps, batch, lr) = (
        a.steps.unwrap_or(300),
        a.batch.unwrap_or(16),
        a.lr.unwrap_or(1e-3),
    );
    if a.delta_version == 0 {
        bail!("--delta-version must be at least 1 (0 is the base itself)");
    }
    let base = load_base(&a.model)?;
    let data = match &a.data {
        Some(p) => FtData::Text(
            TextCorpus::from_file(p, a.window)
                .with_context(|| format!("reading {}", p.display()))?,
        ),
        None => FtData::task(a.task.as_deref().unwrap_or("add-long"))?,
    };
    let opts = FtOptions {
        steps,
        batch,
        lr,
        warmup: a.warmup,
        min_lr_ratio: a.min_lr_ratio,
        clip_norm: a.clip,
        seed: a.seed,
        exits: a.exits.clone(),
        ..Default::default()
    };
    let points = opts.points(&base.cfg)?;
    let budget = (a.budget_mb * 1e6) as usize;
    let val = data.eval_sequences(64, 1);
    let scheme = if a.scheme == "auto" {
        let blocks = member_blocks(&base.cfg, points[0])?.len();
        let cands = Scheme::candidates(blocks);
        eprintln!(
            "contribution analysis: {} candidates, {} probe steps each, budget {:.1} MB",
            cands.len(),
            a.probe_steps,
            a.budget_mb
        );
        let make = |s: &Scheme| {
            SparseTrainer::new(base.cfg.clone(), &base.tensors, s.clone(), opts.clone())
        };
        let (len, rows) = batch_shape(&data, a.seed);
        let est = |s: &Scheme| estimate(&base.cfg, s, &opts, len, rows);
        let c = Candidates {
            schemes: &cands,
            make: &make,
            estimate: &est,
        };
        let (s, probes) = choose(&c, budget, &data, &opts, a.probe_steps, &val, &mut |_| {})?;
        eprintln!("| scheme | est. MB | trainable | fits | val loss before | after |");
        eprintln!("|---|---|---|---|---|---|");
        for p in &probes {
            eprintln!(
                "| {} | {:.2} | {} | {} | {:.4} | {:.4} |",
                p.scheme,
                p.estimate.total() as f64 / 1e6,
                p.trainable,
                if p.fits { "yes" } else { "no" },
                p.val_before,
                p.val_after
            );
        }
        eprintln!("chose {s}");
        s
    } else {
        let s: Scheme = a.scheme.parse()?;
        let (len, rows) = batch_shape(&data, a.seed);
        let est = estimate(&base.cfg, &s, &opts, len, rows)?;
        if est.total() > budget {
            bail!(
                "scheme {s} needs ~{:.2} MB of training memory (estimate), over --budget-mb {}; \
                 use a sparser scheme or `--scheme auto`",
                est.total() as f64 / 1e6,
                a.budget_mb
            );
        }
        s
    };
    let before = per_exit(
        &family_with(&base, &HashMap::new())?,
        &data,
        a.eval_examples,
    )?;
    let mut tr = SparseTrainer::new(base.cfg.clone(), &base.tensors, scheme.clone(), opts)?;
    eprintln!(
        "fine-tuning exits {points:?} with {scheme}: {} of {} member parameters trainable",
        tr.num_trainable(),
        tr.num_member()
    );
    let (times, last) = run_steps(&mut tr, &data, steps, batch, a.seed, &scheme.to_string())?;
    let wall = times.iter().sum::<f64>() / 1e3;
    let updated = tr.updated()?;
    let after = per_exit(&family_with(&base, &updated)?, &data, a.eval_examples)?;
    eprintln!(
        "{} steps in {wall:.1}s ({:.1} ms/step), final train loss {last:.4}, val loss {:.4}",
        steps,
        wall * 1e3 / steps.max(1) as f64,
        tr.eval_loss(&val)?
    );
    if let (Some(b), Some(af)) = (before, after) {
        eprintln!(
            "| exit | exact before | exact after ({} held-out, {}) |",
            a.eval_examples,
            data.name()
        );
        eprintln!("|---|---|---|");
        for (i, p) in base.cfg.exit_points().iter().enumerate() {
            eprintln!("| {p} | {:.1}% | {:.1}% |", b[i] * 100.0, af[i] * 100.0);
        }
    }
    let delta = Delta::diff(
        &base.tensors,
        &updated,
        base.dtype,
        base.fingerprint,
        a.delta_version,
        &scheme.to_string(),
    )?;
    delta
        .save(&a.out)
        .with_context(|| format!("writing {}", a.out.display()))?;
    eprintln!(
        "wrote {}: {} changed tensors, {:.1} KB, version {}, base {}",
        a.out.display(),
        delta.tensors.len(),
        delta.payload_bytes() as f64 / 1e3,
        delta.version,
        &hex::encode(delta.base_fingerprint)[..16]
    );
    Ok(())
}
