//! The engine: one thread that owns this node's part of the family and every session's KV
//! cache, fed through a bounded queue. Each loop iteration drains the queue and runs all
//! ready steps of different sessions as **one batch** (continuous batching of decode steps
//! and prefill chunks across sessions); backfills and truncations run in the same loop.
//!
//! A [`Stage`] is what a tier computes: trunk layers `[a, b)` and, optionally, the exit at
//! point `b` (Ruyi semantics: the exit reads the state after layers `[0, b)`, which is also
//! the state shipped upward). The entry stage (`a == 0`) takes token ids.

use std::collections::HashMap;
use std::time::Instant;

use candle_core::{Device, Tensor};
use flow_familial::{FamilialModel, Seg, SeqCache};
use tokio::sync::{mpsc, oneshot};

use crate::error::{NodeError, Result};

/// What a tier computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stage {
    /// First trunk layer.
    pub a: usize,
    /// One past the last trunk layer; also the exit point when `exit` is set.
    pub b: usize,
    /// Whether the exit at `b` is hosted.
    pub exit: bool,
}

/// The input rows of a step.
#[derive(Debug)]
pub enum Input {
    /// Token ids (entry stage only).
    Tokens(Vec<u32>),
    /// Hidden states after layer `a`, `[rows, hidden]`.
    Hidden(Tensor),
}

/// One step of one session: positions `start..start+rows`.
#[derive(Debug)]
pub struct StepJob {
    pub session: u64,
    pub start: usize,
    pub input: Input,
    /// Hidden states after layer `a` for positions `backfill_start..start` that this stage
    /// has not seen (they exited below it).
    pub backfill: Option<(usize, Tensor)>,
    /// How many trailing rows need logits.
    pub logit_rows: usize,
    /// Whether this session keeps the exit block's KV (false when its policy always
    /// escalates past this exit, so the block is never needed).
    pub exit_kv: bool,
}

/// What a step returns.
#[derive(Debug)]
pub struct StepOut {
    /// States after layer `b` for the step's rows.
    pub hidden: Tensor,
    /// States after layer `b` for the backfilled rows (owed to the parent in turn).
    pub backfill_hidden: Option<Tensor>,
    /// `[logit_rows, vocab]` logits of the trailing rows, if asked.
    pub logits: Option<Vec<Vec<f32>>>,
    /// Compute time attributed to this job (the batch time, shared).
    pub compute_us: u64,
    /// Number of sessions in the batch this step ran in.
    pub batch_size: usize,
}

enum Job {
    Step(StepJob, oneshot::Sender<Result<StepOut>>),
    Truncate(u64, usize),
    Close(u64),
    Stats(oneshot::Sender<EngineStats>),
}

/// A snapshot of the engine's state.
#[derive(Debug, Clone, Default)]
pub struct EngineStats {
    pub sessions: usize,
    pub kv_bytes: usize,
    pub batches: u64,
    pub batched_steps: u64,
    pub evictions: u64,
    pub queue_depth: usize,
}

struct SessionKv {
    cache: SeqCache,
    last_used: u64,
}

/// Handle to the engine thread. Cheap to clone.
#[derive(Clone, Debug)]
pub struct EngineHandle {
    tx: mpsc::Sender<Job>,
    stage: Stage,
    hidden_size: usize,
    vocab: usize,
}

/// Engine limits.
#[derive(Debug, Clone, Copy)]
pub struct EngineConfig {
    /// Queue slots; senders wait when it is full (backpressure, never unbounded growth).
    pub queue: usize,
    /// Most rows (tokens) one batch carries; further steps wait for the next iteration.
    pub max_batch_tokens: usize,
    /// KV memory budget across sessions; the least recently used session is evicted (and
    /// its next step fails with a clear error) when a step would exceed it.
    pub kv_budget_bytes: usize,
    /// Threads for model compute. The engine loop runs inside its own rayon pool of this
    /// size: candle's kernels dispatch to rayon, and calling them from a thread outside a
    /// pool costs a hand-off per op (measured: ~20% of decode time).
    pub threads: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            queue: 256,
            max_batch_tokens: 4096,
            kv_budget_bytes: 512 << 20,
            threads: 1,
        }
    }
}

impl EngineHandle {
    /// Start the engine thread for `model` computing `stage`.
    pub fn spawn(model: FamilialModel, stage: Stage, cfg: EngineConfig) -> Result<Self> {
        let hidden_size = model.config().hidden_size;
        let vocab = model.config().vocab_size;
        if stage.a > stage.b || stage.b > model.config().num_layers {
            return Err(NodeError::Config(format!(
                "stage layers {}..{} do not fit a {}-layer model",
                stage.a,
                stage.b,
                model.config().num_layers
            )));
        }
        let (tx, rx) = mpsc::channel(cfg.queue.max(1));
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(cfg.threads.max(1))
            .thread_name(|i| format!("flow-engine-{i}"))
            .build()
            .map_err(|e| NodeError::Internal(format!("cannot start the engine pool: {e}")))?;
        std::thread::Builder::new()
            .name("flow-engine".into())
            .spawn(move || pool.install(move || Engine::new(model, stage, cfg).run(rx)))
            .map_err(|e| NodeError::Internal(format!("cannot start the engine thread: {e}")))?;
        Ok(Self {
            tx,
            stage,
            hidden_size,
            vocab,
        })
    }

    /// The stage this engine computes.
    pub fn stage(&self) -> Stage {
        self.stage
    }

    /// Model width.
    pub fn hidden_size(&self) -> usize {
        self.hidden_size
    }

    /// Vocabulary size.
    pub fn vocab(&self) -> usize {
        self.vocab
    }

    /// Run one step (batched with whatever else is ready).
    pub async fn step(&self, job: StepJob) -> Result<StepOut> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Job::Step(job, tx))
            .await
            .map_err(|_| NodeError::Internal("the engine thread has stopped".into()))?;
        rx.await
            .map_err(|_| NodeError::Internal("the engine dropped a step".into()))?
    }

    /// Forget positions `len..` of `session` (speculative rollback).
    pub async fn truncate(&self, session: u64, len: usize) {
        let _ = self.tx.send(Job::Truncate(session, len)).await;
    }

    /// Free `session`'s KV.
    pub async fn close(&self, session: u64) {
        let _ = self.tx.send(Job::Close(session)).await;
    }

    /// Free `session`'s KV without waiting (from `Drop`); skipped if the queue is full,
    /// in which case LRU eviction reclaims it later.
    pub fn close_now(&self, session: u64) {
        let _ = self.tx.try_send(Job::Close(session));
    }

    /// Current statistics.
    pub async fn stats(&self) -> EngineStats {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Job::Stats(tx)).await.is_err() {
            return EngineStats::default();
        }
        let mut s = rx.await.unwrap_or_default();
        s.queue_depth = self.tx.max_capacity() - self.tx.capacity();
        s
    }
}

struct Engine {
    model: FamilialModel,
    stage: Stage,
    cfg: EngineConfig,
    sessions: HashMap<u64, SessionKv>,
    evicted: HashMap<u64, ()>,
    clock: u64,
    stats: EngineStats,
}

impl Engine {
    fn new(model: FamilialModel, stage: Stage, cfg: EngineConfig) -> Self {
        Self {
            model,
            stage,
            cfg,
            sessions: HashMap::new(),
            evicted: HashMap::new(),
            clock: 0,
            stats: EngineStats::default(),
        }
    }

    fn run(mut self, mut rx: mpsc::Receiver<Job>) {
        let mut pending: Vec<(StepJob, oneshot::Sender<Result<StepOut>>)> = Vec::new();
        loop {
            if pending.is_empty() {
                match rx.blocking_recv() {
                    Some(j) => self.accept(j, &mut pending),
                    None => return,
                }
            }
            while let Ok(j) = rx.try_recv() {
                self.accept(j, &mut pending);
            }
            // One batch: distinct sessions, within the token budget, in arrival order.
            let mut batch = Vec::new();
            let mut rest = Vec::new();
            let mut tokens = 0;
            for (job, tx) in pending.drain(..) {
                let rows = job_rows(&job);
                let dup = batch
                    .iter()
                    .any(|(j, _): &(StepJob, _)| j.session == job.session);
                if dup || (!batch.is_empty() && tokens + rows > self.cfg.max_batch_tokens) {
                    rest.push((job, tx));
                } else {
                    tokens += rows;
                    batch.push((job, tx));
                }
            }
            pending = rest;
            self.run_batch(batch);
        }
    }

    fn accept(&mut self, job: Job, pending: &mut Vec<(StepJob, oneshot::Sender<Result<StepOut>>)>) {
        match job {
            Job::Step(j, tx) => pending.push((j, tx)),
            Job::Truncate(s, len) => {
                if let Some(kv) = self.sessions.get_mut(&s) {
                    kv.cache.truncate(len);
                }
            }
            Job::Close(s) => {
                self.sessions.remove(&s);
                self.evicted.remove(&s);
            }
            Job::Stats(tx) => {
                let mut s = self.stats.clone();
                s.sessions = self.sessions.len();
                s.kv_bytes = self.sessions.values().map(|k| k.cache.bytes()).sum();
                let _ = tx.send(s);
            }
        }
    }

    fn run_batch(&mut self, batch: Vec<(StepJob, oneshot::Sender<Result<StepOut>>)>) {
        if batch.is_empty() {
            return;
        }
        // Backfills first, per session: they must precede the step's positions.
        let mut ready = Vec::with_capacity(batch.len());
        for (mut job, tx) in batch {
            if self.evicted.contains_key(&job.session) {
                let _ = tx.send(Err(NodeError::Evicted(format!(
                    "session {} was evicted from this node's KV cache (memory budget {} MiB); retry the request",
                    job.session,
                    self.cfg.kv_budget_bytes >> 20
                ))));
                continue;
            }
            self.ensure_budget(job.session);
            let backfill = match job.backfill.take() {
                Some((start, h)) => match self.backfill(job.session, start, &h) {
                    Ok(out) => Some(out),
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        continue;
                    }
                },
                None => None,
            };
            ready.push((job, tx, backfill));
        }
        if ready.is_empty() {
            return;
        }
        let t0 = Instant::now();
        let result = self.step_batch(&ready);
        let us = t0.elapsed().as_micros() as u64;
        self.stats.batches += 1;
        self.stats.batched_steps += ready.len() as u64;
        let n = ready.len();
        match result {
            Ok(outs) => {
                for ((_, tx, bf), (hidden, logits)) in ready.into_iter().zip(outs) {
                    let _ = tx.send(Ok(StepOut {
                        hidden,
                        backfill_hidden: bf,
                        logits,
                        compute_us: us,
                        batch_size: n,
                    }));
                }
            }
            Err(e) => {
                let msg = e.to_string();
                for (_, tx, _) in ready {
                    let _ = tx.send(Err(NodeError::Model(msg.clone())));
                }
            }
        }
    }

    fn cache(&mut self, session: u64) -> &mut SessionKv {
        self.clock += 1;
        let clock = self.clock;
        let model = &self.model;
        let kv = self.sessions.entry(session).or_insert_with(|| SessionKv {
            cache: model.new_cache(),
            last_used: clock,
        });
        kv.last_used = clock;
        kv
    }

    fn ensure_budget(&mut self, keep: u64) {
        loop {
            let total: usize = self.sessions.values().map(|k| k.cache.bytes()).sum();
            if total <= self.cfg.kv_budget_bytes || self.sessions.len() <= 1 {
                return;
            }
            let victim = self
                .sessions
                .iter()
                .filter(|(s, _)| **s != keep)
                .min_by_key(|(_, k)| k.last_used)
                .map(|(s, _)| *s);
            match victim {
                Some(v) => {
                    tracing::warn!(session = v, "evicting session KV (memory budget)");
                    self.sessions.remove(&v);
                    self.evicted.insert(v, ());
                    self.stats.evictions += 1;
                }
                None => return,
            }
        }
    }

    fn backfill(&mut self, session: u64, start: usize, h: &Tensor) -> Result<Tensor> {
        let Stage { a, b, exit } = self.stage;
        let rows = h.dim(0)?;
        let exits: Vec<usize> = if exit { vec![b] } else { vec![] };
        self.cache(session);
        let mut kv = self
            .sessions
            .remove(&session)
            .ok_or_else(|| NodeError::Internal("session cache vanished".into()))?;
        let r = self.model.backfill(
            h,
            a..b,
            &exits,
            &[Seg::new(start, rows)],
            &mut [&mut kv.cache],
        );
        self.sessions.insert(session, kv);
        Ok(r?)
    }

    #[allow(clippy::type_complexity)]
    fn step_batch(
        &mut self,
        ready: &[(StepJob, oneshot::Sender<Result<StepOut>>, Option<Tensor>)],
    ) -> Result<Vec<(Tensor, Option<Vec<Vec<f32>>>)>> {
        let Stage { a, b, exit } = self.stage;
        let segs: Vec<Seg> = ready
            .iter()
            .map(|(j, _, _)| Seg::new(j.start, job_rows(j)))
            .collect();
        let x = if a == 0 {
            let mut toks = Vec::new();
            for (j, _, _) in ready {
                match &j.input {
                    Input::Tokens(t) => toks.extend_from_slice(t),
                    Input::Hidden(_) => {
                        return Err(NodeError::Protocol(
                            "the entry stage takes token ids, not hidden states".into(),
                        ))
                    }
                }
            }
            self.model.embed(&toks)?
        } else {
            let mut hs = Vec::new();
            for (j, _, _) in ready {
                match &j.input {
                    Input::Hidden(h) => hs.push(h.clone()),
                    Input::Tokens(_) => {
                        return Err(NodeError::Protocol(format!(
                            "this node starts at layer {a}; it needs hidden states, not tokens"
                        )))
                    }
                }
            }
            Tensor::cat(&hs, 0)?
        };
        // Take every session's cache out of the map for the batched call.
        let ids: Vec<u64> = ready.iter().map(|(j, _, _)| j.session).collect();
        for &s in &ids {
            self.cache(s);
        }
        let mut caches: Vec<SessionKv> = ids
            .iter()
            .map(|s| self.sessions.remove(s))
            .collect::<Option<_>>()
            .ok_or_else(|| NodeError::Internal("session cache vanished".into()))?;
        let res = {
            let mut refs: Vec<&mut SeqCache> = caches.iter_mut().map(|k| &mut k.cache).collect();
            self.compute(&x, &segs, &mut refs, ready, a, b, exit)
        };
        for (s, kv) in ids.into_iter().zip(caches) {
            self.sessions.insert(s, kv);
        }
        res
    }

    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    fn compute(
        &self,
        x: &Tensor,
        segs: &[Seg],
        caches: &mut [&mut SeqCache],
        ready: &[(StepJob, oneshot::Sender<Result<StepOut>>, Option<Tensor>)],
        a: usize,
        b: usize,
        exit: bool,
    ) -> Result<Vec<(Tensor, Option<Vec<Vec<f32>>>)>> {
        let h = self.model.run_layers(x, a..b, segs, caches)?;
        let wants_logits = ready.iter().any(|(j, _, _)| j.logit_rows > 0);
        let mut logits_rows: Vec<Option<Vec<Vec<f32>>>> = vec![None; ready.len()];
        // Sessions whose policy may ever answer here keep the exit block's KV for every
        // position; sessions that always escalate past this exit skip the block entirely.
        let need: Vec<bool> = ready.iter().map(|(j, _, _)| j.exit_kv).collect();
        if exit && need.iter().any(|&n| n) {
            let all = need.iter().all(|&n| n);
            let (sub_h, sub_segs) = if all {
                (h.clone(), segs.to_vec())
            } else {
                let mut parts = Vec::new();
                let mut sub = Vec::new();
                let mut off = 0;
                for (s, &n) in segs.iter().zip(&need) {
                    if n {
                        parts.push(h.narrow(0, off, s.len)?);
                        sub.push(*s);
                    }
                    off += s.len;
                }
                (Tensor::cat(&parts, 0)?, sub)
            };
            let mut sub_caches: Vec<&mut SeqCache> = caches
                .iter_mut()
                .zip(&need)
                .filter(|(_, &n)| n)
                .map(|(c, _)| &mut **c)
                .collect();
            // Norm and head only on the rows someone asked for.
            let blk = self
                .model
                .exit_block(&sub_h, b, &sub_segs, &mut sub_caches)?;
            if wants_logits {
                let mut idx = Vec::new();
                let mut off = 0usize;
                for (((j, _, _), s), &n) in ready.iter().zip(segs).zip(&need) {
                    if !n {
                        continue;
                    }
                    let k = j.logit_rows.min(s.len);
                    for r in (s.len - k)..s.len {
                        idx.push((off + r) as u32);
                    }
                    off += s.len;
                }
                if ready
                    .iter()
                    .zip(&need)
                    .any(|((j, _, _), &n)| j.logit_rows > 0 && !n)
                {
                    return Err(NodeError::Internal(
                        "logits asked for a step that skips the exit block".into(),
                    ));
                }
                let idx_t = Tensor::from_vec(idx.clone(), idx.len(), &Device::Cpu)?;
                let rows = blk.index_select(&idx_t, 0)?;
                let logits: Vec<Vec<f32>> = self.model.exit_head(&rows, b)?.to_vec2()?;
                let mut it = logits.into_iter();
                for (slot, ((j, _, _), s)) in logits_rows.iter_mut().zip(ready.iter().zip(segs)) {
                    let n = j.logit_rows.min(s.len);
                    if n > 0 {
                        *slot = Some(it.by_ref().take(n).collect());
                    }
                }
            }
        } else if wants_logits {
            return Err(NodeError::Protocol(format!(
                "logits asked for, but this node hosts no exit at layer {b}"
            )));
        }
        let mut outs = Vec::with_capacity(ready.len());
        let mut off = 0;
        for (s, l) in segs.iter().zip(logits_rows) {
            outs.push((h.narrow(0, off, s.len)?, l));
            off += s.len;
        }
        Ok(outs)
    }
}

fn job_rows(j: &StepJob) -> usize {
    match &j.input {
        Input::Tokens(t) => t.len(),
        Input::Hidden(h) => h.dim(0).unwrap_or(0),
    }
}
