//! The engine: one thread that owns this node's part of the family and every session's KV
//! cache, fed through a bounded queue. Each loop iteration drains the queue and runs all
//! ready steps of different sessions as **one batch** (continuous batching of decode steps
//! and prefill chunks across sessions); backfills and truncations run in the same loop.
//! Batches are formed by `flow_moe::scheduler::plan_chunks` under the token budget
//! [`EngineConfig::max_batch_tokens`]: decodes first, then prefill chunks (a prompt longer
//! than what is left of the budget is split across iterations and answered when its last
//! chunk has run).
//!
//! A [`Stage`] is what a tier computes: trunk layers `[a, b)` and, optionally, the exit at
//! point `b` (Ruyi semantics: the exit reads the state after layers `[0, b)`, which is also
//! the state shipped upward). The entry stage (`a == 0`) takes token ids.
//!
//! Moving the split: the engine's stage is what the node has *loaded*; a job may run a
//! sub-range of it ([`StepJob::stage`]: `a..b` within the loaded layers, with the exit at
//! `b` when that exit is loaded). One batch only carries jobs of the same sub-range, so
//! sessions cut at different layers share an engine and each stays exact; a session's KV
//! only grows for the layers it runs. A sub-range outside what is loaded is refused.
//!
//! Fast path ([`EngineConfig::inline_max_rows`]): a small step (a decode step of one
//! session) that finds the engine idle — nothing queued, nothing pending, no batch running —
//! runs on the caller's thread instead of waking the engine thread and being woken back,
//! which saves two cross-thread wake-ups per step (on loopback the larger part of a hop's
//! cost). Everything else still goes through the queue and is batched; both paths run the
//! same batch code, so results are identical. An inline step still yields to the
//! scheduler, so concurrent sessions on the same IO thread interleave step by step.
//! [`EngineStats`] counts both paths and the hand-off times of queued steps (enqueue →
//! batch start, answer → caller resumed).
//!
//! Threads ([`EngineConfig::threads`]): the engine thread runs inside a rayon pool of that
//! many threads (candle's own kernels) and with a `flow_familial::quant::Team` of as many
//! (the quantized matmuls, which are most of the time): the team's workers poll between
//! products instead of sleeping, which is what makes a second core pay in decode.
//!
//! MoE expert pruning ([`EngineHandle::spawn_pruned`], the cloud role's `--moe-patterns`):
//! each session gets a task pattern on its first step (signature at the first hosted MoE
//! layer from its prompt's states, see `flow_moe::cloud`); one batch only carries sessions
//! of one pattern, and that pattern's experts are made resident before it runs.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};

use candle_core::Tensor;
use flow_familial::{FamilialModel, SeqCache};
use tokio::sync::{mpsc, oneshot};

use flow_moe::cloud::{PrunedServing, ServingStats};

use crate::error::{NodeError, Result};

mod batch;
mod pend;
use batch::{run, Engine};
use pend::{job_rows, Pend};

/// The engine's clock is the OS's: the engine thread is not a tokio thread, and it times
/// compute and the hand-offs between the callers' threads and its own.
#[allow(clippy::disallowed_types)]
type OsInstant = std::time::Instant;

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
#[derive(Debug, Clone)]
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
    /// Whether this step runs the exit block (keeps its KV). False while the session
    /// passes every step past this exit; the trunk backfill then skips the block too.
    pub exit_kv: bool,
    /// States after layer `b` for positions `s..` that the exit block has not seen (it was
    /// skipped while the session escalated): run through the exit block alone, before
    /// the backfill and the step, so that its KV holds every position again. Only with
    /// `exit_kv`.
    pub exit_backfill: Option<(usize, Tensor)>,
    /// Layers (and exit) this job runs, within the loaded stage; `None` = the whole
    /// loaded stage. A session must use the same sub-range for all its steps (its KV
    /// holds exactly those layers).
    pub stage: Option<Stage>,
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

/// A step's answer with its hand-off timing.
struct Answer {
    out: Result<StepOut>,
    /// Enqueue → start of the batch that ran the step's first rows.
    queue_us: u64,
    /// When the engine sent the answer.
    at: OsInstant,
}

enum Job {
    /// The step, where to answer, and when it was enqueued.
    Step(StepJob, oneshot::Sender<Answer>, OsInstant),
    Truncate(u64, usize),
    Close(u64),
    Stats(oneshot::Sender<EngineStats>),
}

/// A snapshot of the engine's state.
#[derive(Debug, Clone, Default)]
pub struct EngineStats {
    pub sessions: usize,
    pub kv_bytes: usize,
    /// The KV memory budget `kv_bytes` is held under (`EngineConfig::kv_budget_bytes`).
    pub kv_budget_bytes: usize,
    pub batches: u64,
    pub batched_steps: u64,
    pub evictions: u64,
    pub queue_depth: usize,
    /// Prefill chunks that left part of their step for a later iteration (chunked prefill).
    pub partial_chunks: u64,
    /// Steps run on the caller's thread (idle engine, small step; see the module docs).
    pub inline_steps: u64,
    /// Steps that went through the queue to the engine thread.
    pub queued_steps: u64,
    /// Sum over queued steps of enqueue → batch start (µs): the wake-up of the engine
    /// thread plus any wait behind other work.
    pub queue_wait_us: u64,
    /// Sum over queued steps of answer sent → caller resumed (µs): the wake-up back.
    pub wake_back_us: u64,
    /// Sum over all steps of the compute time of their batches (µs).
    pub step_compute_us: u64,
    /// MoE expert pruning counters (resident expert memory, retrievals), when enabled.
    pub moe: Option<ServingStats>,
}

/// Hand-off counters, updated by the callers of [`EngineHandle::step`].
#[derive(Debug, Default)]
struct Handoffs {
    inline_steps: AtomicU64,
    queued_steps: AtomicU64,
    queue_wait_us: AtomicU64,
    wake_back_us: AtomicU64,
    step_compute_us: AtomicU64,
}

impl Handoffs {
    fn record(&self, inline: bool, out: &Result<StepOut>, queue_us: u64, wake_us: u64) {
        let n = if inline {
            &self.inline_steps
        } else {
            self.queue_wait_us.fetch_add(queue_us, Ordering::Relaxed);
            self.wake_back_us.fetch_add(wake_us, Ordering::Relaxed);
            &self.queued_steps
        };
        n.fetch_add(1, Ordering::Relaxed);
        if let Ok(o) = out {
            self.step_compute_us
                .fetch_add(o.compute_us, Ordering::Relaxed);
        }
    }

    fn fill(&self, s: &mut EngineStats) {
        s.inline_steps = self.inline_steps.load(Ordering::Relaxed);
        s.queued_steps = self.queued_steps.load(Ordering::Relaxed);
        s.queue_wait_us = self.queue_wait_us.load(Ordering::Relaxed);
        s.wake_back_us = self.wake_back_us.load(Ordering::Relaxed);
        s.step_compute_us = self.step_compute_us.load(Ordering::Relaxed);
    }
}

/// The engine's state, shared by the engine thread and the inline fast path.
struct Core {
    engine: Engine,
    pending: Vec<Pend>,
}

struct Shared {
    core: Mutex<Core>,
    /// Jobs sent to the queue and not yet accepted by the engine thread (accepting
    /// happens under the `core` lock), so an inline step never overtakes an earlier
    /// truncate/close/step of the same caller.
    queued: AtomicUsize,
    handoffs: Handoffs,
    /// Compute time of the last small step (µs; `u64::MAX` until one has run through the
    /// queue): the fast path is skipped while it exceeds [`INLINE_MAX_COMPUTE_US`], so a
    /// large model never blocks its callers' (IO) threads for long — not even once.
    small_step_us: AtomicU64,
    /// Holders (or, for the engine thread, soon-to-be holders) of `core` that run or may
    /// run a batch. A fast-path caller that finds the lock taken waits for it only when
    /// this is 0 (the holder is only doing bookkeeping, e.g. the engine thread just
    /// answered a step and is about to park); the engine thread counts itself before it
    /// locks, so a caller never waits behind a batch it could not see coming.
    busy: AtomicUsize,
}

/// Longest compute a fast-path step may take on the caller's thread (µs).
pub const INLINE_MAX_COMPUTE_US: u64 = 2_000;

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("queued", &self.queued)
            .finish_non_exhaustive()
    }
}

impl Shared {
    /// The state, also after a panic elsewhere left the lock poisoned (every method of
    /// `Engine` leaves it consistent between batches).
    fn lock(&self) -> MutexGuard<'_, Core> {
        self.core.lock().unwrap_or_else(|e| e.into_inner())
    }
}

struct SessionKv {
    cache: SeqCache,
    last_used: u64,
}

/// Handle to the engine thread. Cheap to clone.
#[derive(Clone, Debug)]
pub struct EngineHandle {
    tx: mpsc::Sender<Job>,
    shared: Arc<Shared>,
    /// Largest step (rows incl. backfill) that may run inline; 0 = never.
    inline_max_rows: usize,
    stage: Stage,
    hidden_size: usize,
    vocab: usize,
}

/// Engine limits.
#[derive(Debug, Clone, Copy)]
pub struct EngineConfig {
    /// Queue slots; senders wait when it is full (backpressure, never unbounded growth).
    pub queue: usize,
    /// Token budget of one iteration (chunked prefill, see `flow_moe::scheduler`): every
    /// pending decode first, then chunks of prefills already under way, then new steps in
    /// arrival order, each prefill split to fit what is left; a long prompt never holds up
    /// the decodes of other sessions for more than one iteration.
    pub max_batch_tokens: usize,
    /// KV memory budget across sessions; the least recently used session is evicted (and
    /// its next step fails with a clear error) when a step would exceed it.
    pub kv_budget_bytes: usize,
    /// Threads for model compute. The engine loop runs inside its own rayon pool of this
    /// size: candle's kernels dispatch to rayon, and calling them from a thread outside a
    /// pool costs a hand-off per op (measured: ~20% of decode time).
    pub threads: usize,
    /// Steps of at most this many rows (backfill included) run on the caller's thread
    /// when the engine is idle, skipping two thread wake-ups (see the module docs); 0
    /// turns the fast path off. Only used with `threads == 1` (a multi-threaded engine
    /// computes in its own pool). The caller's thread is blocked for the step's compute,
    /// so keep it to decode-sized steps; the fast path also pauses while small steps take
    /// longer than [`INLINE_MAX_COMPUTE_US`].
    pub inline_max_rows: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            queue: 256,
            max_batch_tokens: 4096,
            kv_budget_bytes: 512 << 20,
            threads: 1,
            inline_max_rows: 8,
        }
    }
}

impl EngineHandle {
    /// Start the engine thread for `model` computing `stage`.
    pub fn spawn(model: FamilialModel, stage: Stage, cfg: EngineConfig) -> Result<Self> {
        Self::spawn_pruned(model, stage, cfg, None)
    }

    /// [`EngineHandle::spawn`] with MoE expert pruning: `model` is loaded without experts
    /// and `moe` pages in each session's task experts (see the module docs).
    pub fn spawn_pruned(
        model: FamilialModel,
        stage: Stage,
        cfg: EngineConfig,
        moe: Option<PrunedServing>,
    ) -> Result<Self> {
        let hidden_size = model.config().hidden_size;
        let vocab = model.config().vocab_size;
        let pruned = moe.is_some();
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
        let shared = Arc::new(Shared {
            core: Mutex::new(Core {
                engine: {
                    let mut e = Engine::new(model, stage, cfg);
                    e.moe = moe;
                    e
                },
                pending: Vec::new(),
            }),
            queued: AtomicUsize::new(0),
            handoffs: Handoffs::default(),
            small_step_us: AtomicU64::new(u64::MAX),
            busy: AtomicUsize::new(0),
        });
        // The quantized matmuls split over a team of spinning threads: a rayon worker
        // sleeps between decode's 15–70 µs products and waking it cost most of the
        // second core's gain (flow_familial::quant::Team; docs/benchmarks.md).
        let team = flow_familial::quant::Team::new(cfg.threads.max(1))
            .map_err(|e| NodeError::Internal(format!("cannot start the engine's team: {e}")))?;
        let sh = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("flow-engine".into())
            .spawn(move || pool.install(move || team.install(|| run(&sh, rx))))
            .map_err(|e| NodeError::Internal(format!("cannot start the engine thread: {e}")))?;
        Ok(Self {
            tx,
            shared,
            // MoE pruning assigns patterns and pages experts in on the engine thread.
            inline_max_rows: if cfg.threads <= 1 && !pruned {
                cfg.inline_max_rows
            } else {
                0
            },
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
        let t0 = OsInstant::now();
        let rows = job_rows(&job).saturating_add(
            job.backfill
                .as_ref()
                .map_or(0, |(_, h)| h.dim(0).unwrap_or(usize::MAX)),
        );
        let small = rows <= self.inline_max_rows;
        let job = match self.try_inline(job, rows) {
            Ok(out) => {
                self.observe(small, &out);
                self.shared.handoffs.record(true, &out, 0, 0);
                // A step stays a scheduling point: without this, a generation whose steps
                // all run inline would never yield and hold its IO thread (and starve
                // other sessions' tasks on it) for the whole request.
                tokio::task::yield_now().await;
                return out;
            }
            Err(job) => job,
        };
        let (tx, rx) = oneshot::channel();
        self.send(Job::Step(job, tx, t0))
            .await
            .map_err(|_| NodeError::Internal("the engine thread has stopped".into()))?;
        let a = rx
            .await
            .map_err(|_| NodeError::Internal("the engine dropped a step".into()))?;
        let wake_us = a.at.elapsed().as_micros() as u64;
        self.observe(small, &a.out);
        self.shared
            .handoffs
            .record(false, &a.out, a.queue_us, wake_us);
        a.out
    }

    fn observe(&self, small: bool, out: &Result<StepOut>) {
        if let (true, Ok(o)) = (small, out) {
            self.shared
                .small_step_us
                .store(o.compute_us, Ordering::Relaxed);
        }
    }

    /// The fast path: run `job` here if it is small and the engine is idle; otherwise
    /// hand it back for the queue.
    fn try_inline(
        &self,
        job: StepJob,
        rows: usize,
    ) -> std::result::Result<Result<StepOut>, StepJob> {
        if rows == 0
            || rows > self.inline_max_rows
            || self.shared.small_step_us.load(Ordering::Relaxed) > INLINE_MAX_COMPUTE_US
            || !inline_thread_ready()
        {
            return Err(job);
        }
        let Some(mut core) = self.lock_if_idle() else {
            return Err(job);
        };
        let (tx, mut rx) = oneshot::channel();
        let Core { engine, pending } = &mut *core;
        pending.push(Pend::new(job, tx, OsInstant::now()));
        self.shared.busy.fetch_add(1, Ordering::AcqRel);
        // A step within the token budget completes in one iteration; the bound only
        // guards against a plan that makes no progress.
        for _ in 0..=rows {
            if pending.is_empty() {
                break;
            }
            engine.iterate(pending);
        }
        for p in pending.iter_mut() {
            p.fail(NodeError::Internal(
                "an inline step did not complete".into(),
            ));
        }
        pending.clear();
        self.shared.busy.fetch_sub(1, Ordering::AcqRel);
        drop(core);
        Ok(match rx.try_recv() {
            Ok(a) => a.out,
            Err(_) => Err(NodeError::Internal("the engine dropped a step".into())),
        })
    }

    /// The engine's state if it is idle — nothing queued or waiting, no batch running —
    /// without waiting behind a batch (only behind the engine thread's bookkeeping).
    fn lock_if_idle(&self) -> Option<MutexGuard<'_, Core>> {
        if self.shared.queued.load(Ordering::Acquire) > 0 {
            return None;
        }
        let core = match self.shared.core.try_lock() {
            Ok(g) => g,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) if self.shared.busy.load(Ordering::Acquire) > 0 => {
                return None
            }
            Err(TryLockError::WouldBlock) => self.shared.lock(),
        };
        // Under the lock: nothing accepted and waiting, nothing sent and not yet accepted.
        (core.pending.is_empty() && self.shared.queued.load(Ordering::Acquire) == 0).then_some(core)
    }

    /// Apply a truncate/close right here when the engine is idle (no wake-up of the
    /// engine thread); otherwise queue it behind what is already queued.
    async fn apply_or_send(&self, job: Job) {
        if let Some(job) = self.try_apply(job) {
            let _ = self.send(job).await;
        }
    }

    /// `job` applied here when the engine is idle (`None`), or handed back.
    fn try_apply(&self, job: Job) -> Option<Job> {
        let Some(mut core) = self.lock_if_idle() else {
            return Some(job);
        };
        let Core { engine, pending } = &mut *core;
        engine.accept(job, pending);
        None
    }

    /// Whether the engine is idle: nothing queued, no batch running (a small step now
    /// would take the fast path).
    pub fn idle(&self) -> bool {
        self.shared.queued.load(Ordering::Acquire) == 0
            && self.shared.busy.load(Ordering::Acquire) == 0
    }

    /// Queue `job`, counting it until the engine thread has accepted it.
    async fn send(&self, job: Job) -> std::result::Result<(), ()> {
        self.shared.queued.fetch_add(1, Ordering::AcqRel);
        if self.tx.send(job).await.is_err() {
            self.shared.queued.fetch_sub(1, Ordering::AcqRel);
            return Err(());
        }
        Ok(())
    }

    /// Forget positions `len..` of `session` (speculative rollback).
    pub async fn truncate(&self, session: u64, len: usize) {
        self.apply_or_send(Job::Truncate(session, len)).await;
    }

    /// Free `session`'s KV.
    pub async fn close(&self, session: u64) {
        self.apply_or_send(Job::Close(session)).await;
    }

    /// Free `session`'s KV without waiting (from `Drop`); skipped if the queue is full,
    /// in which case LRU eviction reclaims it later.
    pub fn close_now(&self, session: u64) {
        self.shared.queued.fetch_add(1, Ordering::AcqRel);
        if self.tx.try_send(Job::Close(session)).is_err() {
            self.shared.queued.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Current statistics.
    pub async fn stats(&self) -> EngineStats {
        let (tx, rx) = oneshot::channel();
        if self.send(Job::Stats(tx)).await.is_err() {
            return EngineStats::default();
        }
        let mut s = rx.await.unwrap_or_default();
        s.queue_depth = self.tx.max_capacity() - self.tx.capacity();
        self.shared.handoffs.fill(&mut s);
        s
    }
}

thread_local! {
    /// Whether this thread may compute fast-path steps (decided on first use).
    static INLINE_READY: RefCell<Option<bool>> = const { RefCell::new(None) };
    /// The one-thread rayon pool whose only worker is this thread, kept alive with it.
    static INLINE_POOL: RefCell<Option<rayon::ThreadPool>> = const { RefCell::new(None) };
}

/// Whether this thread can compute a fast-path step inline: it is (or now becomes) the
/// only worker of a one-thread rayon pool, so candle's kernels (which dispatch to the
/// current rayon pool) run right here instead of handing every op to the global pool. A
/// thread already in a larger pool cannot.
fn inline_thread_ready() -> bool {
    INLINE_READY.with(|ready| {
        *ready.borrow_mut().get_or_insert_with(|| {
            if rayon::current_thread_index().is_some() {
                return rayon::current_num_threads() == 1;
            }
            match rayon::ThreadPoolBuilder::new()
                .num_threads(1)
                .use_current_thread()
                .build()
            {
                Ok(pool) => {
                    INLINE_POOL.with(|h| *h.borrow_mut() = Some(pool));
                    true
                }
                Err(e) => {
                    tracing::debug!(error = %e, "no inline engine steps on this thread");
                    false
                }
            }
        })
    })
}

#[cfg(test)]
mod tests;
