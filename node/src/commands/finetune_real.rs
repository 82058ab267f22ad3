//! `flow-node finetune` on a pretrained base (SmolLM2 from its GGUF file): the frozen
//! weights stay quantized and mapped, the trained slices are f32 master copies, the task
//! is `word-category` (held-out words, a fixed answer format), and the delta is bound to
//! the base file's SHA-256.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use flow_familial::init::tensor_shapes;
use flow_familial::tokenizer::Tokenizer;
use flow_familial::weights::TensorSource;
use flow_familial::{FamilialModel, ModelConfig, ModelSource};
use flow_finetune::data::{FtData, WORD_TASK};
use flow_finetune::delta::{file_fingerprint, Delta};
use flow_finetune::scheme::{member_blocks, member_part};
use flow_finetune::select::{
    batch_shape, choose, estimate_with, Candidates, Frozen, MemoryEstimate,
};
use flow_finetune::words::{accuracy, Accuracy, Split, WordTask};
use flow_finetune::{FtOptions, Scheme, SparseTrainer};

use super::finetune::FinetuneArgs;

/// Defaults on a pretrained base (a 135M model on a 2-core CPU: short prompts, few steps).
pub(crate) const STEPS: u64 = 60;
pub(crate) const BATCH: usize = 8;
pub(crate) const LR: f64 = 1e-3;
pub(crate) const FULL_LR: f64 = 1e-4;

/// A pretrained base opened for fine-tuning on `word-category`.
pub(crate) struct Pretrained {
    pub src: ModelSource,
    /// The base's configuration with its last layer declared the (only) exit.
    pub cfg: ModelConfig,
    /// That exit.
    pub point: usize,
    pub tok: Tokenizer,
    pub task: Arc<WordTask>,
    pub base: Arc<dyn TensorSource + Send + Sync>,
    pub shapes: HashMap<String, Vec<usize>>,
    /// SHA-256 of the base file.
    pub fingerprint: [u8; 32],
    /// Bytes of the base file.
    pub file_bytes: u64,
}

/// Whether `path` is a pretrained base this path fine-tunes (a GGUF file).
pub(crate) fn is_pretrained(path: &Path) -> bool {
    flow_familial::source::is_gguf(path)
}

impl Pretrained {
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let src = ModelSource::open(path).with_context(|| format!("opening {}", path.display()))?;
        if !matches!(src, ModelSource::Gguf(_)) {
            bail!(
                "{}: fine-tuning a pretrained model needs its GGUF file (e.g. `flow-node model pull smollm2-135m-instruct`)",
                path.display()
            );
        }
        let mut cfg = src.config()?;
        let point = cfg.num_layers - 1;
        cfg.declare_exits(&[point])?;
        let tok = src.tokenizer()?;
        let chat = src
            .chat()?
            .with_context(|| format!("{} has no chat template", path.display()))?;
        let eos = tok
            .token_id("<|im_end|>")
            .or_else(|| cfg.eos_token_ids.first().copied())
            .context("the model names no end-of-turn token")?;
        let task = Arc::new(WordTask::new(&tok, &chat, eos)?);
        let shapes = tensor_shapes(&cfg)?;
        let fingerprint = file_fingerprint(path)?;
        let file_bytes = std::fs::metadata(path)?.len();
        Ok(Self {
            base: Arc::new(src.clone()),
            src,
            cfg,
            point,
            tok,
            task,
            shapes,
            fingerprint,
            file_bytes,
        })
    }

    pub fn data(&self) -> FtData {
        FtData::Words(self.task.clone())
    }

    /// Options for `steps` steps of `batch` sequences at peak rate `lr`.
    pub fn options(&self, steps: u64, batch: usize, lr: f64, warmup: u64, seed: u64) -> FtOptions {
        FtOptions {
            steps,
            batch,
            lr,
            warmup,
            seed,
            exits: vec![self.point],
            ..Default::default()
        }
    }

    /// The base member in inference mode (quantized kernels).
    pub fn base_model(&self) -> anyhow::Result<FamilialModel> {
        let part = member_part(&self.cfg, &[self.point])?;
        Ok(self.src.load_part(self.cfg.clone(), part)?)
    }

    /// Exact and lenient accuracy on the held-out test words.
    pub fn accuracy(&self, model: &FamilialModel) -> anyhow::Result<Accuracy> {
        Ok(accuracy(
            model,
            &self.tok,
            self.task.examples(Split::Test),
            self.point,
            self.task.max_target() + 8,
        )?)
    }

    pub fn trainer(
        &self,
        scheme: &Scheme,
        opts: &FtOptions,
    ) -> flow_finetune::Result<SparseTrainer> {
        SparseTrainer::over_source(
            self.cfg.clone(),
            self.base.clone(),
            scheme.clone(),
            opts.clone(),
        )
    }

    pub fn estimate(
        &self,
        scheme: &Scheme,
        opts: &FtOptions,
    ) -> flow_finetune::Result<MemoryEstimate> {
        let (len, rows) = batch_shape(&self.data(), opts.seed);
        estimate_with(&self.cfg, scheme, opts, len, rows, Frozen::Mapped)
    }

    /// Blocks of the member (the candidates of `--scheme auto` are sized by it).
    pub fn blocks(&self) -> anyhow::Result<usize> {
        Ok(member_blocks(&self.cfg, self.point)?.len())
    }
}

pub(crate) fn run(a: FinetuneArgs) -> anyhow::Result<()> {
    flow_familial::set_compute_threads(a.threads);
    super::train::tune_malloc();
    if a.delta_version == 0 {
        bail!("--delta-version must be at least 1 (0 is the base itself)");
    }
    if a.data.is_some() || a.task.as_deref().is_some_and(|t| t != WORD_TASK) {
        bail!("on a pretrained model the task is `--task {WORD_TASK}` (the built-in byte-level tasks and --data are for the toy families)");
    }
    let p = Pretrained::open(&a.model)?;
    let data = p.data();
    let steps = a.steps.unwrap_or(STEPS);
    let batch = a.batch.unwrap_or(BATCH);
    let lr = a.lr.unwrap_or(LR);
    let full_lr = a.full_lr.unwrap_or(FULL_LR);
    let opts_for = |s: &Scheme| {
        let rate = if *s == Scheme::Full { full_lr } else { lr };
        p.options(steps, batch, rate, a.warmup.min(steps / 4), a.seed)
    };
    let budget = (a.budget_mb * 1e6) as usize;
    let scheme = if a.scheme == "auto" {
        let cands = Scheme::candidates_pretrained(p.blocks()?);
        eprintln!(
            "contribution analysis: {} candidates, {} probe steps each on {} validation words, budget {:.1} MB",
            cands.len(),
            a.probe_steps,
            p.task.examples(Split::Validation).len(),
            a.budget_mb
        );
        let make = |s: &Scheme| p.trainer(s, &opts_for(s));
        let est = |s: &Scheme| p.estimate(s, &opts_for(s));
        let c = Candidates {
            schemes: &cands,
            make: &make,
            estimate: &est,
        };
        let val = data.eval_sequences(64, 1);
        eprintln!("| scheme | est. MB | trainable | fits | val loss before | after |");
        eprintln!("|---|---|---|---|---|---|");
        let (s, _) = choose(
            &c,
            budget,
            &data,
            &opts_for(&Scheme::Full),
            a.probe_steps,
            &val,
            &mut |p| {
                eprintln!(
                    "| {} | {:.1} | {} | {} | {:.4} | {:.4} |",
                    p.scheme,
                    p.estimate.total() as f64 / 1e6,
                    p.trainable,
                    if p.fits { "yes" } else { "no" },
                    p.val_before,
                    p.val_after
                )
            },
        )?;
        eprintln!("chose {s}");
        s
    } else {
        let s: Scheme = a.scheme.parse()?;
        let est = p.estimate(&s, &opts_for(&s))?;
        if est.total() > budget {
            bail!(
                "scheme {s} needs ~{:.1} MB of training memory (estimate), over --budget-mb {}; \
                 use a sparser scheme or `--scheme auto`",
                est.total() as f64 / 1e6,
                a.budget_mb
            );
        }
        s
    };
    let opts = opts_for(&scheme);
    eprintln!(
        "held-out accuracy of the base ({} test words)...",
        p.task.examples(Split::Test).len()
    );
    let before = p.accuracy(&p.base_model()?)?;
    let mut tr = p.trainer(&scheme, &opts)?;
    eprintln!(
        "fine-tuning {} with {scheme} (lr {:e}): {} of {} parameters trainable",
        a.model.display(),
        opts.lr,
        tr.num_trainable(),
        tr.num_member()
    );
    let (times, last) =
        super::finetune::run_steps(&mut tr, &data, steps, batch, a.seed, &scheme.to_string())?;
    let wall = times.iter().sum::<f64>() / 1e3;
    let after = p.accuracy(&tr.infer_model()?)?;
    eprintln!(
        "{steps} steps in {wall:.1}s ({:.0} ms/step), final train loss {last:.4}",
        wall * 1e3 / steps.max(1) as f64
    );
    eprintln!(
        "| held-out ({} words) | exact | lenient |",
        p.task.examples(Split::Test).len()
    );
    eprintln!("|---|---|---|");
    eprintln!(
        "| before | {:.1}% | {:.1}% |",
        before.exact * 100.0,
        before.lenient * 100.0
    );
    eprintln!(
        "| after | {:.1}% | {:.1}% |",
        after.exact * 100.0,
        after.lenient * 100.0
    );
    let delta = Delta::diff_source(
        p.base.as_ref(),
        &p.shapes,
        &tr.updated()?,
        a.delta_dtype.dtype(),
        p.fingerprint,
        a.delta_version,
        &scheme.to_string(),
    )?;
    delta
        .save(&a.out)
        .with_context(|| format!("writing {}", a.out.display()))?;
    let bytes = std::fs::metadata(&a.out)?.len();
    eprintln!(
        "wrote {}: {} changed tensors, {:.2} MB ({:.1}% of the {:.1} MB base file), version {}, base sha256 {}",
        a.out.display(),
        delta.tensors.len(),
        bytes as f64 / 1e6,
        100.0 * bytes as f64 / p.file_bytes as f64,
        p.file_bytes as f64 / 1e6,
        delta.version,
        &hex::encode(delta.base_fingerprint)[..16]
    );
    Ok(())
}
