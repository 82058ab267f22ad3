//! A serving loop that drives a real model with the [`Scheduler`]: requests arrive on a
//! wall-clock schedule (a trace replay), every iteration runs the scheduler's batch as one
//! batched forward pass (decodes and prefill chunks of many sequences together, each with
//! its own KV cache), and the time of every generated token is recorded. Used by
//! `flow-node bench batching` to compare chunked prefill with prefill-first batching.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use flow_familial::{FamilialModel, Rows, Seg, SeqCache};

use crate::error::{Error, Result};
use crate::scheduler::{
    attended_pairs, CostSample, IterationCost, Request, Scheduler, SchedulerConfig, SchedulerStats,
    Work,
};

/// One request of a replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayRequest {
    /// Arrival, milliseconds after the replay starts.
    pub arrival_ms: u64,
    pub prompt: Vec<u32>,
    /// Tokens to generate (end-of-sequence is ignored, as in serving benchmarks).
    pub max_new: usize,
}

/// Token timing of one request (seconds after the replay started).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RequestTimes {
    pub arrival: f64,
    pub tokens: Vec<f64>,
    /// The generated token ids.
    pub output: Vec<u32>,
}

impl RequestTimes {
    /// Gaps between consecutive tokens (time-between-tokens).
    pub fn tbt(&self) -> impl Iterator<Item = f64> + '_ {
        self.tokens.windows(2).map(|w| w[1] - w[0])
    }

    /// Time to first token.
    pub fn ttft(&self) -> Option<f64> {
        self.tokens.first().map(|t| t - self.arrival)
    }
}

/// What a replay measured.
#[derive(Debug, Clone, Default)]
pub struct ReplayReport {
    pub requests: Vec<RequestTimes>,
    pub stats: SchedulerStats,
    pub wall_s: f64,
    /// Largest batch (tokens) an iteration ran.
    pub max_batch_tokens: usize,
    /// Wall time of every iteration that ran a batch, seconds, in order.
    pub iteration_s: Vec<f64>,
}

impl ReplayReport {
    /// Output tokens per second of wall time.
    pub fn throughput(&self) -> f64 {
        let n: usize = self.requests.iter().map(|r| r.tokens.len()).sum();
        n as f64 / self.wall_s.max(1e-9)
    }
}

struct Live {
    tokens: Vec<u32>,
    cache: SeqCache,
}

/// Replay `reqs` (sorted by arrival) against `model`, answering at exit `point`, with
/// batches formed by a [`Scheduler`] configured as `cfg`.
pub fn replay(
    model: &FamilialModel,
    point: usize,
    cfg: SchedulerConfig,
    reqs: &[ReplayRequest],
) -> Result<ReplayReport> {
    if reqs.windows(2).any(|w| w[1].arrival_ms < w[0].arrival_ms) {
        return Err(Error::Invalid(
            "replay requests must be sorted by arrival".into(),
        ));
    }
    let mut sched = Scheduler::new(cfg)?;
    let mut live: HashMap<u64, Live> = HashMap::new();
    let mut times: Vec<RequestTimes> = reqs
        .iter()
        .map(|r| RequestTimes {
            arrival: r.arrival_ms as f64 / 1e3,
            ..Default::default()
        })
        .collect();
    let mut report = ReplayReport::default();
    let t0 = Instant::now();
    let mut next = 0usize;
    loop {
        let now = t0.elapsed();
        while next < reqs.len() && Duration::from_millis(reqs[next].arrival_ms) <= now {
            let r = &reqs[next];
            sched.add(Request {
                id: next as u64,
                prompt_len: r.prompt.len(),
                max_new: r.max_new,
            })?;
            live.insert(
                next as u64,
                Live {
                    tokens: r.prompt.clone(),
                    cache: model.new_cache(),
                },
            );
            next += 1;
        }
        if sched.is_idle() {
            if next == reqs.len() {
                break;
            }
            let wait = Duration::from_millis(reqs[next].arrival_ms).saturating_sub(t0.elapsed());
            std::thread::sleep(wait);
            continue;
        }
        let batch = sched.schedule();
        for id in &batch.preempted {
            if let Some(l) = live.get_mut(id) {
                l.cache = model.new_cache();
            }
        }
        if batch.work.is_empty() {
            continue;
        }
        report.max_batch_tokens = report.max_batch_tokens.max(batch.tokens());
        let mut input = Vec::with_capacity(batch.tokens());
        let mut segs = Vec::with_capacity(batch.work.len());
        for w in &batch.work {
            let l = live
                .get(&w.id())
                .ok_or_else(|| Error::Invalid(format!("internal: unknown request {}", w.id())))?;
            let (start, len) = match *w {
                Work::Decode { .. } => (l.tokens.len() - 1, 1),
                Work::Prefill { start, len, .. } => (start, len),
            };
            input.extend_from_slice(&l.tokens[start..start + len]);
            segs.push(Seg::new(start, len));
        }
        let ids: Vec<u64> = batch.work.iter().map(Work::id).collect();
        let mut taken: Vec<Live> = ids
            .iter()
            .map(|id| live.remove(id))
            .collect::<Option<_>>()
            .ok_or_else(|| Error::Invalid("internal: request scheduled twice".into()))?;
        let started = t0.elapsed().as_secs_f64();
        let next_tokens = {
            let mut caches: Vec<&mut SeqCache> = taken.iter_mut().map(|l| &mut l.cache).collect();
            step(model, point, &input, &segs, &mut caches)?
        };
        let at = t0.elapsed().as_secs_f64();
        report.iteration_s.push(at - started);
        for ((w, mut l), tok) in batch.work.iter().zip(taken).zip(next_tokens) {
            let id = w.id();
            if w.emits() {
                l.tokens.push(tok);
                let t = &mut times[id as usize];
                t.tokens.push(at);
                t.output.push(tok);
            }
            if !batch.finished.contains(&id) {
                live.insert(id, l);
            }
        }
    }
    report.wall_s = t0.elapsed().as_secs_f64();
    report.stats = sched.stats();
    report.requests = times;
    Ok(report)
}

/// One batched forward pass: `input` holds the tokens of every segment back to back; returns
/// the greedy next token of each segment.
fn step(
    model: &FamilialModel,
    point: usize,
    input: &[u32],
    segs: &[Seg],
    caches: &mut [&mut SeqCache],
) -> Result<Vec<u32>> {
    let h = model.embed(input)?;
    let h = model.run_layers(&h, 0..point, segs, caches)?;
    let logits = model.exit(&h, point, segs, caches, Rows::Last)?;
    Ok(logits.argmax(1)?.to_vec1()?)
}

/// Measure what an iteration of the serving loop costs on `model` (answering at `point`)
/// and fit an [`IterationCost`] to it: [`time_chunks`] over `contexts` x `sizes`, then
/// [`IterationCost::fit`], so the fit learns both the per-token and the attention cost.
/// Returns the fit and the samples.
pub fn measure_iteration_cost(
    model: &FamilialModel,
    point: usize,
    contexts: &[usize],
    sizes: &[usize],
    reps: usize,
) -> Result<(IterationCost, Vec<CostSample>)> {
    let samples = time_chunks(model, point, contexts, sizes, reps)?;
    Ok((IterationCost::fit(&samples)?, samples))
}

/// Time one iteration per (context depth, chunk size) pair, contexts outermost: a prefill
/// chunk of `size` tokens that follows `context` tokens already in the KV cache (a long
/// prompt's tail chunk attends to all of them; a 1-token chunk is a decode at that
/// depth), `reps` times on a copy of the same cache after one untimed run, keeping the
/// median. The cache has room for the chunk already, so the timing is the steady state,
/// not a buffer regrowth.
pub fn time_chunks(
    model: &FamilialModel,
    point: usize,
    contexts: &[usize],
    sizes: &[usize],
    reps: usize,
) -> Result<Vec<CostSample>> {
    let max_pos = model.config().max_position_embeddings;
    let largest = sizes.iter().copied().max().unwrap_or(0);
    let deepest = contexts.iter().copied().max().unwrap_or(0);
    if sizes.contains(&0) || deepest + largest > max_pos {
        return Err(Error::Invalid(format!(
            "calibration chunks must be positive and context {deepest} + chunk {largest} must fit the model's {max_pos} positions"
        )));
    }
    let tokens: Vec<u32> = (0..deepest + largest)
        .map(|i| 32 + (i * 37 % 95) as u32)
        .collect();
    let mut samples = Vec::with_capacity(sizes.len() * contexts.len());
    for &context in contexts {
        // Prefill context + largest, then forget the tail: the buffers keep their capacity.
        let mut base = model.new_cache();
        if context + largest > 0 {
            step(
                model,
                point,
                &tokens[..context + largest],
                &[Seg::new(0, context + largest)],
                &mut [&mut base],
            )?;
        }
        base.truncate(context);
        for &n in sizes {
            let mut times = Vec::with_capacity(reps.max(1) + 1);
            // One untimed warm-up run first (allocator and kernel buffers of a new size).
            for _ in 0..=reps.max(1) {
                let mut cache = base.fork()?;
                let t = Instant::now();
                step(
                    model,
                    point,
                    &tokens[context..context + n],
                    &[Seg::new(context, n)],
                    &mut [&mut cache],
                )?;
                times.push(t.elapsed().as_secs_f64());
            }
            times.remove(0);
            samples.push(CostSample {
                tokens: n,
                attended: attended_pairs(context, n),
                seconds: quantile(&times, 0.5),
            });
        }
    }
    Ok(samples)
}

/// The `q`-quantile (0..=1, nearest rank) of `xs`.
pub fn quantile(xs: &[f64], q: f64) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let i = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
    v[i]
}
