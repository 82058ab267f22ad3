//! Which scheme to train: memory estimates and a contribution analysis.
//!
//! [`estimate`] predicts a scheme's training memory from the plan alone: the member's
//! weights (f32), gradient + two AdamW moments per trainable element, the materialised
//! merged matrix and its gradient for LoRA tensors (a transient merge for row slices), and
//! the activations kept
//! for backward from the first block that holds a trainable slice up to the exit (blocks
//! below it build no graph). [`choose`] then runs, as tiny-training's contribution analysis
//! does, a short probe of every scheme that fits the budget on the training stream and
//! keeps the one that lowers the validation loss most. `flow-node bench finetune` prints
//! the estimate next to the measured peak.

use flow_familial::init::tensor_shapes;
use flow_familial::tasks::Sequence;
use flow_familial::ModelConfig;
use serde::Serialize;

use crate::data::FtData;
use crate::error::{Error, Result};
use crate::scheme::{member_blocks, Scheme, SliceKind};
use crate::sparse::{FtOptions, SparseTrainer};

/// Predicted training memory of a scheme, bytes.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct MemoryEstimate {
    /// The member's weights in f32.
    pub weights: usize,
    /// Gradients and AdamW moments (plus merged matrices of sliced/LoRA tensors).
    pub optimizer: usize,
    /// Activations kept for the backward pass.
    pub activations: usize,
}

impl MemoryEstimate {
    /// Sum of the parts.
    pub fn total(&self) -> usize {
        self.weights + self.optimizer + self.activations
    }
}

/// Where the frozen weights live while training.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frozen {
    /// f32 copies held by the trainer ([`SparseTrainer::new`]).
    Copied,
    /// Read in place from a mapped base ([`SparseTrainer::over_source`]): not heap, not
    /// counted; only the f32 master copies of the trained tensors are.
    Mapped,
}

/// Estimate the training memory of `scheme` with batches of `batch` sequences of about
/// `seq_len` tokens, `loss_rows` of them with a loss; frozen weights copied in f32.
pub fn estimate(
    cfg: &ModelConfig,
    scheme: &Scheme,
    opts: &FtOptions,
    seq_len: usize,
    loss_rows: usize,
) -> Result<MemoryEstimate> {
    estimate_with(cfg, scheme, opts, seq_len, loss_rows, Frozen::Copied)
}

/// [`estimate`] with the frozen weights where `frozen` says.
pub fn estimate_with(
    cfg: &ModelConfig,
    scheme: &Scheme,
    opts: &FtOptions,
    seq_len: usize,
    loss_rows: usize,
    frozen: Frozen,
) -> Result<MemoryEstimate> {
    let points = opts.points(cfg)?;
    let shapes = tensor_shapes(cfg)?;
    let part = crate::scheme::member_part(cfg, &points)?;
    let names = flow_familial::FamilialModel::tensor_names(cfg, &part)?;
    let numel = |n: &str| {
        shapes
            .get(n)
            .map(|s| s.iter().product::<usize>())
            .unwrap_or(0)
    };
    let plan = scheme.plan(cfg, &points)?;
    let weights = 4 * match frozen {
        Frozen::Copied => names.iter().map(|n| numel(n)).sum::<usize>(),
        Frozen::Mapped => plan.iter().map(|s| numel(&s.name)).sum::<usize>(),
    };
    let mut optimizer = 0usize;
    for s in &plan {
        let shape = shapes.get(&s.name).cloned().unwrap_or_default();
        let n = numel(&s.name);
        optimizer += 4 * match s.kind {
            SliceKind::Full => 3 * n,
            SliceKind::Rows(r) => {
                // slice + gradient + 2 moments; the merged matrix exists only inside the
                // sliced matmul (one at a time)
                let rows = ((shape[0] as f64 * r).ceil() as usize).max(1);
                4 * rows * shape[1] + n
            }
            SliceKind::Lora(rank) => 3 * rank * (shape[0] + shape[1]) + 2 * n,
        };
    }
    let h = cfg.hidden_size;
    let tokens = opts.batch * seq_len;
    let mut activations = 0usize;
    for &p in &points {
        let blocks = member_blocks(cfg, p)?;
        let first = if plan.iter().any(|s| s.name == "model.embed_tokens.weight") {
            Some(0)
        } else {
            blocks.iter().position(|(prefix, _)| {
                plan.iter()
                    .any(|s| s.name.starts_with(&format!("{prefix}.")))
            })
        };
        let kept = first.map_or(0, |f| blocks.len() - f);
        let inter = match &cfg.ffn[0] {
            flow_familial::config::Ffn::Dense { intermediate } => *intermediate,
            flow_familial::config::Ffn::Moe(m) => m.expert_intermediate * m.top_k,
        };
        let per_token = if matches!(scheme, Scheme::FfnOut { last: 1, .. }) {
            // only the FFN output projection's input (and the residual stream after it)
            inter + 2 * h
        } else {
            10 * h + 3 * (cfg.q_dim() + 2 * cfg.kv_dim()) + 5 * inter + 3 * cfg.num_heads * seq_len
        };
        activations +=
            4 * (kept * tokens * per_token + 4 * loss_rows * opts.batch * cfg.vocab_size);
    }
    Ok(MemoryEstimate {
        weights,
        optimizer,
        activations,
    })
}

/// Mean input length and loss positions of a sample of `data`.
pub fn batch_shape(data: &FtData, seed: u64) -> (usize, usize) {
    let b = data.train_batch(32, seed, 0);
    let n = b.len().max(1);
    let len = b
        .iter()
        .map(|s| s.tokens.len().saturating_sub(1))
        .sum::<usize>()
        / n;
    let rows = b.iter().map(Sequence::loss_positions).sum::<usize>() / n;
    (len.max(1), rows.max(1))
}

/// One candidate of the contribution analysis.
#[derive(Debug, Clone, Serialize)]
pub struct Probe {
    /// The scheme, by name.
    pub scheme: String,
    /// Its memory estimate.
    pub estimate: MemoryEstimate,
    /// Trainable parameters.
    pub trainable: usize,
    /// Whether the estimate fits the budget (only those are probed).
    pub fits: bool,
    /// Validation loss before and after the probe steps (NaN if not probed).
    pub val_before: f64,
    pub val_after: f64,
}

/// How [`choose`] builds and sizes candidates.
pub struct Candidates<'a> {
    /// The schemes, cheapest first.
    pub schemes: &'a [Scheme],
    /// A fresh trainer of a scheme.
    pub make: &'a dyn Fn(&Scheme) -> Result<SparseTrainer>,
    /// Its memory estimate.
    pub estimate: &'a dyn Fn(&Scheme) -> Result<MemoryEstimate>,
}

/// Pick the scheme among `c.schemes` that fits `budget_bytes` and lowers the validation
/// loss on `val` most after `probe_steps` steps (each probe reports as it ends through
/// `on_probe`). Returns it and every probe.
pub fn choose(
    c: &Candidates<'_>,
    budget_bytes: usize,
    data: &FtData,
    opts: &FtOptions,
    probe_steps: u64,
    val: &[Sequence],
    on_probe: &mut dyn FnMut(&Probe),
) -> Result<(Scheme, Vec<Probe>)> {
    let mut probes = Vec::new();
    let mut best: Option<(f64, Scheme)> = None;
    for s in c.schemes {
        let est = (c.estimate)(s)?;
        let fits = est.total() <= budget_bytes;
        let mut p = Probe {
            scheme: s.to_string(),
            estimate: est,
            trainable: 0,
            fits,
            val_before: f64::NAN,
            val_after: f64::NAN,
        };
        if fits {
            let mut tr = (c.make)(s)?;
            p.trainable = tr.num_trainable();
            p.val_before = tr.eval_loss(val)?;
            for step in 0..probe_steps {
                tr.train_step(&data.train_batch(opts.batch, opts.seed ^ 0x9e37, step))?;
            }
            p.val_after = tr.eval_loss(val)?;
            let gain = p.val_before - p.val_after;
            tracing::info!(scheme = %s, gain, est_mb = est.total() as f64 / 1e6, "probe");
            if best.as_ref().is_none_or(|(g, _)| gain > *g) {
                best = Some((gain, s.clone()));
            }
        }
        on_probe(&p);
        probes.push(p);
    }
    match best {
        Some((_, s)) => Ok((s, probes)),
        None => {
            let least = probes
                .iter()
                .min_by_key(|p| p.estimate.total())
                .map(|p| {
                    format!(
                        "{} needs ~{:.1} MB",
                        p.scheme,
                        p.estimate.total() as f64 / 1e6
                    )
                })
                .unwrap_or_default();
            Err(Error::invalid(
                "budget",
                format!(
                    "no scheme fits {:.1} MB (the smallest, {least}); raise --budget-mb",
                    budget_bytes as f64 / 1e6
                ),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flow_familial::config::Layout;
    use flow_familial::init::{init_weights, preset_config, Preset};

    #[test]
    fn sparse_schemes_estimate_less_than_full_and_budget_is_respected() {
        let cfg = preset_config(Preset::Tiny, Layout::RuyiQwen2).unwrap();
        let opts = FtOptions {
            batch: 4,
            ..Default::default()
        };
        let full = estimate(&cfg, &Scheme::Full, &opts, 12, 3).unwrap();
        let heads = estimate(&cfg, &Scheme::ExitHeads, &opts, 12, 3).unwrap();
        let ch = estimate(
            &cfg,
            &Scheme::Channels {
                last: 1,
                ratio: 0.25,
            },
            &opts,
            12,
            3,
        )
        .unwrap();
        assert!(heads.total() < ch.total() && ch.total() < full.total());
        assert!(heads.activations < full.activations);

        let base = init_weights(&cfg, 1).unwrap();
        let data = FtData::task("add").unwrap();
        let val = data.eval_sequences(8, 1);
        let cands = [Scheme::ExitHeads, Scheme::Full];
        let budget = (heads.total() + full.total()) / 2;
        let make = |s: &Scheme| SparseTrainer::new(cfg.clone(), &base, s.clone(), opts.clone());
        let est = |s: &Scheme| estimate(&cfg, s, &opts, 12, 3);
        let c = Candidates {
            schemes: &cands,
            make: &make,
            estimate: &est,
        };
        let (s, probes) = choose(&c, budget, &data, &opts, 2, &val, &mut |_| {}).unwrap();
        assert_eq!(s, Scheme::ExitHeads);
        assert!(probes[0].fits && !probes[1].fits && probes[1].val_after.is_nan());
        let e = choose(&c, 10, &data, &opts, 2, &val, &mut |_| {}).unwrap_err();
        assert!(e.to_string().contains("--budget-mb"), "{e}");
    }
}
