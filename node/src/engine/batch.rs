//! The batching core of the engine thread: [`Engine`] owns the loaded part of the family
//! and every session's KV, accepts steps into the pending set ([`Pend`], in `pend.rs`) and
//! runs one batch per iteration; [`run`] is the thread's loop. See the parent module for the batching and fast-path rules.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use candle_core::{Device, Tensor};
use flow_familial::{FamilialModel, Seg, SeqCache};
use tokio::sync::mpsc;

use flow_moe::cloud::PrunedServing;
use flow_moe::scheduler::{plan_chunks, Pending};

use super::pend::{job_rows, Pend};
use super::{
    Core, EngineConfig, EngineStats, Input, Job, OsInstant, SessionKv, Shared, Stage, StepJob,
    StepOut,
};
use crate::error::{NodeError, Result};

/// The engine thread: wait for work, then run batches until nothing is pending.
pub(super) fn run(shared: &Shared, mut rx: mpsc::Receiver<Job>) {
    while let Some(j) = rx.blocking_recv() {
        shared.busy.fetch_add(1, Ordering::AcqRel);
        let mut core = shared.lock();
        let Core { engine, pending } = &mut *core;
        shared.queued.fetch_sub(1, Ordering::AcqRel);
        engine.accept(j, pending);
        loop {
            while let Ok(j) = rx.try_recv() {
                shared.queued.fetch_sub(1, Ordering::AcqRel);
                engine.accept(j, pending);
            }
            if pending.is_empty() {
                break;
            }
            engine.iterate(pending);
        }
        shared.busy.fetch_sub(1, Ordering::AcqRel);
    }
}

pub(super) struct Engine {
    model: FamilialModel,
    stage: Stage,
    cfg: EngineConfig,
    sessions: HashMap<u64, SessionKv>,
    evicted: HashMap<u64, ()>,
    clock: u64,
    stats: EngineStats,
    /// Expert pruning and each session's pattern.
    pub(super) moe: Option<PrunedServing>,
    patterns: HashMap<u64, usize>,
}

impl Engine {
    pub(super) fn new(model: FamilialModel, stage: Stage, cfg: EngineConfig) -> Self {
        Self {
            model,
            stage,
            cfg,
            sessions: HashMap::new(),
            evicted: HashMap::new(),
            clock: 0,
            stats: EngineStats::default(),
            moe: None,
            patterns: HashMap::new(),
        }
    }

    /// One iteration: form a batch with the chunked-prefill scheduler (token budget
    /// `max_batch_tokens`: decodes first, then in-progress prefills, then new ones FCFS;
    /// one step per session, in order), run it, and answer the steps it completed.
    pub(super) fn iterate(&mut self, pending: &mut Vec<Pend>) {
        // Only the oldest step of each session may run (later ones are later positions).
        // One batch runs one layer range: that of the oldest waiting step (sessions cut
        // at different layers take turns, oldest first).
        let Some(stage) = pending.first().map(|p| p.job.stage.unwrap_or(self.stage)) else {
            return;
        };
        // With expert pruning, one batch also runs one task pattern (that of the oldest).
        let pattern = pending
            .first()
            .and_then(|p| self.patterns.get(&p.job.session).copied());
        let mut seen: Vec<u64> = Vec::new();
        let mut eligible: Vec<usize> = Vec::new();
        for (i, p) in pending.iter().enumerate() {
            if !seen.contains(&p.job.session) {
                seen.push(p.job.session);
                if p.job.stage.unwrap_or(self.stage) == stage
                    && self.patterns.get(&p.job.session).copied() == pattern
                {
                    eligible.push(i);
                }
            }
        }
        if let (Some(moe), Some(id)) = (self.moe.as_mut(), pattern) {
            if let Err(e) = moe.prepare(&mut self.model, id) {
                let msg = format!("expert pruning: {e}");
                for &i in &eligible {
                    pending[i].fail(NodeError::Model(msg.clone()));
                }
                pending.retain(|p| !p.finished());
                return;
            }
        }
        let work: Vec<Pending> = eligible
            .iter()
            .map(|&i| {
                let p = &pending[i];
                Pending {
                    rows: p.rows - p.done,
                    logit_rows: p.job.logit_rows.min(p.rows),
                    started: p.done > 0,
                }
            })
            .collect();
        let plan = plan_chunks(&work, self.cfg.max_batch_tokens.max(1));
        let mut chunks = Vec::new();
        let mut picked = Vec::new();
        for (&i, &rows) in eligible.iter().zip(&plan) {
            if rows == 0 {
                continue;
            }
            match pending[i].chunk(rows) {
                Ok(c) => {
                    chunks.push(c);
                    picked.push(i);
                }
                Err(e) => pending[i].fail(e),
            }
        }
        self.stats.partial_chunks += picked
            .iter()
            .zip(&chunks)
            .filter(|(&i, c)| pending[i].done + job_rows(c) < pending[i].rows)
            .count() as u64;
        let now = OsInstant::now();
        for &i in &picked {
            pending[i].started.get_or_insert(now);
        }
        let outs = self.run_batch(chunks, stage);
        for (i, out) in picked.iter().zip(outs) {
            pending[*i].absorb(out);
        }
        pending.retain(|p| !p.finished());
    }

    pub(super) fn accept(&mut self, job: Job, pending: &mut Vec<Pend>) {
        match job {
            Job::Step(j, tx, t0) => {
                if self.moe.is_some() && !self.patterns.contains_key(&j.session) {
                    match self.assign_pattern(&j) {
                        Ok(id) => {
                            self.patterns.insert(j.session, id);
                        }
                        Err(e) => {
                            Pend::new(j, tx, t0).fail(e);
                            return;
                        }
                    }
                }
                pending.push(Pend::new(j, tx, t0));
            }
            Job::Truncate(s, len) => {
                if let Some(kv) = self.sessions.get_mut(&s) {
                    kv.cache.truncate(len);
                }
            }
            Job::Close(s) => {
                self.sessions.remove(&s);
                self.evicted.remove(&s);
                self.patterns.remove(&s);
            }
            Job::Stats(tx) => {
                let mut s = self.stats.clone();
                s.moe = self.moe.as_ref().map(PrunedServing::stats);
                s.sessions = self.sessions.len();
                s.kv_bytes = self.sessions.values().map(|k| k.cache.bytes()).sum();
                s.kv_budget_bytes = self.cfg.kv_budget_bytes;
                let _ = tx.send(s);
            }
        }
    }

    /// The task pattern of a session's first step: retrieved by the signature of its prompt
    /// (backfilled rows from position 0 plus the step's rows), or the fallback when this
    /// node never sees the prompt from position 0 or the session starts above the
    /// signature layer.
    fn assign_pattern(&mut self, j: &StepJob) -> Result<usize> {
        let Some(moe) = self.moe.as_mut() else {
            return Err(NodeError::Internal("no expert pruning".into()));
        };
        let from = j.stage.unwrap_or(self.stage).a;
        let x = match &j.input {
            Input::Tokens(t) if from == 0 => self.model.embed(t)?,
            Input::Hidden(h) => h.clone(),
            Input::Tokens(_) => return Ok(moe.fallback()),
        };
        let whole = match &j.backfill {
            Some((0, bf)) => Some(Tensor::cat(&[bf, &x], 0)?),
            Some(_) => None,
            None if j.start == 0 => Some(x),
            None => None,
        };
        match whole {
            Some(h) if from <= moe.signature_layer() => moe
                .assign(&self.model, &h, from)
                .map_err(|e| NodeError::Model(format!("expert pattern retrieval: {e}"))),
            _ => Ok(moe.fallback()),
        }
    }

    /// Whether this engine can run `st`: a sub-range of the loaded layers, with the exit
    /// at its end loaded when it asks for one.
    fn check_stage(&self, st: Stage) -> Result<()> {
        let loaded = self.stage;
        if st.a > st.b || st.a < loaded.a || st.b > loaded.b {
            return Err(NodeError::Protocol(format!(
                "layers {}..{} asked for, but this node hosts layers {}..{}",
                st.a, st.b, loaded.a, loaded.b
            )));
        }
        if st.exit && !self.model.part().exits.contains(&st.b) {
            return Err(NodeError::Protocol(format!(
                "the exit at layer {} asked for, but this node hosts exits {:?}",
                st.b,
                self.model.part().exits
            )));
        }
        Ok(())
    }

    /// Run `batch` (at most one step per session, all running layers `stage`) as one
    /// forward pass; one result per step.
    fn run_batch(&mut self, batch: Vec<StepJob>, stage: Stage) -> Vec<Result<StepOut>> {
        if let Err(e) = self.check_stage(stage) {
            let msg = e.to_string();
            return batch
                .iter()
                .map(|_| Err(NodeError::Protocol(msg.clone())))
                .collect();
        }
        let mut results: Vec<Option<Result<StepOut>>> = batch.iter().map(|_| None).collect();
        // Backfills first, per session: they must precede the step's positions.
        let mut ready = Vec::with_capacity(batch.len());
        for (i, mut job) in batch.into_iter().enumerate() {
            if self.evicted.contains_key(&job.session) {
                results[i] = Some(Err(NodeError::Evicted(format!(
                    "session {} was evicted from this node's KV cache (memory budget {} MiB); retry the request",
                    job.session,
                    self.cfg.kv_budget_bytes >> 20
                ))));
                continue;
            }
            self.ensure_budget(job.session);
            if let Some((start, h)) = job.exit_backfill.take() {
                // The exit block alone (no trunk layers) over the positions it skipped.
                let r = if stage.exit && job.exit_kv {
                    let at_exit = Stage {
                        a: stage.b,
                        ..stage
                    };
                    self.backfill(job.session, start, &h, at_exit, true)
                        .map(drop)
                } else {
                    Err(NodeError::Internal(
                        "an exit backfill for a step that does not run this stage's exit".into(),
                    ))
                };
                if let Err(e) = r {
                    results[i] = Some(Err(e));
                    continue;
                }
            }
            let backfill = match job.backfill.take() {
                Some((start, h)) => match self.backfill(job.session, start, &h, stage, job.exit_kv)
                {
                    Ok(out) => Some(out),
                    Err(e) => {
                        results[i] = Some(Err(e));
                        continue;
                    }
                },
                None => None,
            };
            ready.push((job, i, backfill));
        }
        if !ready.is_empty() {
            let t0 = OsInstant::now();
            let result = self.step_batch(&ready, stage);
            let us = t0.elapsed().as_micros() as u64;
            self.stats.batches += 1;
            self.stats.batched_steps += ready.len() as u64;
            let n = ready.len();
            match result {
                Ok(outs) => {
                    for ((_, i, bf), (hidden, logits)) in ready.into_iter().zip(outs) {
                        results[i] = Some(Ok(StepOut {
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
                    for (_, i, _) in ready {
                        results[i] = Some(Err(NodeError::Model(msg.clone())));
                    }
                }
            }
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(NodeError::Internal("step lost in a batch".into()))))
            .collect()
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

    /// Run `f` on `session`'s cache (created if new), taken out of the map meanwhile.
    fn with_cache<T>(
        &mut self,
        session: u64,
        f: impl FnOnce(&FamilialModel, &mut SeqCache) -> flow_familial::Result<T>,
    ) -> Result<T> {
        self.cache(session);
        let mut kv = self
            .sessions
            .remove(&session)
            .ok_or_else(|| NodeError::Internal("session cache vanished".into()))?;
        let r = f(&self.model, &mut kv.cache);
        self.sessions.insert(session, kv);
        Ok(r?)
    }

    /// Run layers `a..b` of `stage` (and its exit block, with `exit_kv`) over `h`, the
    /// states for positions `start..` that this session's KV lacks.
    fn backfill(
        &mut self,
        session: u64,
        start: usize,
        h: &Tensor,
        stage: Stage,
        exit_kv: bool,
    ) -> Result<Tensor> {
        let Stage { a, b, exit } = stage;
        let exits: Vec<usize> = if exit && exit_kv { vec![b] } else { vec![] };
        let segs = [Seg::new(start, h.dim(0)?)];
        self.with_cache(session, |model, cache| {
            model.backfill(h, a..b, &exits, &segs, &mut [cache])
        })
    }

    #[allow(clippy::type_complexity)]
    fn step_batch(
        &mut self,
        ready: &[(StepJob, usize, Option<Tensor>)],
        stage: Stage,
    ) -> Result<Vec<(Tensor, Option<Vec<Vec<f32>>>)>> {
        let Stage { a, b, exit } = stage;
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
        ready: &[(StepJob, usize, Option<Tensor>)],
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
