//! Joint training of every exit of a family (`flow-node model train`), and evaluation.
//!
//! ## How a step works
//! The trainable weights are [`candle_core::Var`]s. Every step rebuilds a
//! [`FamilialModel`] in [`Mode::Train`] from them (cheap: the q/k/v and gate/up `cat`s it
//! does are differentiable, so gradients reach the `Var`s), runs a batch of sequences
//! through the shared trunk and takes, at every exit `e`, the cross-entropy of the next
//! token on the loss positions (the answer and `<|eos|>` of a task example; every byte of a
//! text window):
//!
//! `loss = Σ_e w_e · CE_e`, where `CE_e` is the mean over the loss positions of the batch.
//!
//! MoE families can add router auxiliary losses ([`TrainOptions::router_balance`],
//! [`TrainOptions::router_z`]): `+ α · mean_l LB_l + β · mean_l Z_l` over the MoE layer
//! forwards, with the Switch-Transformer load-balancing loss `LB = E · Σ_j f_j P_j` and the
//! ST-MoE z-loss (see [`crate::layers::RouterAux`]); they keep routers from collapsing onto
//! one or two experts. Reported losses ([`StepStats::loss`]) exclude them.
//!
//! The trunk is run once: `embed → layers [0, e0) → exit e0 → layers [e0, e1) → exit e1 …`,
//! so the trunk layers below a shallow exit receive gradient from every exit above them.
//! The batch can be split over several worker threads (data parallel, gradients summed);
//! on small CPUs that beats multi-threaded matmuls.
//!
//! ## Optimiser
//! [`AdamW`](candle_nn::AdamW) with decoupled weight decay on matrices only (norm weights and biases are not
//! decayed), global-norm gradient clipping, linear warm-up then cosine decay to
//! `min_lr_ratio · lr`. Its state (first/second moments, step) and f32 master weights are
//! saved in `train_state.safetensors` next to the HF checkpoint, so `--resume` continues
//! exactly where a run stopped: the data of step `s` depends only on `(seed, s)`.
//!
//! ## Evaluation
//! [`evaluate_examples`] reports, per exit, exact-match accuracy of greedy decoding (with
//! the KV cache, in [`Mode::Infer`]) and the teacher-forced loss on the answer tokens.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::layers::Mode;
use crate::model::{FamilialModel, Part};
use crate::tasks::{Sequence, Task, TextCorpus};
use crate::weights::{save_safetensors, Checkpoint, MemorySource, TensorSource};

mod eval;
pub use eval::{
    evaluate_examples, evaluate_loss, evaluate_task, exit_nll_sums, exit_nll_sums_at,
    greedy_answer, greedy_batch, nll_sum, ExitScore, TaskReport,
};
pub(crate) use eval::{pack, Packed};

/// File names written next to the HF checkpoint.
pub const STATE_TENSORS: &str = "train_state.safetensors";
/// Step, options and run bookkeeping.
pub const STATE_JSON: &str = "train_state.json";

/// Hyper-parameters of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainOptions {
    /// Total optimiser steps of the run (the schedule is laid out over these).
    pub steps: u64,
    /// Sequences per step (over all workers).
    pub batch: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Final learning rate as a fraction of `lr` (cosine decay).
    pub min_lr_ratio: f64,
    /// Linear warm-up steps.
    pub warmup: u64,
    /// Decoupled weight decay on matrices (not on norms and biases).
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Clip the global gradient norm to this (0 = off).
    pub clip_norm: f64,
    /// Loss weight of every exit, shallowest first (empty = all 1).
    pub exit_weights: Vec<f64>,
    /// Data-parallel worker threads (each should run single-threaded matmuls).
    pub workers: usize,
    /// Seed of the data stream.
    pub seed: u64,
    /// Weight of the Switch-style router load-balancing loss, averaged over MoE layers
    /// (0 = off; ~0.01 is usual). Dense families ignore it.
    #[serde(default)]
    pub router_balance: f64,
    /// Weight of the ST-MoE router z-loss, averaged over MoE layers (0 = off; ~1e-3).
    #[serde(default)]
    pub router_z: f64,
}

impl Default for TrainOptions {
    fn default() -> Self {
        Self {
            steps: 1000,
            batch: 32,
            lr: 2e-3,
            min_lr_ratio: 0.1,
            warmup: 100,
            weight_decay: 0.05,
            beta1: 0.9,
            beta2: 0.98,
            eps: 1e-8,
            clip_norm: 1.0,
            exit_weights: Vec::new(),
            workers: 1,
            seed: 0,
            router_balance: 0.0,
            router_z: 0.0,
        }
    }
}

impl TrainOptions {
    /// Learning rate at (0-based) `step`.
    pub fn lr_at(&self, step: u64) -> f64 {
        if self.warmup > 0 && step < self.warmup {
            return self.lr * (step + 1) as f64 / self.warmup as f64;
        }
        let span = self.steps.saturating_sub(self.warmup).max(1) as f64;
        let t = ((step.saturating_sub(self.warmup)) as f64 / span).min(1.0);
        let min = self.lr * self.min_lr_ratio;
        min + 0.5 * (self.lr - min) * (1.0 + (std::f64::consts::PI * t).cos())
    }
}

/// Where batches come from.
#[derive(Debug, Clone)]
pub enum Data {
    /// A built-in synthetic task.
    Task(Task),
    /// Next-byte language modelling on a text file.
    Text(TextCorpus),
}

impl Data {
    /// The `n` sequences of step `step` of a run with `seed` (deterministic).
    pub fn batch(&self, n: usize, seed: u64, step: u64) -> Vec<Sequence> {
        match self {
            Data::Task(t) => crate::tasks::train_example_batch(*t, n, seed, step)
                .iter()
                .map(Sequence::from)
                .collect(),
            Data::Text(c) => c.train_batch(n, seed, step),
        }
    }
}

/// A worker's gradients (per variable), summed per-exit NLL and router auxiliary losses.
type WorkerOut = (Vec<Option<Tensor>>, Vec<f64>, RouterAuxStats);

/// Router auxiliary losses of a step (unweighted means over MoE layer forwards and workers).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RouterAuxStats {
    /// Load-balancing loss (1.0 = perfectly balanced routing, `E/top_k` = all on one expert).
    pub balance: f64,
    /// Router z-loss.
    pub z: f64,
}

/// What one optimiser step did.
#[derive(Debug, Clone)]
pub struct StepStats {
    /// The step just taken (1-based count of steps done).
    pub step: u64,
    /// Weighted total loss.
    pub loss: f64,
    /// Mean cross-entropy per exit, shallowest first.
    pub exit_losses: Vec<f64>,
    /// Input tokens processed.
    pub tokens: usize,
    /// Loss positions.
    pub loss_tokens: usize,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Router auxiliary losses (zero for dense families).
    pub router: RouterAuxStats,
}

/// A training run's weights and optimiser state.
#[derive(Debug)]
pub struct Trainer {
    cfg: ModelConfig,
    names: Vec<String>,
    vars: Vec<Var>,
    decay: Vec<bool>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    step: u64,
    opts: TrainOptions,
}

/// Whether a tensor gets weight decay: matrices yes, norm weights and biases no.
pub fn decays(name: &str, shape: &[usize]) -> bool {
    shape.len() >= 2 && !name.ends_with(".bias") && !name.contains("norm")
}

/// Saved alongside `train_state.safetensors`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimiser steps done.
    pub step: u64,
    /// The options of the run that wrote the state.
    pub options: TrainOptions,
    /// Free-form bookkeeping of the caller (task, tokens seen, wall time, ...).
    #[serde(default)]
    pub extra: serde_json::Value,
}

impl Trainer {
    /// Start a run from `tensors` (every tensor of the full family of `cfg`).
    pub fn new(
        cfg: ModelConfig,
        tensors: &HashMap<String, Tensor>,
        opts: TrainOptions,
    ) -> Result<Self> {
        let names = FamilialModel::tensor_names(&cfg, &Part::full(&cfg))?;
        Self::with_names(cfg, names, tensors, opts)
    }

    /// Start a run that trains only the tensors `names` of `tensors` (e.g. the exits of a
    /// family over a frozen trunk, [`crate::family::distill`]). [`Trainer::train_step`],
    /// [`Trainer::tensors`] and the model builders need every tensor of the family; the
    /// optimiser ([`Trainer::apply`]) and the state files work on any subset.
    pub fn with_names(
        cfg: ModelConfig,
        names: Vec<String>,
        tensors: &HashMap<String, Tensor>,
        opts: TrainOptions,
    ) -> Result<Self> {
        let mut vars = Vec::with_capacity(names.len());
        let mut decay = Vec::with_capacity(names.len());
        for n in &names {
            let t = tensors.get(n).ok_or_else(|| Error::MissingTensor {
                name: n.clone(),
                expected: vec![],
            })?;
            let t = t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
            decay.push(decays(n, t.dims()));
            vars.push(Var::from_tensor(&t)?);
        }
        let m = vars
            .iter()
            .map(|v| v.as_tensor().zeros_like())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let v = m.clone();
        let t = Self {
            cfg,
            names,
            vars,
            decay,
            m,
            v,
            step: 0,
            opts,
        };
        t.check_options()?;
        Ok(t)
    }

    /// Start a run from the checkpoint in `dir` (any dtype; trained in f32).
    pub fn from_checkpoint(dir: &Path, opts: TrainOptions) -> Result<Self> {
        let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
        let ck = Checkpoint::open(dir)?;
        let shapes = crate::init::tensor_shapes(&cfg)?;
        let mut tensors = HashMap::new();
        for (n, s) in &shapes {
            tensors.insert(n.clone(), ck.get(n, s)?);
        }
        Self::new(cfg, &tensors, opts)
    }

    fn check_options(&self) -> Result<()> {
        let ne = self.cfg.exits.len();
        if !self.opts.exit_weights.is_empty() && self.opts.exit_weights.len() != ne {
            return Err(Error::Invalid(format!(
                "{} exit weights given but the family has {ne} exits ({:?})",
                self.opts.exit_weights.len(),
                self.cfg.exit_points()
            )));
        }
        if self
            .opts
            .exit_weights
            .iter()
            .any(|w| !w.is_finite() || *w < 0.0)
        {
            return Err(Error::Invalid(
                "exit weights must be finite and >= 0".into(),
            ));
        }
        if self.opts.batch == 0 || self.opts.workers == 0 {
            return Err(Error::Invalid(
                "batch and workers must be at least 1".into(),
            ));
        }
        Ok(())
    }

    /// The model configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The options.
    pub fn options(&self) -> &TrainOptions {
        &self.opts
    }

    /// Replace the options (e.g. extend `steps` on resume). Moments and step are kept.
    pub fn set_options(&mut self, opts: TrainOptions) -> Result<()> {
        self.opts = opts;
        self.check_options()
    }

    /// Optimiser steps done.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// Names of the trainable tensors, in optimiser order.
    pub fn param_names(&self) -> &[String] {
        &self.names
    }

    /// The trainable variables, in [`Trainer::param_names`] order.
    pub fn vars(&self) -> &[Var] {
        &self.vars
    }

    /// Number of trainable parameters.
    pub fn num_parameters(&self) -> usize {
        self.vars.iter().map(|v| v.elem_count()).sum()
    }

    /// Loss weight of every exit.
    pub fn exit_weights(&self) -> Vec<f64> {
        if self.opts.exit_weights.is_empty() {
            vec![1.0; self.cfg.exits.len()]
        } else {
            self.opts.exit_weights.clone()
        }
    }

    /// Detached copies of the current weights by name (f32).
    pub fn tensors(&self) -> Result<HashMap<String, Tensor>> {
        self.names
            .iter()
            .zip(&self.vars)
            .map(|(n, v)| Ok((n.clone(), v.as_tensor().detach().copy()?)))
            .collect()
    }

    fn var_source(&self) -> MemorySource {
        MemorySource::new(
            self.names
                .iter()
                .cloned()
                .zip(self.vars.iter().map(|v| v.as_tensor().clone()))
                .collect(),
        )
    }

    /// A differentiable model over the variables (gradients reach them).
    pub fn train_model(&self) -> Result<FamilialModel> {
        FamilialModel::from_source(
            self.cfg.clone(),
            Part::full(&self.cfg),
            &self.var_source(),
            Mode::Train,
        )
    }

    /// An inference model over a snapshot of the current weights.
    pub fn infer_model(&self) -> Result<FamilialModel> {
        FamilialModel::from_source(
            self.cfg.clone(),
            Part::full(&self.cfg),
            &MemorySource::new(self.tensors()?),
            Mode::Infer,
        )
    }

    /// Gradients of the weighted loss on `batch` for every variable (`None`: no gradient
    /// reached it) and the mean cross-entropy per exit. The batch is split over
    /// `options.workers` threads; the loss is normalised by the loss positions of the whole
    /// batch, so the summed gradients equal those of one big batch.
    pub fn gradients(&self, batch: &[Sequence]) -> Result<(Vec<Option<Tensor>>, Vec<f64>)> {
        let (g, means, _) = self.gradients_with_router_aux(batch)?;
        Ok((g, means))
    }

    /// [`Trainer::gradients`] plus the router auxiliary losses: when
    /// `options.router_balance` or `options.router_z` is positive, their weighted means over
    /// the MoE layer forwards join the loss (each worker's share divided by the number of
    /// workers, so the sum is the mean over the batch).
    pub fn gradients_with_router_aux(
        &self,
        batch: &[Sequence],
    ) -> Result<(Vec<Option<Tensor>>, Vec<f64>, RouterAuxStats)> {
        if batch.is_empty() {
            return Err(Error::Invalid("empty batch".into()));
        }
        let total: usize = batch.iter().map(Sequence::loss_positions).sum();
        if total == 0 {
            return Err(Error::Invalid("the batch has no loss positions".into()));
        }
        let weights = self.exit_weights();
        let workers = self.opts.workers.min(batch.len()).max(1);
        let chunk = batch.len().div_ceil(workers);
        let chunks: Vec<&[Sequence]> = batch.chunks(chunk).collect();
        let n_chunks = chunks.len() as f64;
        let (cb, cz) = (self.opts.router_balance, self.opts.router_z);
        let run = |part: &[Sequence]| -> Result<WorkerOut> {
            let mut model = self.train_model()?;
            let sink = crate::layers::RouterAuxSink::default();
            model.set_router_aux_sink(Some(sink.clone()));
            let sums = exit_nll_sums(&model, part)?;
            let recs = std::mem::take(
                &mut *sink
                    .lock()
                    .map_err(|_| Error::Invalid("router aux sink poisoned".into()))?,
            );
            let mut aux_stats = RouterAuxStats::default();
            let mut aux_loss: Option<Tensor> = None;
            if !recs.is_empty() {
                let k = recs.len() as f64;
                for r in &recs {
                    aux_stats.balance += f64::from(r.balance.to_scalar::<f32>()?) / k / n_chunks;
                    aux_stats.z += f64::from(r.z.to_scalar::<f32>()?) / k / n_chunks;
                    for (c, t) in [(cb, &r.balance), (cz, &r.z)] {
                        if c > 0.0 {
                            let term = (t * (c / k / n_chunks))?;
                            aux_loss = Some(match aux_loss {
                                Some(l) => (l + term)?,
                                None => term,
                            });
                        }
                    }
                }
            }
            let mut loss: Option<Tensor> = None;
            let mut per_exit = Vec::with_capacity(sums.len());
            for (s, w) in sums.iter().zip(&weights) {
                per_exit.push(f64::from(s.to_scalar::<f32>()?));
                if *w == 0.0 {
                    continue;
                }
                let term = (s * (*w / total as f64))?;
                loss = Some(match loss {
                    Some(l) => (l + term)?,
                    None => term,
                });
            }
            let loss = loss.ok_or_else(|| Error::Invalid("every exit weight is 0".into()))?;
            let loss = match aux_loss {
                Some(a) => (loss + a)?,
                None => loss,
            };
            let g = self.backward(&loss)?;
            Ok((g, per_exit, aux_stats))
        };
        let results: Vec<Result<WorkerOut>> = if chunks.len() == 1 {
            vec![run(chunks[0])]
        } else {
            std::thread::scope(|s| {
                let handles: Vec<_> = chunks.iter().map(|c| s.spawn(|| run(c))).collect();
                handles
                    .into_iter()
                    .map(|h| {
                        h.join()
                            .unwrap_or_else(|_| Err(Error::Invalid("a worker panicked".into())))
                    })
                    .collect()
            })
        };
        let mut grads: Vec<Option<Tensor>> = vec![None; self.vars.len()];
        let mut sums = vec![0f64; self.cfg.exits.len()];
        let mut router = RouterAuxStats::default();
        for r in results {
            let (g, s, a) = r?;
            router.balance += a.balance;
            router.z += a.z;
            for (acc, gi) in grads.iter_mut().zip(g) {
                if let Some(gi) = gi {
                    *acc = Some(match acc.take() {
                        Some(a) => (a + gi)?,
                        None => gi,
                    });
                }
            }
            for (a, b) in sums.iter_mut().zip(s) {
                *a += b;
            }
        }
        let means = sums.iter().map(|s| s / total as f64).collect();
        Ok((grads, means, router))
    }

    /// One optimiser step on `batch`.
    pub fn train_step(&mut self, batch: &[Sequence]) -> Result<StepStats> {
        let (grads, exit_losses, router) = self.gradients_with_router_aux(batch)?;
        let weights = self.exit_weights();
        let loss = exit_losses.iter().zip(&weights).map(|(l, w)| l * w).sum();
        let (grad_norm, lr) = self.apply(&grads, loss)?;
        Ok(StepStats {
            step: self.step,
            loss,
            exit_losses,
            tokens: batch.iter().map(|s| s.tokens.len() - 1).sum(),
            loss_tokens: batch.iter().map(Sequence::loss_positions).sum(),
            grad_norm,
            lr,
            router,
        })
    }

    /// Backpropagate `loss`: the gradient of every [`Trainer::vars`] entry, in order
    /// (`None` where the loss does not depend on it).
    pub fn backward(&self, loss: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let grads = loss.backward()?;
        Ok(self
            .vars
            .iter()
            .map(|v| grads.get(v.as_tensor()).cloned())
            .collect())
    }

    /// One AdamW step with `grads` (one per [`Trainer::vars`] entry; `None` = no gradient):
    /// global-norm clipping, the scheduled learning rate, decoupled weight decay on
    /// matrices. `loss` only goes into the error message of a non-finite gradient. Returns
    /// the gradient norm before clipping and the learning rate used.
    pub fn apply(&mut self, grads: &[Option<Tensor>], loss: f64) -> Result<(f64, f64)> {
        if grads.len() != self.vars.len() {
            return Err(Error::Invalid(format!(
                "{} gradients for {} trainable tensors",
                grads.len(),
                self.vars.len()
            )));
        }
        let mut sq = 0f64;
        for g in grads.iter().flatten() {
            sq += f64::from(g.sqr()?.sum_all()?.to_scalar::<f32>()?);
        }
        let grad_norm = sq.sqrt();
        if !grad_norm.is_finite() {
            return Err(Error::Invalid(format!(
                "gradient norm is {grad_norm} at step {} (loss {loss}); lower --lr",
                self.step + 1
            )));
        }
        let scale = if self.opts.clip_norm > 0.0 && grad_norm > self.opts.clip_norm {
            self.opts.clip_norm / grad_norm
        } else {
            1.0
        };
        let lr = self.opts.lr_at(self.step);
        self.step += 1;
        let t = self.step as i32;
        let (b1, b2) = (self.opts.beta1, self.opts.beta2);
        let bc1 = 1.0 - b1.powi(t);
        let bc2 = 1.0 - b2.powi(t);
        for (i, g) in grads.iter().enumerate() {
            let Some(g) = g else { continue };
            let g = if scale != 1.0 {
                (g * scale)?
            } else {
                g.clone()
            };
            let m = ((&self.m[i] * b1)? + (&g * (1.0 - b1))?)?;
            let v = ((&self.v[i] * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let upd = ((&m / bc1)? / ((&v / bc2)?.sqrt()? + self.opts.eps)?)?;
            let w = self.vars[i].as_tensor().detach();
            let w = if self.decay[i] && self.opts.weight_decay > 0.0 {
                (&w * (1.0 - lr * self.opts.weight_decay))?
            } else {
                w
            };
            self.vars[i].set(&(w - (upd * lr)?)?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok((grad_norm, lr))
    }

    /// Write the HF checkpoint (`config.json`, `model.safetensors` in `dtype`,
    /// `tokenizer.json`) and the exact training state (f32 master weights, moments, step)
    /// to `dir`. `extra` is stored in `train_state.json`.
    pub fn save(&self, dir: &Path, dtype: DType, extra: serde_json::Value) -> Result<()> {
        let tensors = self.tensors()?;
        crate::init::write_checkpoint(&self.cfg, &tensors, dtype, dir)?;
        self.save_state(dir, extra)
    }

    /// Only the training state (see [`Trainer::save`]).
    pub fn save_state(&self, dir: &Path, extra: serde_json::Value) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let mut st = HashMap::new();
        for (i, n) in self.names.iter().enumerate() {
            st.insert(format!("w.{n}"), self.vars[i].as_tensor().detach());
            st.insert(format!("m.{n}"), self.m[i].clone());
            st.insert(format!("v.{n}"), self.v[i].clone());
        }
        save_safetensors(&st, DType::F32, &dir.join(STATE_TENSORS))?;
        let state = TrainState {
            step: self.step,
            options: self.opts.clone(),
            extra,
        };
        let p = dir.join(STATE_JSON);
        let text = serde_json::to_string_pretty(&state)
            .map_err(|e| Error::Invalid(format!("train state: {e}")))?;
        let tmp = p.with_extension("json.tmp");
        std::fs::write(&tmp, text + "\n").map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, &p).map_err(|e| Error::io(&p, e))
    }

    /// Continue the run saved in `dir` with `opts` (pass the saved options to continue
    /// exactly; a larger `steps` stretches the remaining schedule). Returns the trainer and
    /// the saved state.
    pub fn resume(dir: &Path, opts: Option<TrainOptions>) -> Result<(Self, TrainState)> {
        let p = dir.join(STATE_JSON);
        let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
        let state: TrainState = serde_json::from_str(&text)
            .map_err(|e| Error::Invalid(format!("{}: {e}", p.display())))?;
        let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
        let names = FamilialModel::tensor_names(&cfg, &Part::full(&cfg))?;
        let opts = opts.unwrap_or_else(|| state.options.clone());
        let t = Self::load_state(dir, cfg, names, opts, state.step)?;
        Ok((t, state))
    }

    /// Read the state files in `dir` for a run training `names` of a family with `cfg`
    /// (see [`Trainer::with_names`]): master weights, moments, step.
    pub fn resume_names(
        dir: &Path,
        cfg: ModelConfig,
        names: Vec<String>,
        opts: Option<TrainOptions>,
    ) -> Result<(Self, TrainState)> {
        let p = dir.join(STATE_JSON);
        let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
        let state: TrainState = serde_json::from_str(&text)
            .map_err(|e| Error::Invalid(format!("{}: {e}", p.display())))?;
        let opts = opts.unwrap_or_else(|| state.options.clone());
        let t = Self::load_state(dir, cfg, names, opts, state.step)?;
        Ok((t, state))
    }

    fn load_state(
        dir: &Path,
        cfg: ModelConfig,
        names: Vec<String>,
        opts: TrainOptions,
        step: u64,
    ) -> Result<Self> {
        let st_path = dir.join(STATE_TENSORS);
        // SAFETY: read-only mapping of a file this process does not modify while mapped.
        let st =
            unsafe { candle_core::safetensors::MmapedSafetensors::new(&st_path) }.map_err(|e| {
                Error::Checkpoint {
                    path: st_path.clone(),
                    msg: e.to_string(),
                }
            })?;
        let load = |n: &str| -> Result<Tensor> {
            st.load(n, &Device::Cpu).map_err(|e| Error::Checkpoint {
                path: st_path.clone(),
                msg: format!("`{n}`: {e}"),
            })
        };
        let mut w = HashMap::new();
        for n in &names {
            w.insert(n.clone(), load(&format!("w.{n}"))?);
        }
        let mut t = Self::with_names(cfg, names.clone(), &w, opts)?;
        for (i, n) in names.iter().enumerate() {
            t.m[i] = load(&format!("m.{n}"))?;
            t.v[i] = load(&format!("v.{n}"))?;
        }
        t.step = step;
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_and_decays() {
        let o = TrainOptions {
            steps: 1000,
            warmup: 100,
            lr: 1e-3,
            min_lr_ratio: 0.1,
            ..Default::default()
        };
        assert!((o.lr_at(0) - 1e-5).abs() < 1e-12);
        assert!((o.lr_at(99) - 1e-3).abs() < 1e-12);
        assert!((o.lr_at(100) - 1e-3).abs() < 1e-12);
        assert!(o.lr_at(500) < 1e-3 && o.lr_at(500) > 1e-4);
        assert!((o.lr_at(1000) - 1e-4).abs() < 1e-12);
        assert!((o.lr_at(5000) - 1e-4).abs() < 1e-12);
    }

    #[test]
    fn decay_groups() {
        assert!(decays("model.layers.0.mlp.up_proj.weight", &[8, 4]));
        assert!(!decays("model.layers.0.self_attn.q_proj.bias", &[8]));
        assert!(!decays("model.norms.0.weight", &[8]));
        assert!(!decays("model.layers.0.input_layernorm.weight", &[8]));
    }

    /// The router auxiliary losses: reported for an MoE family, zero for a dense one; with a
    /// positive weight they change the router gradients but not the exit losses.
    #[test]
    fn router_aux_losses_reach_the_routers() -> Result<()> {
        use crate::config::Layout;
        use crate::init::{init_weights, preset_config, Preset};
        let batch: Vec<Sequence> = crate::tasks::train_example_batch(Task::Mix, 4, 1, 0)
            .iter()
            .map(Sequence::from)
            .collect();
        let cfg = preset_config(Preset::MoeSmall, Layout::Qwen2Moe)?;
        let w = init_weights(&cfg, 5)?;
        let plain = Trainer::new(cfg.clone(), &w, TrainOptions::default())?;
        let balanced = Trainer::new(
            cfg,
            &w,
            TrainOptions {
                router_balance: 1.0,
                router_z: 0.1,
                ..TrainOptions::default()
            },
        )?;
        let (g0, l0, a0) = plain.gradients_with_router_aux(&batch)?;
        let (g1, l1, a1) = balanced.gradients_with_router_aux(&batch)?;
        assert_eq!(l0, l1, "exit losses do not include the auxiliary losses");
        assert_eq!(a0, a1, "the statistics do not depend on the weights");
        // Uniform routing gives 1.0; top-2 of 8 on one pair of experts gives 4.0.
        assert!(a0.balance > 0.5 && a0.balance < 4.01, "{a0:?}");
        assert!(a0.z > 0.0, "{a0:?}");
        let router = plain
            .param_names()
            .iter()
            .position(|n| n == "model.layers.4.mlp.gate.weight")
            .ok_or_else(|| Error::Invalid("no router of layer 4".into()))?;
        let diff = (g0[router].as_ref().unwrap() - g1[router].as_ref().unwrap())?
            .abs()?
            .sum_all()?
            .to_scalar::<f32>()?;
        assert!(diff > 0.0, "the auxiliary losses move the router");

        let dense = preset_config(Preset::Tiny, Layout::RuyiQwen2)?;
        let t = Trainer::new(
            dense.clone(),
            &init_weights(&dense, 5)?,
            TrainOptions {
                router_balance: 1.0,
                ..TrainOptions::default()
            },
        )?;
        let (_, _, a) = t.gradients_with_router_aux(&batch)?;
        assert_eq!(a, RouterAuxStats::default());
        Ok(())
    }

    #[test]
    fn nll_matches_candle_cross_entropy() {
        let logits = Tensor::new(&[[1.0f32, 2.0, 0.5], [0.1, -1.0, 3.0]], &Device::Cpu).unwrap();
        let t = Tensor::new(&[[1u32], [0]], &Device::Cpu).unwrap();
        let ours = nll_sum(&logits, &t).unwrap().to_scalar::<f32>().unwrap() / 2.0;
        let ce = candle_nn::loss::cross_entropy(&logits, &t.squeeze(1).unwrap())
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((ours - ce).abs() < 1e-5, "{ours} vs {ce}");
    }
}
