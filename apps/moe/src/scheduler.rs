//! Continuous batching with chunked prefill (Sarathi-Serve's stall-free batching), as a pure
//! state machine: no clock, no model, no IO. A serving loop calls [`Scheduler::add`] when a
//! request arrives and [`Scheduler::schedule`] once per iteration, runs the returned
//! [`Batch`] as one forward pass, and repeats.
//!
//! Per iteration, with a token budget `B` ([`Policy::Chunked`]):
//! 1. every running decode gets its one token (decodes never wait behind a prompt);
//! 2. prefills already in progress get chunks of `min(remaining prompt, budget left)`, in
//!    arrival order;
//! 3. new requests are admitted first-come-first-served while the budget, the running-set
//!    cap (`B`, so step 1 always fits) and KV memory allow; the head of the queue is never
//!    overtaken (no starvation of long prompts).
//!
//! KV memory is counted in tokens. A request reserves its prompt on admission and grows by
//! one token per decode; when a decode cannot grow, the most recently admitted request is
//! **preempted** (its KV dropped, to be recomputed from prompt + generated tokens when it is
//! re-admitted, in arrival order) and counted in [`SchedulerStats::preemptions`]. The
//! oldest running request is never the victim while another exists, so it always finishes.
//!
//! [`Policy::PrefillFirst`] is the baseline batching without chunking (vLLM's default
//! before chunked prefill): an iteration either prefills whole new prompts (up to the
//! budget, at least one) or, when none can start, runs every decode — a long prompt stalls
//! every running decode for its whole prefill.
//!
//! [`plan_chunks`] is the budget-splitting core on its own, for engines whose work arrives
//! as steps rather than as requests of known length (the node engine uses it).

use std::collections::VecDeque;

use crate::error::{Error, Result};

/// How an iteration's batch is formed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Decodes first, then prefill chunks within the token budget (Sarathi-Serve).
    Chunked,
    /// Whole prompts first (decodes paused while any prompt can start), no chunking.
    PrefillFirst,
}

/// Scheduler limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Most tokens one iteration processes (decodes count one each). Also caps the number
    /// of running requests, so every decode always fits.
    pub token_budget: usize,
    /// KV memory in tokens across all running requests.
    pub kv_capacity: usize,
    pub policy: Policy,
}

/// A request as the scheduler sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub id: u64,
    /// Prompt tokens (> 0).
    pub prompt_len: usize,
    /// Tokens to generate (> 0); the first comes out of the prefill.
    pub max_new: usize,
}

/// One piece of work in an iteration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Work {
    /// One decode step (one token in, one token out).
    Decode { id: u64 },
    /// Prefill positions `start..start + len` of the request's context (its prompt, plus
    /// the tokens it had generated if it was preempted). `last`: this chunk completes the
    /// prefill and yields a token.
    Prefill {
        id: u64,
        start: usize,
        len: usize,
        last: bool,
    },
}

impl Work {
    /// The request this work belongs to.
    pub fn id(&self) -> u64 {
        match *self {
            Work::Decode { id } | Work::Prefill { id, .. } => id,
        }
    }

    /// Tokens this work processes.
    pub fn tokens(&self) -> usize {
        match *self {
            Work::Decode { .. } => 1,
            Work::Prefill { len, .. } => len,
        }
    }

    /// Whether this work yields a token for its request.
    pub fn emits(&self) -> bool {
        match *self {
            Work::Decode { .. } => true,
            Work::Prefill { last, .. } => last,
        }
    }
}

/// What one iteration runs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Batch {
    /// Decodes first, then prefill chunks (in-progress, then new), in that order.
    pub work: Vec<Work>,
    /// Requests preempted while forming this batch (their KV must be dropped).
    pub preempted: Vec<u64>,
    /// Requests that produce their last token in this batch (free their KV afterwards).
    pub finished: Vec<u64>,
}

impl Batch {
    /// Tokens in the batch.
    pub fn tokens(&self) -> usize {
        self.work.iter().map(Work::tokens).sum()
    }
}

/// Counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SchedulerStats {
    pub iterations: u64,
    pub preemptions: u64,
    pub finished: u64,
    /// Iterations that had running decodes but scheduled none of them (prefill-first
    /// stalls; always 0 under [`Policy::Chunked`]).
    pub stalled_iterations: u64,
}

#[derive(Debug, Clone)]
struct Seq {
    req: Request,
    arrival: u64,
    /// Tokens to prefill: the prompt, plus generated tokens after a preemption.
    target: usize,
    prefilled: usize,
    generated: usize,
    /// KV tokens held (reserved prompt + decode steps).
    kv: usize,
}

impl Seq {
    fn decoding(&self) -> bool {
        self.prefilled == self.target
    }
}

/// The chunked-prefill scheduler. See the module docs.
#[derive(Debug)]
pub struct Scheduler {
    cfg: SchedulerConfig,
    waiting: VecDeque<Seq>,
    /// Admitted, in admission order.
    running: Vec<Seq>,
    arrivals: u64,
    stats: SchedulerStats,
}

impl Scheduler {
    /// A scheduler with `cfg` (budget and KV capacity must be positive).
    pub fn new(cfg: SchedulerConfig) -> Result<Self> {
        if cfg.token_budget == 0 || cfg.kv_capacity == 0 {
            return Err(Error::Invalid(format!(
                "token budget ({}) and KV capacity ({}) must be positive",
                cfg.token_budget, cfg.kv_capacity
            )));
        }
        Ok(Self {
            cfg,
            waiting: VecDeque::new(),
            running: Vec::new(),
            arrivals: 0,
            stats: SchedulerStats::default(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> SchedulerConfig {
        self.cfg
    }

    /// Queue a request. Rejects requests that could never fit the KV capacity on their own.
    pub fn add(&mut self, req: Request) -> Result<()> {
        if req.prompt_len == 0 || req.max_new == 0 {
            return Err(Error::Invalid(format!(
                "request {}: prompt length and max_new must be positive",
                req.id
            )));
        }
        if req.prompt_len + req.max_new > self.cfg.kv_capacity {
            return Err(Error::Invalid(format!(
                "request {}: prompt {} + max_new {} tokens exceed the KV capacity of {} tokens",
                req.id, req.prompt_len, req.max_new, self.cfg.kv_capacity
            )));
        }
        if self
            .waiting
            .iter()
            .chain(&self.running)
            .any(|s| s.req.id == req.id)
        {
            return Err(Error::Invalid(format!(
                "request {} is already queued",
                req.id
            )));
        }
        self.waiting.push_back(Seq {
            req,
            arrival: self.arrivals,
            target: req.prompt_len,
            prefilled: 0,
            generated: 0,
            kv: 0,
        });
        self.arrivals += 1;
        Ok(())
    }

    /// Whether nothing is waiting or running.
    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    /// Requests waiting for admission.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Requests admitted.
    pub fn running(&self) -> usize {
        self.running.len()
    }

    /// KV tokens held by running requests.
    pub fn kv_used(&self) -> usize {
        self.running.iter().map(|s| s.kv).sum()
    }

    /// Counters so far.
    pub fn stats(&self) -> SchedulerStats {
        self.stats
    }

    /// Form the next iteration's batch and advance every request as if it ran.
    pub fn schedule(&mut self) -> Batch {
        let mut batch = Batch::default();
        match self.cfg.policy {
            Policy::Chunked => self.schedule_chunked(&mut batch),
            Policy::PrefillFirst => self.schedule_prefill_first(&mut batch),
        }
        self.finish(&mut batch);
        self.stats.iterations += 1;
        batch
    }

    /// Make room for one more KV token per decoding request, preempting the most recently
    /// admitted requests while it does not fit.
    fn reserve_decodes(&mut self, batch: &mut Batch) {
        loop {
            let need = self.running.iter().filter(|s| s.decoding()).count();
            if self.kv_used() + need <= self.cfg.kv_capacity || self.running.len() <= 1 {
                return;
            }
            if let Some(victim) = self.running.pop() {
                self.preempt(victim, batch);
            }
        }
    }

    fn preempt(&mut self, mut s: Seq, batch: &mut Batch) {
        batch.preempted.push(s.req.id);
        self.stats.preemptions += 1;
        // Recompute: the prompt and every generated token but the last are prefilled again;
        // the last generated token is the decode input that follows.
        s.target = s.req.prompt_len + s.generated.saturating_sub(1);
        s.prefilled = 0;
        s.kv = 0;
        let pos = self
            .waiting
            .iter()
            .position(|w| w.arrival > s.arrival)
            .unwrap_or(self.waiting.len());
        self.waiting.insert(pos, s);
    }

    fn schedule_chunked(&mut self, batch: &mut Batch) {
        self.reserve_decodes(batch);
        let mut left = self.cfg.token_budget;
        for s in self.running.iter_mut().filter(|s| s.decoding()) {
            if left == 0 {
                break; // unreachable: running.len() <= token_budget
            }
            batch.work.push(Work::Decode { id: s.req.id });
            s.kv += 1;
            s.generated += 1;
            left -= 1;
        }
        for s in self.running.iter_mut().filter(|s| !s.decoding()) {
            if left == 0 {
                break;
            }
            let len = (s.target - s.prefilled).min(left);
            batch.work.push(prefill(s, len));
            left -= len;
        }
        self.admit(batch, &mut left, true);
    }

    fn schedule_prefill_first(&mut self, batch: &mut Batch) {
        let mut left = self.cfg.token_budget;
        let had_decodes = self.running.iter().any(Seq::decoding);
        self.admit(batch, &mut left, false);
        if !batch.work.is_empty() {
            if had_decodes {
                self.stats.stalled_iterations += 1;
            }
            return;
        }
        self.reserve_decodes(batch);
        for s in self.running.iter_mut().filter(|s| s.decoding()) {
            batch.work.push(Work::Decode { id: s.req.id });
            s.kv += 1;
            s.generated += 1;
        }
    }

    /// Admit waiting requests FCFS. `chunk`: a prompt may be split to fit the budget left;
    /// otherwise whole prompts only (the first always goes, even if larger than the budget).
    fn admit(&mut self, batch: &mut Batch, left: &mut usize, chunk: bool) {
        while let Some(head) = self.waiting.front() {
            let free = self.cfg.kv_capacity.saturating_sub(self.kv_used());
            let first = batch.work.iter().all(|w| matches!(w, Work::Decode { .. }));
            let fits_budget = if chunk {
                *left > 0
            } else {
                head.target <= *left || first
            };
            // Reserve the context and one decode token so admission itself never preempts.
            if !fits_budget || head.target + 1 > free || self.running.len() >= self.cfg.token_budget
            {
                return;
            }
            let Some(mut s) = self.waiting.pop_front() else {
                return;
            };
            s.kv = s.target;
            let len = if chunk { s.target.min(*left) } else { s.target };
            batch.work.push(prefill(&mut s, len));
            *left = left.saturating_sub(len);
            self.running.push(s);
        }
    }

    fn finish(&mut self, batch: &mut Batch) {
        let done: Vec<u64> = self
            .running
            .iter()
            .filter(|s| s.generated >= s.req.max_new)
            .map(|s| s.req.id)
            .collect();
        self.running.retain(|s| s.generated < s.req.max_new);
        self.stats.finished += done.len() as u64;
        batch.finished = done;
    }
}

fn prefill(s: &mut Seq, len: usize) -> Work {
    let start = s.prefilled;
    s.prefilled += len;
    let last = s.prefilled == s.target;
    if last {
        s.generated += 1;
    }
    Work::Prefill {
        id: s.req.id,
        start,
        len,
        last,
    }
}

/// One pending piece of work for [`plan_chunks`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pending {
    /// Rows still to process.
    pub rows: usize,
    /// Trailing rows that need logits; a chunk never splits them (the last chunk carries
    /// them all). `rows == logit_rows` marks a decode (or draft verification): never split.
    pub logit_rows: usize,
    /// A prefill that already ran a chunk (scheduled before new ones).
    pub started: bool,
}

impl Pending {
    fn is_decode(&self) -> bool {
        self.rows <= self.logit_rows.max(1)
    }
}

/// Rows to run now for each of `pending` (given in arrival order) under a token budget:
/// every decode first, then started prefills, then new prefills, each chunk as large as
/// the budget left allows (never leaving fewer than `logit_rows` rows behind). `0` = wait.
/// Decodes beyond the budget wait too; when nothing at all fits (a lone decode larger
/// than the budget), the oldest piece runs whole so work always progresses.
pub fn plan_chunks(pending: &[Pending], budget: usize) -> Vec<usize> {
    let mut out = vec![0; pending.len()];
    let mut left = budget;
    let decodes = pending.iter().enumerate().filter(|(_, p)| p.is_decode());
    for (i, p) in decodes {
        if p.rows <= left {
            out[i] = p.rows;
            left -= p.rows;
        }
    }
    for started in [true, false] {
        for (i, p) in pending.iter().enumerate() {
            if p.is_decode() || p.started != started || left == 0 {
                continue;
            }
            let mut c = p.rows.min(left);
            if c < p.rows && p.rows - c < p.logit_rows {
                c = p.rows - p.logit_rows;
            }
            out[i] = c;
            left -= c;
        }
    }
    if out.iter().all(|&r| r == 0) {
        if let Some(first) = pending.iter().position(|p| p.rows > 0) {
            out[first] = if pending[first].is_decode() {
                pending[first].rows
            } else {
                pending[first]
                    .rows
                    .saturating_sub(pending[first].logit_rows)
                    .max(1)
                    .min(pending[first].rows)
            };
        }
    }
    out
}

/// A linear model of one iteration's wall time, `fixed_s + per_token_s · tokens`, fitted to
/// measured iterations. Sarathi-Serve picks the chunked-prefill token budget from a
/// time-between-tokens SLO this way: every iteration emits one token for each running
/// decode, so an iteration that fits the SLO keeps every gap within it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct IterationCost {
    /// Seconds an iteration costs regardless of its size (weights read, dispatch).
    pub fixed_s: f64,
    /// Seconds each token of the batch adds.
    pub per_token_s: f64,
}

impl IterationCost {
    /// Least-squares fit to `(tokens, seconds)` samples (at least two distinct token
    /// counts). A negative intercept (noise) is clamped to 0; a cost that does not grow
    /// with the tokens is an error (measure larger iterations).
    pub fn fit(samples: &[(usize, f64)]) -> Result<Self> {
        if samples.iter().any(|&(_, t)| !(t.is_finite() && t >= 0.0)) {
            return Err(Error::Invalid(
                "iteration cost samples must be finite, non-negative seconds".into(),
            ));
        }
        let n = samples.len() as f64;
        let mx = samples.iter().map(|&(x, _)| x as f64).sum::<f64>() / n;
        let my = samples.iter().map(|&(_, y)| y).sum::<f64>() / n;
        let sxx: f64 = samples.iter().map(|&(x, _)| (x as f64 - mx).powi(2)).sum();
        let sxy: f64 = samples
            .iter()
            .map(|&(x, y)| (x as f64 - mx) * (y - my))
            .sum();
        if samples.is_empty() || sxx <= 0.0 {
            return Err(Error::Invalid(
                "fitting an iteration cost needs samples of at least two different sizes".into(),
            ));
        }
        let per_token_s = sxy / sxx;
        if per_token_s.is_nan() || per_token_s <= 0.0 {
            return Err(Error::Invalid(format!(
                "the measured iteration time does not grow with its tokens (slope {per_token_s:.3e} s/token); measure larger iterations"
            )));
        }
        Ok(Self {
            fixed_s: (my - per_token_s * mx).max(0.0),
            per_token_s,
        })
    }

    /// Predicted seconds of an iteration of `tokens` tokens.
    pub fn seconds(&self, tokens: usize) -> f64 {
        self.fixed_s + self.per_token_s * tokens as f64
    }

    /// The largest token budget whose iteration is predicted to take at most `slo_s`
    /// seconds. Errors when not even a one-token iteration fits.
    pub fn budget_for(&self, slo_s: f64) -> Result<usize> {
        if !(slo_s.is_finite() && slo_s > 0.0) {
            return Err(Error::Invalid(format!(
                "TBT SLO {slo_s} s must be a positive number"
            )));
        }
        let b = ((slo_s - self.fixed_s) / self.per_token_s).floor();
        if b < 1.0 {
            return Err(Error::Invalid(format!(
                "a TBT SLO of {:.2} ms is below one iteration of a single token ({:.2} ms fixed + {:.3} ms/token): raise the SLO",
                slo_s * 1e3,
                self.fixed_s * 1e3,
                self.per_token_s * 1e3
            )));
        }
        Ok(b.min(usize::MAX as f64 / 2.0) as usize)
    }
}

#[cfg(test)]
mod tests;
