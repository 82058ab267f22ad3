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
//! With a [`TimeLimit`] (an [`IterationCost`] model and a time-between-tokens SLO) the
//! chunks of steps 2-3 are also cut so the iteration's *predicted time* stays within the
//! SLO. The model counts attention: a chunk deep into a long prompt attends to every
//! cached position before it, so it gets fewer tokens than one at the prompt's start, and
//! every iteration (hence every decode's gap) stays near the SLO instead of a fixed token
//! count costing more and more as the context grows. When the decodes alone use the whole
//! SLO, the oldest prefill still advances by one token, so prefills never starve.
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
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SchedulerConfig {
    /// Most tokens one iteration processes (decodes count one each). Also caps the number
    /// of running requests, so every decode always fits.
    pub token_budget: usize,
    /// KV memory in tokens across all running requests.
    pub kv_capacity: usize,
    pub policy: Policy,
    /// [`Policy::Chunked`] only: also cut prefill chunks so each iteration's predicted time
    /// fits an SLO (`None`: the token budget alone).
    pub time_limit: Option<TimeLimit>,
}

/// A per-iteration time limit: prefill chunks are cut so that `cost` predicts at most
/// `slo_s` seconds for the iteration (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TimeLimit {
    pub cost: IterationCost,
    /// Time-between-tokens SLO, seconds.
    pub slo_s: f64,
}

/// (query, key) pairs the causal attention of a prefill chunk of `len` tokens after `start`
/// cached positions computes: each of its tokens attends to the cache and to the chunk up
/// to itself. A decode at context `c` is `attended_pairs(c, 1)`.
pub fn attended_pairs(start: usize, len: usize) -> usize {
    len * start + len * (len + 1) / 2
}

/// What an iteration being formed has used so far, checked against its [`TimeLimit`].
#[derive(Debug, Clone, Copy)]
struct Meter {
    limit: Option<TimeLimit>,
    tokens: usize,
    attended: usize,
    /// Prefill chunks placed so far.
    chunks: usize,
}

impl Meter {
    fn new(limit: Option<TimeLimit>) -> Self {
        Self {
            limit,
            tokens: 0,
            attended: 0,
            chunks: 0,
        }
    }

    fn add(&mut self, start: usize, len: usize) {
        self.tokens += len;
        self.attended += attended_pairs(start, len);
    }

    /// Count a prefill chunk placed in the iteration.
    fn add_chunk(&mut self, start: usize, len: usize) {
        self.add(start, len);
        self.chunks += 1;
    }

    /// How many of `want` prompt tokens starting at position `start` fit the time limit
    /// (all of them without one). The first chunk of an iteration always gets at least one
    /// token, so prefills advance even when the decodes alone fill the SLO.
    fn fit(&self, start: usize, want: usize) -> usize {
        let Some(l) = self.limit else {
            return want;
        };
        let fits = |n: usize| {
            l.cost
                .seconds(self.tokens + n, self.attended + attended_pairs(start, n))
                <= l.slo_s
        };
        // The predicted time grows with n: binary search the largest n that fits.
        let (mut lo, mut hi) = (0usize, want);
        while lo < hi {
            let mid = lo + (hi - lo).div_ceil(2);
            if fits(mid) {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        if lo == 0 && self.chunks == 0 {
            want.min(1)
        } else {
            lo
        }
    }
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
        let mut meter = Meter::new(self.cfg.time_limit);
        for s in self.running.iter_mut().filter(|s| s.decoding()) {
            if left == 0 {
                break; // unreachable: running.len() <= token_budget
            }
            batch.work.push(Work::Decode { id: s.req.id });
            meter.add(s.kv, 1);
            s.kv += 1;
            s.generated += 1;
            left -= 1;
        }
        for s in self.running.iter_mut().filter(|s| !s.decoding()) {
            let len = meter.fit(s.prefilled, (s.target - s.prefilled).min(left));
            if len == 0 {
                break;
            }
            meter.add_chunk(s.prefilled, len);
            batch.work.push(prefill(s, len));
            left -= len;
        }
        self.admit(batch, &mut left, Some(&mut meter));
    }

    fn schedule_prefill_first(&mut self, batch: &mut Batch) {
        let mut left = self.cfg.token_budget;
        let had_decodes = self.running.iter().any(Seq::decoding);
        self.admit(batch, &mut left, None);
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

    /// Admit waiting requests FCFS. With a `meter` (chunked) a prompt may be split to fit
    /// the budget and time left; without, whole prompts only (the first always goes, even
    /// if larger than the budget).
    fn admit(&mut self, batch: &mut Batch, left: &mut usize, mut meter: Option<&mut Meter>) {
        while let Some(head) = self.waiting.front() {
            let free = self.cfg.kv_capacity.saturating_sub(self.kv_used());
            let first = batch.work.iter().all(|w| matches!(w, Work::Decode { .. }));
            let len = match meter.as_deref() {
                Some(m) => m.fit(0, head.target.min(*left)),
                None if head.target <= *left || first => head.target,
                None => 0,
            };
            // Reserve the context and one decode token so admission itself never preempts.
            if len == 0 || head.target + 1 > free || self.running.len() >= self.cfg.token_budget {
                return;
            }
            let Some(mut s) = self.waiting.pop_front() else {
                return;
            };
            s.kv = s.target;
            if let Some(m) = meter.as_deref_mut() {
                m.add_chunk(0, len);
            }
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

/// One measured iteration, for [`IterationCost::fit`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CostSample {
    /// Tokens in the iteration.
    pub tokens: usize,
    /// Attention (query, key) pairs it computed ([`attended_pairs`]).
    pub attended: usize,
    /// Wall time, seconds.
    pub seconds: f64,
}

/// A linear model of one iteration's wall time, `fixed_s + per_token_s · tokens +
/// per_attended_s · attended pairs`, fitted to measured iterations. Sarathi-Serve picks
/// the chunked-prefill token budget from a time-between-tokens SLO this way: every
/// iteration emits one token for each running decode, so an iteration that fits the SLO
/// keeps every gap within it. The attention term is what makes a chunk deep into a long
/// prompt dearer than the same number of tokens at its start (on a CPU core a token
/// attending to 2000 cached positions costs about twice one at the start, for a
/// 384-wide model).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct IterationCost {
    /// Seconds an iteration costs regardless of its size (weights read, dispatch).
    pub fixed_s: f64,
    /// Seconds each token of the batch adds (projections and FFN).
    pub per_token_s: f64,
    /// Seconds each attention (query, key) pair adds.
    pub per_attended_s: f64,
}

impl IterationCost {
    /// Least-squares fit to measured iterations (at least two distinct token counts). The
    /// attention term is fitted when the samples vary it independently of the tokens (chunks
    /// at several context depths), else left at 0. A negative intercept or attention cost
    /// (noise) is clamped to 0 and the rest refitted; a cost that does not grow with the
    /// tokens is an error (measure larger iterations).
    pub fn fit(samples: &[CostSample]) -> Result<Self> {
        if samples
            .iter()
            .any(|s| !(s.seconds.is_finite() && s.seconds >= 0.0))
        {
            return Err(Error::Invalid(
                "iteration cost samples must be finite, non-negative seconds".into(),
            ));
        }
        let x = |s: &CostSample| [s.tokens as f64, s.attended as f64];
        let mut coef = least_squares(samples, |s| vec![1.0, x(s)[0], x(s)[1]]);
        if !matches!(coef.as_deref(), Some(&[_, _, a]) if a >= 0.0) {
            coef = least_squares(samples, |s| vec![1.0, x(s)[0]]).map(|c| vec![c[0], c[1], 0.0]);
        }
        let Some(mut c) = coef else {
            return Err(Error::Invalid(
                "fitting an iteration cost needs samples of at least two different sizes".into(),
            ));
        };
        if c[0] < 0.0 {
            // Through the origin: refit the slopes with no intercept.
            c = match least_squares(samples, |s| x(s).to_vec()) {
                Some(v) if v[1] >= 0.0 => vec![0.0, v[0], v[1]],
                _ => least_squares(samples, |s| vec![x(s)[0]])
                    .map_or(vec![0.0, f64::NAN, 0.0], |v| vec![0.0, v[0], 0.0]),
            };
        }
        let per_token_s = c[1];
        if per_token_s.is_nan() || per_token_s <= 0.0 {
            return Err(Error::Invalid(format!(
                "the measured iteration time does not grow with its tokens (slope {per_token_s:.3e} s/token); measure larger iterations"
            )));
        }
        Ok(Self {
            fixed_s: c[0],
            per_token_s,
            per_attended_s: c[2],
        })
    }

    /// Predicted seconds of an iteration of `tokens` tokens computing `attended` attention
    /// pairs.
    pub fn seconds(&self, tokens: usize, attended: usize) -> f64 {
        self.fixed_s + self.per_token_s * tokens as f64 + self.per_attended_s * attended as f64
    }

    /// The largest single prefill chunk after `context` cached tokens whose iteration is
    /// predicted to take at most `slo_s` seconds (with `context` 0: the most tokens any
    /// iteration can hold within the SLO). Errors when not even one token fits.
    pub fn budget_for(&self, slo_s: f64, context: usize) -> Result<usize> {
        if !(slo_s.is_finite() && slo_s > 0.0) {
            return Err(Error::Invalid(format!(
                "TBT SLO {slo_s} s must be a positive number"
            )));
        }
        let cost = |n: usize| self.seconds(n, attended_pairs(context, n));
        if cost(1) > slo_s {
            return Err(Error::Invalid(format!(
                "a TBT SLO of {:.2} ms is below one iteration of a single token ({:.2} ms fixed + {:.3} ms/token + {:.2e} ms/attended pair at context {context}): raise the SLO",
                slo_s * 1e3,
                self.fixed_s * 1e3,
                self.per_token_s * 1e3,
                self.per_attended_s * 1e3,
            )));
        }
        // Grow then bisect: the cost is increasing in n.
        let (mut lo, mut hi) = (1usize, 2usize);
        while cost(hi) <= slo_s {
            lo = hi;
            if hi > usize::MAX / 4 {
                return Ok(hi);
            }
            hi *= 2;
        }
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if cost(mid) <= slo_s {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        Ok(lo)
    }
}

/// Ordinary least squares of `seconds` on the regressors `row(sample)`; `None` when the
/// normal equations are singular (a regressor that does not vary independently).
fn least_squares(
    samples: &[CostSample],
    row: impl Fn(&CostSample) -> Vec<f64>,
) -> Option<Vec<f64>> {
    let k = samples.first().map(|s| row(s).len())?;
    // Normal equations A c = b, A = XᵀX, b = Xᵀy; scaled columns keep them well conditioned.
    let scale: Vec<f64> = (0..k)
        .map(|j| {
            samples
                .iter()
                .map(|s| row(s)[j].abs())
                .fold(0.0, f64::max)
                .max(f64::MIN_POSITIVE)
        })
        .collect();
    let mut a = vec![vec![0.0; k + 1]; k];
    for s in samples {
        let r: Vec<f64> = row(s).iter().zip(&scale).map(|(v, c)| v / c).collect();
        for i in 0..k {
            for j in 0..k {
                a[i][j] += r[i] * r[j];
            }
            a[i][k] += r[i] * s.seconds;
        }
    }
    // Gauss-Jordan with partial pivoting.
    for col in 0..k {
        let piv = (col..k).max_by(|&x, &y| a[x][col].abs().total_cmp(&a[y][col].abs()))?;
        if a[piv][col].abs() < 1e-9 * samples.len() as f64 {
            return None;
        }
        a.swap(col, piv);
        let pivot = a[col].clone();
        for (r, row) in a.iter_mut().enumerate() {
            if r != col {
                let f = row[col] / pivot[col];
                for (x, p) in row.iter_mut().zip(&pivot).skip(col) {
                    *x -= f * p;
                }
            }
        }
    }
    Some((0..k).map(|i| a[i][k] / a[i][i] / scale[i]).collect())
}

#[cfg(test)]
mod tests;
