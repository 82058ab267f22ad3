//! Train a family's exits against its frozen trunk (`flow-node model family`).
//!
//! ## What a step does
//! The **teacher** is the base model in inference mode (quantized kernels, no graph): it
//! runs the batch once, keeping the hidden state after trunk layers `[0, p)` at every exit
//! point `p` (exactly what a tier ships) and the deepest exit's next-token distribution
//! `q` on the loss rows. The **student** is the family's exits only, rebuilt every step in
//! [`Mode::Train`] from [`Var`](candle_core::Var)s (the exits' own blocks and norms) over the frozen base (the
//! tied head stays quantized; its backward computes only the input gradient). Each exit `e`
//! gets
//!
//! `loss_e = KL(q ‖ softmax(s_e)) + ce_weight · CE(s_e, next token)`,
//!
//! averaged over the loss rows, and the step minimises `Σ_e w_e loss_e` with the AdamW of
//! [`crate::train::Trainer`] (warm-up, cosine, clipping, resume). No trunk tensor is a
//! `Var`, so no gradient reaches the trunk.
//!
//! With [`Distiller::set_teacher_cache`] the teacher's per-sequence outputs (the hidden
//! state at each exit point and the deepest block's output on the loss rows) are kept and
//! reused by later epochs and evaluations: the trunk is frozen, so they never change, and
//! a step then costs the student and one head pass for the teacher's distribution.
//!
//! ## Initialisation
//! Exit block `i` at point `p` starts as a copy of trunk layer `p` (dequantized to f32), its
//! norm as the final norm: before training, exit `p` equals running layers `[0, p]` and
//! the final norm + head (the "logit lens"), so training only improves on that.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::kv::SeqCache;
use crate::layers::{Mode, Seg};
use crate::model::{FamilialModel, Part};
use crate::source::ModelSource;
use crate::tasks::Sequence;
use crate::train::{pack, Packed, TrainOptions, TrainState, Trainer};
use crate::weights::{MemorySource, Stacked};

use super::overlay::exit_tensor_names;

/// Per-exit numbers of a step or an evaluation (trained exits, shallowest first).
#[derive(Debug, Clone, PartialEq)]
pub struct ExitStats {
    /// Exit point.
    pub point: usize,
    /// Mean KL(teacher ‖ exit) per loss row (nats).
    pub kl: f64,
    /// Mean cross-entropy of the next token.
    pub ce: f64,
    /// Share of loss rows where the exit's top-1 equals the teacher's.
    pub agree: f64,
}

/// What one optimiser step did.
#[derive(Debug, Clone)]
pub struct DistillStep {
    pub step: u64,
    /// Weighted total loss.
    pub loss: f64,
    pub exits: Vec<ExitStats>,
    /// Input tokens (teacher pass) and loss rows of the batch.
    pub tokens: usize,
    pub rows: usize,
    pub grad_norm: f64,
    pub lr: f64,
}

/// Teacher outputs for one batch.
struct Teacher {
    segs: Vec<Seg>,
    /// Hidden state entering each trained exit, `[tokens, hidden]`.
    hidden: Vec<Tensor>,
    /// Loss row indices into the batch's tokens.
    rows: Tensor,
    /// Next tokens of the loss rows, `[rows, 1]`.
    targets: Tensor,
    /// Teacher probabilities on the loss rows, `[rows, vocab]`.
    probs: Tensor,
    /// Σ q log q over the rows (for reporting KL).
    neg_entropy: f64,
    /// Teacher top-1 per row.
    top1: Vec<u32>,
}

/// The teacher's outputs for one sequence: what the student needs from the frozen base.
struct SeqTeacher {
    /// Hidden state entering each trained exit, `[len, hidden]`.
    hidden: Vec<Tensor>,
    /// The deepest block's output on the loss rows (before its norm and head).
    last: Tensor,
}

impl SeqTeacher {
    fn bytes(&self) -> usize {
        self.hidden
            .iter()
            .chain(std::iter::once(&self.last))
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum()
    }
}

/// Cached [`SeqTeacher`]s by sequence content, within a memory budget.
#[derive(Default)]
struct TeacherCache {
    map: HashMap<(Vec<u32>, usize), Arc<SeqTeacher>>,
    used: usize,
    budget: usize,
}

/// Cache key of a sequence: its tokens and where its loss starts.
fn seq_key(s: &Sequence) -> (Vec<u32>, usize) {
    (s.tokens.clone(), s.loss_from)
}

/// A distillation run: the frozen base, the family configuration and the exit weights.
pub struct Distiller {
    base: ModelSource,
    cfg: ModelConfig,
    teacher: FamilialModel,
    points: Vec<usize>,
    trainer: Trainer,
    ce_weight: f64,
    cache: Mutex<TeacherCache>,
}

impl std::fmt::Debug for Distiller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Distiller")
            .field("points", &self.points)
            .field("step", &self.trainer.step_count())
            .finish()
    }
}

/// The family configuration of `base` with exits at `points` (the last = last layer).
pub fn family_config(base: &ModelSource, points: &[usize]) -> Result<ModelConfig> {
    let mut cfg = base.config()?;
    cfg.attach_exits(points)?;
    Ok(cfg)
}

/// Initial exit tensors: block `i` = trunk layer `points[i]`, norm `i` = the final norm.
pub fn init_exit_tensors(base: &ModelSource, cfg: &ModelConfig) -> Result<HashMap<String, Tensor>> {
    let shapes = crate::init::tensor_shapes(cfg)?;
    let mut out = HashMap::new();
    for (i, e) in cfg.exits[..cfg.exits.len() - 1].iter().enumerate() {
        let own = format!("model.eelayers.{i}.");
        let trunk = format!("model.layers.{}.", e.point);
        for name in exit_tensor_names(cfg)? {
            let from = if let Some(rest) = name.strip_prefix(&own) {
                format!("{trunk}{rest}")
            } else if name == format!("model.norms.{i}.weight") {
                "model.norm.weight".to_string()
            } else {
                continue;
            };
            let shape = shapes
                .get(&name)
                .ok_or_else(|| Error::Invalid(format!("no shape for `{name}`")))?;
            out.insert(name, base.tensors().get(&from, shape)?);
        }
    }
    Ok(out)
}

impl Distiller {
    /// Start a run: exits at `points` (the last must be the base's last layer) initialised
    /// from the trunk (see the module docs), or from `init` (e.g. a saved overlay).
    pub fn new(
        base: ModelSource,
        points: &[usize],
        init: Option<HashMap<String, Tensor>>,
        opts: TrainOptions,
        ce_weight: f64,
    ) -> Result<Self> {
        let cfg = family_config(&base, points)?;
        let tensors = match init {
            Some(t) => t,
            None => init_exit_tensors(&base, &cfg)?,
        };
        let names = exit_tensor_names(&cfg)?;
        let trainer = Trainer::with_names(cfg.clone(), names, &tensors, opts)?;
        Self::assemble(base, cfg, trainer, ce_weight)
    }

    /// Continue the run whose state files are in `dir` (written by [`Distiller::save_state`]).
    pub fn resume(
        base: ModelSource,
        points: &[usize],
        dir: &Path,
        opts: Option<TrainOptions>,
        ce_weight: f64,
    ) -> Result<(Self, TrainState)> {
        let cfg = family_config(&base, points)?;
        let names = exit_tensor_names(&cfg)?;
        let (trainer, state) = Trainer::resume_names(dir, cfg.clone(), names, opts)?;
        Ok((Self::assemble(base, cfg, trainer, ce_weight)?, state))
    }

    fn assemble(
        base: ModelSource,
        cfg: ModelConfig,
        trainer: Trainer,
        ce_weight: f64,
    ) -> Result<Self> {
        if !(ce_weight.is_finite() && ce_weight >= 0.0) {
            return Err(Error::Invalid(format!(
                "ce weight must be finite and >= 0 (got {ce_weight})"
            )));
        }
        let mut tcfg = base.config()?;
        tcfg.declare_exits(&[tcfg.num_layers - 1])?;
        let teacher = base.load_part(tcfg.clone(), Part::full(&tcfg))?;
        let points = cfg.exits[..cfg.exits.len() - 1]
            .iter()
            .map(|e| e.point)
            .collect();
        Ok(Self {
            base,
            cfg,
            teacher,
            points,
            trainer,
            ce_weight,
            cache: Mutex::new(TeacherCache::default()),
        })
    }

    /// The family configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Trained exit points (all but the deepest).
    pub fn points(&self) -> &[usize] {
        &self.points
    }

    /// Optimiser steps done.
    pub fn step_count(&self) -> u64 {
        self.trainer.step_count()
    }

    /// Trainable parameters.
    pub fn num_parameters(&self) -> usize {
        self.trainer.num_parameters()
    }

    /// The underlying trainer (names, vars, options).
    pub fn trainer(&self) -> &Trainer {
        &self.trainer
    }

    /// The current exit tensors (detached f32), as an overlay stores them.
    pub fn exit_tensors(&self) -> HashMap<String, Tensor> {
        self.trainer
            .param_names()
            .iter()
            .zip(self.trainer.vars())
            .map(|(n, v)| (n.clone(), v.as_tensor().detach()))
            .collect()
    }

    /// Save the exact training state (master weights, moments, step) into `dir`.
    pub fn save_state(&self, dir: &Path, extra: serde_json::Value) -> Result<()> {
        self.trainer.save_state(dir, extra)
    }

    fn teacher_pass(&self, batch: &[Sequence]) -> Result<Teacher> {
        let Packed {
            rows,
            targets,
            segs,
            ..
        } = pack(batch)?;
        if rows.is_empty() {
            return Err(Error::Invalid("the batch has no loss positions".into()));
        }
        let n_rows = rows.len();
        let rows = Tensor::from_vec(rows, n_rows, &Device::Cpu)?;
        let targets = Tensor::from_vec(targets, (n_rows, 1), &Device::Cpu)?;
        let per_seq = self.teacher_seqs(batch)?;
        let hidden = (0..self.points.len())
            .map(|i| {
                let parts: Vec<&Tensor> = per_seq.iter().map(|s| &s.hidden[i]).collect();
                Ok(Tensor::cat(&parts, 0)?)
            })
            .collect::<Result<Vec<_>>>()?;
        // Sequences are packed in order and their loss rows are contiguous, so the
        // concatenated per-sequence rows are the batch's loss rows in `pack`'s order.
        let lasts: Vec<&Tensor> = per_seq
            .iter()
            .filter(|s| s.last.dim(0).is_ok_and(|n| n > 0))
            .map(|s| &s.last)
            .collect();
        let last = Tensor::cat(&lasts, 0)?;
        let logits = self.teacher.exit_head(&last, self.cfg.num_layers - 1)?;
        let logp = log_softmax(&logits)?;
        let probs = logp.exp()?;
        let neg_entropy = f64::from((&probs * &logp)?.sum_all()?.to_scalar::<f32>()?);
        let top1 = logits.argmax(1)?.to_vec1()?;
        Ok(Teacher {
            segs,
            hidden,
            rows,
            targets,
            probs,
            neg_entropy,
            top1,
        })
    }

    /// Keep the teacher's per-sequence outputs for reuse in later epochs and evaluations,
    /// up to `bytes` of memory (0 = no cache). The trunk is frozen, so they never change.
    pub fn set_teacher_cache(&mut self, bytes: usize) {
        let mut c = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        c.budget = bytes;
    }

    /// Teacher outputs of every sequence of `batch`, from the cache where present; the
    /// missing ones run the base together in one packed pass.
    fn teacher_seqs(&self, batch: &[Sequence]) -> Result<Vec<Arc<SeqTeacher>>> {
        let keys: Vec<(Vec<u32>, usize)> = batch.iter().map(seq_key).collect();
        let mut found: Vec<Option<Arc<SeqTeacher>>> = {
            let c = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            keys.iter().map(|k| c.map.get(k).cloned()).collect()
        };
        let missing: Vec<usize> = (0..batch.len()).filter(|&i| found[i].is_none()).collect();
        if !missing.is_empty() {
            let sub: Vec<Sequence> = missing.iter().map(|&i| batch[i].clone()).collect();
            let fresh = self.run_teacher(&sub)?;
            let mut c = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            for (&i, st) in missing.iter().zip(fresh) {
                let st = Arc::new(st);
                let bytes = st.bytes();
                if c.used + bytes <= c.budget {
                    c.used += bytes;
                    c.map.insert(keys[i].clone(), st.clone());
                }
                found[i] = Some(st);
            }
        }
        found
            .into_iter()
            .map(|s| s.ok_or_else(|| Error::Invalid("teacher output missing".into())))
            .collect()
    }

    /// The base over `batch` in one packed pass, split per sequence.
    fn run_teacher(&self, batch: &[Sequence]) -> Result<Vec<SeqTeacher>> {
        let Packed { inputs, segs, .. } = pack(batch)?;
        let t = &self.teacher;
        let mut caches: Vec<SeqCache> = batch.iter().map(|_| t.new_cache()).collect();
        let mut refs: Vec<&mut SeqCache> = caches.iter_mut().collect();
        let mut h = t.embed(&inputs)?;
        let mut at = 0;
        let mut hidden = Vec::with_capacity(self.points.len());
        for &p in &self.points {
            h = t.run_layers(&h, at..p, &segs, &mut refs)?;
            at = p;
            hidden.push(h.clone());
        }
        let last = self.cfg.num_layers - 1;
        h = t.run_layers(&h, at..last, &segs, &mut refs)?;
        let b = t.exit_block(&h, last, &segs, &mut refs)?;
        let mut out = Vec::with_capacity(batch.len());
        let mut off = 0;
        for (s, seg) in batch.iter().zip(&segs) {
            let n = seg.len;
            // Loss rows of a sequence: positions i with i + 1 >= loss_from (contiguous).
            let from = s.loss_from.saturating_sub(1).min(n);
            out.push(SeqTeacher {
                hidden: hidden
                    .iter()
                    .map(|x| Ok(x.narrow(0, off, n)?.copy()?))
                    .collect::<Result<Vec<_>>>()?,
                last: b.narrow(0, off + from, n - from)?.copy()?,
            });
            off += n;
        }
        Ok(out)
    }

    fn student(&self, mode: Mode) -> Result<FamilialModel> {
        let tensors: HashMap<String, Tensor> = self
            .trainer
            .param_names()
            .iter()
            .zip(self.trainer.vars())
            .map(|(n, v)| {
                let t = v.as_tensor();
                (
                    n.clone(),
                    if mode == Mode::Train {
                        t.clone()
                    } else {
                        t.detach()
                    },
                )
            })
            .collect();
        let top = MemorySource::new(tensors);
        let src = Stacked {
            top: &top,
            base: self.base.tensors(),
        };
        let part = Part {
            embed: false,
            trunk: 0..0,
            exits: self.points.clone(),
        };
        FamilialModel::from_source(self.cfg.clone(), part, &src, mode)
    }

    /// Per-exit losses (differentiable in [`Mode::Train`]) and statistics on `batch`.
    fn exit_losses(
        &self,
        batch: &[Sequence],
        mode: Mode,
    ) -> Result<(Vec<Tensor>, Vec<ExitStats>, Teacher)> {
        let t = self.teacher_pass(batch)?;
        let student = self.student(mode)?;
        let n_rows = t.top1.len() as f64;
        let mut losses = Vec::with_capacity(self.points.len());
        let mut stats = Vec::with_capacity(self.points.len());
        for (i, &p) in self.points.iter().enumerate() {
            let mut caches: Vec<SeqCache> = batch.iter().map(|_| student.new_cache()).collect();
            let mut refs: Vec<&mut SeqCache> = caches.iter_mut().collect();
            let out = student.exit_block(&t.hidden[i], p, &t.segs, &mut refs)?;
            let logits = student.exit_head(&out.index_select(&t.rows, 0)?, p)?;
            let logp = log_softmax(&logits)?;
            let soft = (&t.probs * &logp)?.sum_all()?.neg()?;
            let hard = logp.gather(&t.targets, 1)?.sum_all()?.neg()?;
            let soft_v = f64::from(soft.to_scalar::<f32>()?);
            let hard_v = f64::from(hard.to_scalar::<f32>()?);
            let top1: Vec<u32> = logits.detach().argmax(1)?.to_vec1()?;
            let agree = top1.iter().zip(&t.top1).filter(|(a, b)| a == b).count() as f64;
            stats.push(ExitStats {
                point: p,
                kl: (soft_v + t.neg_entropy) / n_rows,
                ce: hard_v / n_rows,
                agree: agree / n_rows,
            });
            let loss = ((soft + (hard * self.ce_weight)?)? / n_rows)?;
            losses.push(loss);
        }
        Ok((losses, stats, t))
    }

    /// One optimiser step on `batch` (its loss rows: positions predicting
    /// `tokens[loss_from..]`).
    pub fn step(&mut self, batch: &[Sequence]) -> Result<DistillStep> {
        let (losses, exits, t) = self.exit_losses(batch, Mode::Train)?;
        let weights = self.exit_weights();
        let mut total: Option<Tensor> = None;
        let mut loss = 0.0;
        for ((l, w), s) in losses.iter().zip(&weights).zip(&exits) {
            loss += w * (s.kl + self.ce_weight * s.ce);
            if *w == 0.0 {
                continue;
            }
            let term = (l * *w)?;
            total = Some(match total {
                Some(a) => (a + term)?,
                None => term,
            });
        }
        let total = total.ok_or_else(|| Error::Invalid("every exit weight is 0".into()))?;
        let g = self.trainer.backward(&total)?;
        let (grad_norm, lr) = self.trainer.apply(&g, loss)?;
        Ok(DistillStep {
            step: self.trainer.step_count(),
            loss,
            exits,
            tokens: t.segs.iter().map(|s| s.len).sum(),
            rows: t.top1.len(),
            grad_norm,
            lr,
        })
    }

    /// Gradients of one step's loss for every trainable tensor (`None` = no gradient), in
    /// [`Trainer::param_names`] order; used by tests to show that every exit tensor learns.
    pub fn gradients(&self, batch: &[Sequence]) -> Result<Vec<Option<Tensor>>> {
        let (losses, _, _) = self.exit_losses(batch, Mode::Train)?;
        let mut total = losses[0].clone();
        for l in &losses[1..] {
            total = (total + l)?;
        }
        self.trainer.backward(&total)
    }

    /// KL, CE and top-1 agreement of every trained exit on `batch` (no gradients), with
    /// the trunk kept frozen; sums over rows are exact, so callers can pool batches by
    /// weighting with the returned row count.
    pub fn evaluate(&self, batch: &[Sequence]) -> Result<(Vec<ExitStats>, usize)> {
        let (_, stats, t) = self.exit_losses(batch, Mode::Infer)?;
        Ok((stats, t.top1.len()))
    }

    fn exit_weights(&self) -> Vec<f64> {
        let w = &self.trainer.options().exit_weights;
        if w.len() == self.points.len() {
            w.clone()
        } else {
            vec![1.0; self.points.len()]
        }
    }
}

/// Row-wise log-softmax from primitive ops (differentiable), f32.
fn log_softmax(logits: &Tensor) -> Result<Tensor> {
    let logits = if logits.dtype() == DType::F32 {
        logits.clone()
    } else {
        logits.to_dtype(DType::F32)?
    };
    let max = logits.max_keepdim(1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(1)?.log()?;
    Ok(shifted.broadcast_sub(&lse)?)
}
