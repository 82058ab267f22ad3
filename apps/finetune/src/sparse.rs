//! The sparse trainer: only the planned slices are candle [`Var`]s.
//!
//! [`SparseTrainer`] holds the member's frozen tensors as plain tensors and every trainable
//! slice as a [`Trainable`]: a whole tensor ([`SliceKind::Full`]), a row slice of a matrix
//! whose other rows stay frozen ([`SliceKind::Rows`]: handed to the model as a
//! [`RowSlice`] over the base matrix, so flow-familial's sliced matmul merges the rows
//! inside the op and computes only the slice's gradient, never the whole matrix's), or a
//! LoRA pair (`W = base + s·B·A`, [`SliceKind::Lora`], merged in the graph). Every step
//! rebuilds a [`FamilialModel`] in [`Mode::Train`] over them, so an op gets a backward node
//! only if a `Var` is upstream of it: layers below the first trainable slice build no graph,
//! keep no activations (the backward graph is pruned by construction) and run the
//! inference kernels, and frozen projections above it go through flow-familial's frozen
//! matmul, which computes only the input gradient.
//!
//! ## Per-parameter updates (PockEngine's reordering) and what candle permits
//! candle 0.11's `Tensor::backward` walks the whole graph in one call and returns a
//! `GradStore` holding every gradient; it has no hook that fires when one parameter's
//! gradient is final, so an update cannot run *during* the backward pass, and the moment
//! where all gradients of the step are alive together cannot be avoided. What we do: the
//! loss, model and activations are dropped right after `backward` (before any optimiser
//! temporaries exist), then each gradient is *removed* from the store, used for that
//! parameter's AdamW update (its own norm clip, no global clip, since a global norm would
//! need every gradient first) and freed before the next parameter's update. Peak memory is
//! therefore max(forward+backward, weights + state + remaining gradients), never their sum.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use flow_familial::init::tensor_shapes;
use flow_familial::layers::{replace_rows, RowSlice};
use flow_familial::tasks::Sequence;
use flow_familial::train::{exit_nll_sums_at, greedy_batch};
use flow_familial::weights::{MemorySource, Stacked, TensorSource};
use flow_familial::{FamilialModel, Mode, ModelConfig, Part};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::scheme::{member_part, Scheme, SliceKind};

/// Hyper-parameters of a fine-tuning run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FtOptions {
    /// Optimiser steps.
    pub steps: u64,
    /// Sequences per step.
    pub batch: usize,
    /// Peak learning rate (reached after the linear warm-up).
    pub lr: f64,
    /// Linear warm-up steps.
    pub warmup: u64,
    /// After warm-up the rate follows a cosine from `lr` down to `lr * min_lr_ratio` at the
    /// last step (1.0 = constant).
    #[serde(default = "default_min_lr_ratio")]
    pub min_lr_ratio: f64,
    /// Decoupled weight decay on matrices and LoRA factors.
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Clip every parameter's gradient norm to this (0 = off).
    pub clip_norm: f64,
    /// Data and LoRA-initialisation seed.
    pub seed: u64,
    /// Exit points whose loss is trained (ascending); empty = the shallowest (device) exit.
    pub exits: Vec<usize>,
}

impl Default for FtOptions {
    fn default() -> Self {
        Self {
            steps: 300,
            batch: 16,
            lr: 1e-3,
            warmup: 20,
            min_lr_ratio: default_min_lr_ratio(),
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.98,
            eps: 1e-8,
            clip_norm: 1.0,
            seed: 0,
            exits: Vec::new(),
        }
    }
}

fn default_min_lr_ratio() -> f64 {
    0.1
}

impl FtOptions {
    /// Learning rate at 0-based `step`: linear warm-up, then cosine decay to
    /// `lr * min_lr_ratio` at step `steps - 1`.
    pub fn lr_at(&self, step: u64) -> f64 {
        if self.warmup > 0 && step < self.warmup {
            return self.lr * (step + 1) as f64 / self.warmup as f64;
        }
        let span = self.steps.saturating_sub(self.warmup).saturating_sub(1);
        if span == 0 {
            return self.lr;
        }
        let t = ((step - self.warmup) as f64 / span as f64).min(1.0);
        let floor = self.min_lr_ratio.clamp(0.0, 1.0);
        self.lr * (floor + (1.0 - floor) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos()))
    }

    /// The exit points trained for a family of `cfg`.
    pub fn points(&self, cfg: &ModelConfig) -> Result<Vec<usize>> {
        let mut p = if self.exits.is_empty() {
            vec![cfg.exit_points()[0]]
        } else {
            self.exits.clone()
        };
        p.sort_unstable();
        p.dedup();
        for &e in &p {
            cfg.exit_index(e)?;
        }
        Ok(p)
    }
}

/// One trainable slice.
#[derive(Debug)]
pub struct Trainable {
    /// The tensor of the checkpoint it changes.
    pub name: String,
    kind: Slice,
}

#[derive(Debug)]
enum Slice {
    Full(Var),
    Rows {
        rows: Tensor,
        /// The whole base matrix (shares the base's storage; its selected rows are stale).
        base: Tensor,
        var: Var,
    },
    Lora {
        base: Tensor,
        a: Var,
        b: Var,
        scale: f64,
    },
}

impl Trainable {
    /// Its variables.
    pub fn vars(&self) -> Vec<&Var> {
        match &self.kind {
            Slice::Full(v) | Slice::Rows { var: v, .. } => vec![v],
            Slice::Lora { a, b, .. } => vec![a, b],
        }
    }

    /// The tensor the model uses (differentiable w.r.t. the variables). A row slice is
    /// the frozen base matrix here; its trainable rows reach the model as a
    /// [`RowSlice`] (see [`Trainable::row_slice`]).
    fn effective(&self) -> Result<Tensor> {
        Ok(match &self.kind {
            Slice::Full(v) => v.as_tensor().clone(),
            Slice::Rows { base, .. } => base.clone(),
            Slice::Lora { base, a, b, scale } => {
                (base + (b.as_tensor().matmul(a.as_tensor())? * *scale)?)?
            }
        })
    }

    /// The trainable rows of a row-sliced matrix, for the model's sliced matmul.
    fn row_slice(&self) -> Option<RowSlice> {
        match &self.kind {
            Slice::Rows { rows, var, .. } => Some(RowSlice {
                rows: rows.clone(),
                values: var.as_tensor().clone(),
            }),
            _ => None,
        }
    }

    /// The current value of the whole tensor (detached).
    pub fn value(&self) -> Result<Tensor> {
        Ok(match &self.kind {
            Slice::Rows { rows, base, var } => replace_rows(base, rows, var.as_tensor())?,
            _ => self.effective()?.detach(),
        })
    }

    /// Trainable parameters (elements of its variables).
    pub fn parameters(&self) -> usize {
        self.vars().iter().map(|v| v.elem_count()).sum()
    }
}

/// What one step did.
#[derive(Debug, Clone)]
pub struct StepStats {
    /// Steps done.
    pub step: u64,
    /// Mean cross-entropy over the trained exits' loss positions.
    pub loss: f64,
    /// Learning rate used.
    pub lr: f64,
}

/// A fine-tuning run of one scheme on the member(s) ending at the trained exits.
#[derive(Debug)]
pub struct SparseTrainer {
    cfg: ModelConfig,
    part: Part,
    points: Vec<usize>,
    scheme: Scheme,
    /// Frozen tensors copied into the trainer (empty over a [`BaseSource`]).
    frozen: HashMap<String, Tensor>,
    /// The base read in place ([`SparseTrainer::over_source`]).
    under: Option<BaseSource>,
    params: Vec<Trainable>,
    /// AdamW moments per variable, in `params` × `vars()` order.
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    step: u64,
    opts: FtOptions,
    member_params: usize,
}

/// A base the trainer reads in place (frozen tensors are never copied).
#[derive(Clone)]
struct BaseSource(Arc<dyn TensorSource + Send + Sync>);

impl std::fmt::Debug for BaseSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BaseSource")
    }
}

/// Indices of the `k` rows of `w` with the largest L2 norm, ascending.
pub fn top_rows(w: &Tensor, k: usize) -> Result<Vec<u32>> {
    let norms: Vec<f32> = w.sqr()?.sum(1)?.to_vec1()?;
    let mut idx: Vec<u32> = (0..norms.len() as u32).collect();
    idx.sort_by(|&a, &b| {
        norms[b as usize]
            .total_cmp(&norms[a as usize])
            .then(a.cmp(&b))
    });
    idx.truncate(k.max(1).min(norms.len()));
    idx.sort_unstable();
    Ok(idx)
}

impl SparseTrainer {
    /// Plan `scheme` over `base` (every tensor of the family of `cfg`, any float dtype).
    /// The frozen tensors are f32 copies held by the trainer.
    pub fn new(
        cfg: ModelConfig,
        base: &HashMap<String, Tensor>,
        scheme: Scheme,
        opts: FtOptions,
    ) -> Result<Self> {
        let get = |n: &str| -> Result<Tensor> {
            let t = base.get(n).ok_or_else(|| {
                Error::invalid("base weights", format!("tensor `{n}` is missing"))
            })?;
            Ok(t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?.detach())
        };
        Self::build(cfg, &get, None, scheme, opts)
    }

    /// Plan `scheme` over a base read in place from `base` (a GGUF file: quantized
    /// matrices stay quantized and mapped). Only the trainable slices are copied, as f32
    /// master copies; every frozen tensor is read from `base` when the model is built, so
    /// frozen projections run the quantized kernels (and, inside the backward graph, only
    /// compute their input's gradient). This is the PockEngine setting on a pretrained
    /// model: memory grows with what is trained, not with the model.
    pub fn over_source(
        cfg: ModelConfig,
        base: Arc<dyn TensorSource + Send + Sync>,
        scheme: Scheme,
        opts: FtOptions,
    ) -> Result<Self> {
        let shapes = tensor_shapes(&cfg)?;
        let src = base.clone();
        let get = move |n: &str| -> Result<Tensor> {
            let shape = shapes.get(n).ok_or_else(|| {
                Error::invalid("base weights", format!("no shape for tensor `{n}`"))
            })?;
            Ok(src.get(n, shape)?.detach())
        };
        Self::build(cfg, &get, Some(BaseSource(base)), scheme, opts)
    }

    fn build(
        cfg: ModelConfig,
        get: &dyn Fn(&str) -> Result<Tensor>,
        under: Option<BaseSource>,
        scheme: Scheme,
        opts: FtOptions,
    ) -> Result<Self> {
        if opts.batch == 0 {
            return Err(Error::invalid("batch", "must be at least 1"));
        }
        let points = opts.points(&cfg)?;
        let part = member_part(&cfg, &points)?;
        let names = FamilialModel::tensor_names(&cfg, &part)?;
        let specs = scheme.plan(&cfg, &points)?;
        let mut frozen = HashMap::new();
        if under.is_none() {
            for n in &names {
                if !specs.iter().any(|s| &s.name == n) {
                    frozen.insert(n.clone(), get(n)?);
                }
            }
        }
        let mut rng = StdRng::seed_from_u64(opts.seed ^ 0x1075);
        let mut params = Vec::with_capacity(specs.len());
        for s in &specs {
            let w = get(&s.name)?;
            let kind = match s.kind {
                SliceKind::Full => Slice::Full(Var::from_tensor(&w)?),
                SliceKind::Rows(ratio) => {
                    let (out, _) = w.dims2()?;
                    let k = ((out as f64 * ratio).ceil() as usize).clamp(1, out);
                    let idx = top_rows(&w, k)?;
                    let rows = Tensor::from_vec(idx.clone(), idx.len(), &Device::Cpu)?;
                    Slice::Rows {
                        var: Var::from_tensor(&w.index_select(&rows, 0)?)?,
                        base: w,
                        rows,
                    }
                }
                SliceKind::Lora(rank) => {
                    let (out, inp) = w.dims2()?;
                    let bound = 1.0 / (inp as f32).sqrt();
                    let a: Vec<f32> = (0..rank * inp)
                        .map(|_| rng.gen_range(-bound..bound))
                        .collect();
                    Slice::Lora {
                        base: w,
                        a: Var::from_tensor(&Tensor::from_vec(a, (rank, inp), &Device::Cpu)?)?,
                        b: Var::zeros((out, rank), DType::F32, &Device::Cpu)?,
                        scale: 2.0,
                    }
                }
            };
            params.push(Trainable {
                name: s.name.clone(),
                kind,
            });
        }
        let m: Vec<Tensor> = params
            .iter()
            .flat_map(|p| p.vars())
            .map(|v| v.as_tensor().zeros_like())
            .collect::<candle_core::Result<_>>()?;
        let v = m.clone();
        let member_params = {
            let shapes = tensor_shapes(&cfg)?;
            names
                .iter()
                .map(|n| shapes.get(n).map_or(0, |s| s.iter().product::<usize>()))
                .sum()
        };
        Ok(Self {
            cfg,
            part,
            points,
            scheme,
            frozen,
            under,
            params,
            m,
            v,
            step: 0,
            opts,
            member_params,
        })
    }

    /// The scheme.
    pub fn scheme(&self) -> &Scheme {
        &self.scheme
    }

    /// The trained exit points.
    pub fn points(&self) -> &[usize] {
        &self.points
    }

    /// The options.
    pub fn options(&self) -> &FtOptions {
        &self.opts
    }

    /// Steps done.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// The trainable slices.
    pub fn trainables(&self) -> &[Trainable] {
        &self.params
    }

    /// The frozen tensors copied into the trainer (plain tensors, never updated; empty for
    /// a trainer [`SparseTrainer::over_source`], whose frozen tensors stay in the base).
    pub fn frozen(&self) -> &HashMap<String, Tensor> {
        &self.frozen
    }

    /// Trainable parameter count.
    pub fn num_trainable(&self) -> usize {
        self.params.iter().map(Trainable::parameters).sum()
    }

    /// Parameter count of the member.
    pub fn num_member(&self) -> usize {
        self.member_params
    }

    fn model(&self, mode: Mode) -> Result<FamilialModel> {
        let mut t = self.frozen.clone();
        let mut slices = Vec::new();
        for p in &self.params {
            let e = if mode == Mode::Train {
                if let Some(rs) = p.row_slice() {
                    slices.push((p.name.clone(), rs));
                }
                p.effective()?
            } else {
                p.value()?
            };
            t.insert(p.name.clone(), e);
        }
        let mut src = MemorySource::new(t);
        for (n, rs) in slices {
            src = src.with_row_slice(n, rs);
        }
        let model = match &self.under {
            None => FamilialModel::from_source(self.cfg.clone(), self.part.clone(), &src, mode)?,
            Some(BaseSource(base)) => {
                let stacked = Stacked {
                    top: &src,
                    base: base.as_ref(),
                };
                FamilialModel::from_source(self.cfg.clone(), self.part.clone(), &stacked, mode)?
            }
        };
        Ok(model)
    }

    /// An inference model of the member(s) with the current weights.
    pub fn infer_model(&self) -> Result<FamilialModel> {
        self.model(Mode::Infer)
    }

    /// Current values of the trained tensors (whole tensors, f32), by name.
    pub fn updated(&self) -> Result<HashMap<String, Tensor>> {
        self.params
            .iter()
            .map(|p| Ok((p.name.clone(), p.value()?)))
            .collect()
    }

    /// Differentiable loss (mean CE over the loss positions of the trained exits).
    fn loss(&self, batch: &[Sequence]) -> Result<Tensor> {
        let total: usize = batch.iter().map(Sequence::loss_positions).sum();
        if total == 0 {
            return Err(Error::invalid("batch", "no loss positions"));
        }
        let model = self.model(Mode::Train)?;
        let sums = exit_nll_sums_at(&model, batch, &self.points)?;
        let mut loss = sums[0].clone();
        for s in &sums[1..] {
            loss = (loss + s)?;
        }
        Ok((loss / (total * self.points.len()) as f64)?)
    }

    /// Mean loss on `seqs` (no graph).
    pub fn eval_loss(&self, seqs: &[Sequence]) -> Result<f64> {
        let model = self.model(Mode::Infer)?;
        let mut nll = 0f64;
        let mut count = 0usize;
        for ch in seqs.chunks(32) {
            count += ch.iter().map(Sequence::loss_positions).sum::<usize>() * self.points.len();
            for s in exit_nll_sums_at(&model, ch, &self.points)? {
                nll += f64::from(s.to_scalar::<f32>()?);
            }
        }
        Ok(nll / count.max(1) as f64)
    }

    /// The whole gradient store of one backward pass on `batch` (every tracked tensor of
    /// the graph, interior nodes included), and the loss: tests look up frozen tensors in
    /// it to show that no gradient reaches them.
    pub fn backward_store(
        &self,
        batch: &[Sequence],
    ) -> Result<(candle_core::backprop::GradStore, f64)> {
        let loss = self.loss(batch)?;
        let value = f64::from(loss.to_scalar::<f32>()?);
        let store = loss.backward()?;
        Ok((store, value))
    }

    /// Gradients of every variable (in [`Trainable::vars`] order) on `batch`, and the loss.
    pub fn gradients(&self, batch: &[Sequence]) -> Result<(Vec<Option<Tensor>>, f64)> {
        let (mut store, value) = self.backward_store(batch)?;
        let grads = self
            .params
            .iter()
            .flat_map(|p| p.vars())
            // candle's backward detaches the gradient of every interior node but not of the
            // variables: a variable's gradient keeps its backward op, which references the
            // other operand (for LoRA, `B`'s gradient references the `A` variable, so it is
            // "tracked"). Kept as is, the AdamW moments built from it would chain every
            // step's gradient and graph to the next one (the memory of `lora:*` grew with
            // the number of steps); detached, a gradient is a plain tensor.
            .map(|v| store.remove(v.as_tensor()).map(|g| g.detach()))
            .collect();
        Ok((grads, value))
    }

    /// One optimiser step on `batch` (see the module docs for the update order).
    pub fn train_step(&mut self, batch: &[Sequence]) -> Result<StepStats> {
        let (grads, loss) = self.gradients(batch)?;
        if !loss.is_finite() {
            return Err(Error::invalid(
                "training",
                format!("loss is {loss} at step {}; lower --lr", self.step + 1),
            ));
        }
        let lr = self.opts.lr_at(self.step);
        self.step += 1;
        let t = self.step as i32;
        let (b1, b2) = (self.opts.beta1, self.opts.beta2);
        let (bc1, bc2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
        let vars: Vec<Var> = self.params.iter().flat_map(|p| p.vars()).cloned().collect();
        for (i, (var, g)) in vars.iter().zip(grads).enumerate() {
            let Some(g) = g else { continue };
            let g = if self.opts.clip_norm > 0.0 {
                let n = f64::from(g.sqr()?.sum_all()?.to_scalar::<f32>()?).sqrt();
                if n > self.opts.clip_norm {
                    (g * (self.opts.clip_norm / n))?
                } else {
                    g
                }
            } else {
                g
            };
            let m = ((&self.m[i] * b1)? + (&g * (1.0 - b1))?)?;
            let v = ((&self.v[i] * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            drop(g);
            let upd = ((&m / bc1)? / ((&v / bc2)?.sqrt()? + self.opts.eps)?)?;
            let w = var.as_tensor().detach();
            let w = if self.opts.weight_decay > 0.0 && w.rank() >= 2 {
                (&w * (1.0 - lr * self.opts.weight_decay))?
            } else {
                w
            };
            var.set(&(w - (upd * lr)?)?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(StepStats {
            step: self.step,
            loss,
            lr,
        })
    }
}

/// Exact-match accuracy of greedy decoding at exit `point` of `model` on `examples`.
pub fn exact_match(
    model: &FamilialModel,
    examples: &[flow_familial::tasks::Example],
    point: usize,
) -> Result<f64> {
    if examples.is_empty() {
        return Ok(0.0);
    }
    let mut correct = 0usize;
    for ch in examples.chunks(32) {
        let prompts: Vec<Vec<u32>> = ch.iter().map(|e| e.prompt.clone()).collect();
        let max_new = ch.iter().map(|e| e.answer.len() + 1).max().unwrap_or(1);
        let got = greedy_batch(model, &prompts, point, max_new)?;
        correct += got
            .iter()
            .zip(ch)
            .filter(|(g, e)| **g == e.target())
            .count();
    }
    Ok(correct as f64 / examples.len() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::FtData;
    use flow_familial::config::Layout;
    use flow_familial::init::{init_weights, preset_config, Preset};

    fn tiny() -> (ModelConfig, HashMap<String, Tensor>) {
        let cfg = preset_config(Preset::Tiny, Layout::RuyiQwen2).unwrap();
        let w = init_weights(&cfg, 3).unwrap();
        (cfg, w)
    }

    fn schemes() -> Vec<Scheme> {
        vec![
            Scheme::ExitHeads,
            Scheme::BiasNorm { last: 2 },
            Scheme::Channels {
                last: 1,
                ratio: 0.25,
            },
            Scheme::FfnOut {
                last: 1,
                ratio: 0.5,
            },
            Scheme::Lora { last: 1, rank: 4 },
            Scheme::Full,
        ]
    }

    /// Every variable of every scheme gets a non-zero gradient (after one step, so LoRA's
    /// zero-initialised `B` no longer zeroes `A`'s gradient); frozen tensors, and the frozen
    /// rows of row-sliced matrices, are bit-identical after training.
    #[test]
    fn every_variable_gets_a_gradient_and_frozen_stays_frozen() {
        let (cfg, base) = tiny();
        let data = FtData::task("add").unwrap();
        for scheme in schemes() {
            let opts = FtOptions {
                batch: 4,
                lr: 1e-2,
                warmup: 0,
                ..Default::default()
            };
            let mut tr = SparseTrainer::new(cfg.clone(), &base, scheme.clone(), opts).unwrap();
            let before: HashMap<String, Vec<f32>> = tr
                .frozen()
                .iter()
                .map(|(n, t)| (n.clone(), t.flatten_all().unwrap().to_vec1().unwrap()))
                .collect();
            tr.train_step(&data.train_batch(4, 0, 0)).unwrap();
            let (grads, _) = tr.gradients(&data.train_batch(4, 0, 1)).unwrap();
            let names: Vec<&str> = tr
                .trainables()
                .iter()
                .flat_map(|p| p.vars().into_iter().map(move |_| p.name.as_str()))
                .collect();
            assert_eq!(grads.len(), names.len());
            for (g, n) in grads.iter().zip(&names) {
                let g = g
                    .as_ref()
                    .unwrap_or_else(|| panic!("{scheme}: `{n}` got no gradient"));
                let s = g
                    .abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(s > 0.0, "{scheme}: `{n}` has an all-zero gradient");
            }
            for _ in 0..2 {
                tr.train_step(&data.train_batch(4, 0, 2)).unwrap();
            }
            for (n, t) in tr.frozen() {
                let now: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(&now),
                    bits(&before[n]),
                    "{scheme}: frozen `{n}` changed"
                );
                let b: Vec<f32> = base[n].flatten_all().unwrap().to_vec1().unwrap();
                assert_eq!(
                    bits(&now),
                    bits(&b),
                    "{scheme}: `{n}` differs from the base"
                );
            }
            let upd = tr.updated().unwrap();
            let mut changed_any = false;
            for p in tr.trainables() {
                let new: Vec<Vec<f32>> = match upd[&p.name].rank() {
                    1 => vec![upd[&p.name].to_vec1().unwrap()],
                    _ => upd[&p.name].to_vec2().unwrap(),
                };
                let old: Vec<Vec<f32>> = match base[&p.name].rank() {
                    1 => vec![base[&p.name].to_vec1().unwrap()],
                    _ => base[&p.name].to_vec2().unwrap(),
                };
                let changed_rows = new.iter().zip(&old).filter(|(a, b)| a != b).count();
                changed_any |= changed_rows > 0;
                if let Slice::Rows { rows, .. } = &p.kind {
                    let sel: Vec<u32> = rows.to_vec1().unwrap();
                    for (r, (a, b)) in new.iter().zip(&old).enumerate() {
                        if !sel.contains(&(r as u32)) {
                            assert_eq!(a, b, "{scheme}: frozen row {r} of `{}` changed", p.name);
                        }
                    }
                    assert!(changed_rows <= sel.len());
                }
            }
            assert!(changed_any, "{scheme}: nothing changed");
        }
    }

    #[test]
    fn fine_tuning_lowers_the_loss() {
        let (cfg, base) = tiny();
        let data = FtData::task("reverse").unwrap();
        let opts = FtOptions {
            batch: 8,
            lr: 3e-3,
            warmup: 0,
            ..Default::default()
        };
        let scheme = Scheme::Channels {
            last: 1,
            ratio: 0.5,
        };
        let mut tr = SparseTrainer::new(cfg, &base, scheme, opts).unwrap();
        let val = data.eval_sequences(16, 0);
        let before = tr.eval_loss(&val).unwrap();
        for s in 0..15 {
            tr.train_step(&data.train_batch(8, 0, s)).unwrap();
        }
        let after = tr.eval_loss(&val).unwrap();
        assert!(after < before, "{before} -> {after}");
    }

    #[test]
    fn lr_warms_up_then_decays_to_the_floor() {
        let o = FtOptions {
            steps: 110,
            lr: 1e-3,
            warmup: 10,
            min_lr_ratio: 0.1,
            ..Default::default()
        };
        assert!((o.lr_at(0) - 1e-4).abs() < 1e-12);
        assert!((o.lr_at(10) - 1e-3).abs() < 1e-12);
        assert!(o.lr_at(60) < 1e-3 && o.lr_at(60) > 1e-4);
        assert!((o.lr_at(109) - 1e-4).abs() < 1e-12);
        let flat = FtOptions {
            min_lr_ratio: 1.0,
            ..o
        };
        assert!((flat.lr_at(80) - 1e-3).abs() < 1e-12);
    }

    #[test]
    fn top_rows_picks_the_largest() {
        let w = Tensor::new(
            &[[0.1f32, 0.0], [3.0, 0.0], [0.0, -2.0], [0.5, 0.5]],
            &Device::Cpu,
        )
        .unwrap();
        assert_eq!(top_rows(&w, 2).unwrap(), vec![1, 2]);
    }
}
