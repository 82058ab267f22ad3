//! A small team of threads that split the quantized matmuls, woken in well under a
//! microsecond because its workers spin between calls.
//!
//! Decode multiplies one activation row by each weight matrix: ~210 products of 15–70 µs
//! per SmolLM2 token, separated by a few µs of norms, RoPE and attention. Handed to rayon,
//! a product wakes a sleeping worker through the kernel (tens of µs on a VM) and the
//! second core added only 1.06× (docs/benchmarks.md, session 14). Like ggml's thread pool,
//! a [`Team`]'s workers poll for the next product for a bounded time ([`DEFAULT_SPIN`],
//! `AIFLOW_TEAM_SPIN_US` overrides it) and only then park on a condition variable, so the
//! CPU is given back between tokens and requests.
//!
//! Work is claimed, not assigned: the calling thread publishes a job, then takes chunks of
//! output rows from a shared counter itself, and a worker that wakes late (or not at all:
//! preempted on a busy machine) only takes what is left. A worker joins a job before it may
//! touch it, and the caller closes the job when its chunks are done and waits only for the
//! workers that joined — never for one still asleep.
//!
//! Entry points: [`Team::new`] and [`Team::install`] (the thread that runs a model); the
//! matmuls find the installed team themselves.

use std::cell::RefCell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::{Error, Result};

/// How long an idle worker polls for the next job before it parks: longer than the gaps
/// inside a token's forward pass (norms, attention: a few µs to tens of µs), far shorter
/// than the gap between tokens of a served request.
pub const DEFAULT_SPIN: Duration = Duration::from_micros(100);

/// `state`: the job generation in the high 32 bits, [`CLOSED`], then how many workers
/// joined the job in the low bits.
const CLOSED: u64 = 1 << 31;
const JOINED: u64 = CLOSED - 1;

fn generation(state: u64) -> u32 {
    (state >> 32) as u32
}

/// A job on the caller's stack; workers see it through [`Inner::job`] only between
/// joining and leaving.
struct Job<'a> {
    run: &'a (dyn Fn() + Sync),
}

struct Inner {
    state: AtomicU64,
    /// Workers that joined the current job and finished it.
    left: AtomicU32,
    job: AtomicPtr<Job<'static>>,
    /// A job is running (a second caller, or a nested call, runs alone instead).
    busy: AtomicBool,
    /// A worker's job panicked; the caller panics too once every worker has left.
    panicked: AtomicBool,
    sleepers: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
    stop: AtomicBool,
    /// Threads that take part in a job, the caller included.
    threads: usize,
    spin: Duration,
}

/// `threads − 1` spinning workers plus the thread that calls [`Team::install`]. Dropping
/// the team stops and joins its workers.
pub struct Team {
    inner: Arc<Inner>,
    workers: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Team {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Team")
            .field("threads", &self.inner.threads)
            .field("spin", &self.inner.spin)
            .finish()
    }
}

thread_local! {
    static CURRENT: RefCell<Option<Arc<Inner>>> = const { RefCell::new(None) };
}

impl Team {
    /// A team of `threads` (at least 1; the installing thread is one of them) whose idle
    /// workers spin for [`DEFAULT_SPIN`] (or `AIFLOW_TEAM_SPIN_US` µs) before parking.
    pub fn new(threads: usize) -> Result<Self> {
        let spin = std::env::var("AIFLOW_TEAM_SPIN_US")
            .ok()
            .and_then(|s| s.parse().ok())
            .map(Duration::from_micros)
            .unwrap_or(DEFAULT_SPIN);
        Self::with_spin(threads, spin)
    }

    /// [`Team::new`] with an explicit polling time (zero: park at once).
    pub fn with_spin(threads: usize, spin: Duration) -> Result<Self> {
        let threads = threads.max(1);
        let inner = Arc::new(Inner {
            state: AtomicU64::new(0),
            left: AtomicU32::new(0),
            job: AtomicPtr::new(std::ptr::null_mut()),
            busy: AtomicBool::new(false),
            panicked: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
            threads,
            spin,
        });
        let mut team = Team {
            inner,
            workers: Vec::with_capacity(threads - 1),
        };
        for i in 1..threads {
            let inner = Arc::clone(&team.inner);
            let handle = std::thread::Builder::new()
                .name(format!("flow-matmul-{i}"))
                .spawn(move || work(&inner))
                .map_err(|e| Error::Quant(format!("cannot start matmul thread {i}: {e}")))?;
            team.workers.push(handle);
        }
        Ok(team)
    }

    /// Threads that take part in a job, the installing one included.
    pub fn threads(&self) -> usize {
        self.inner.threads
    }

    /// Run `f` with this team serving the quantized matmuls that `f` calls on this thread
    /// (the previous team, if any, is restored after).
    pub fn install<R>(&self, f: impl FnOnce() -> R) -> R {
        struct Restore(Option<Arc<Inner>>);
        impl Drop for Restore {
            fn drop(&mut self) {
                let prev = self.0.take();
                CURRENT.with(|c| *c.borrow_mut() = prev);
            }
        }
        let prev = CURRENT.with(|c| c.replace(Some(Arc::clone(&self.inner))));
        let _restore = Restore(prev);
        f()
    }
}

impl Drop for Team {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::SeqCst);
        {
            let _g = self
                .inner
                .lock
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            self.inner.wake.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// Run `f(c)` for every `c` in `0..chunks`: on the installed team where `parallel` and
/// there is one, else in order on this thread.
pub(crate) fn run_chunks(chunks: usize, parallel: bool, f: &(dyn Fn(usize) + Sync)) {
    if !(parallel && chunks > 1 && for_each_chunk(chunks, f)) {
        (0..chunks).for_each(f);
    }
}

/// An output buffer that chunks running on several threads write disjoint pieces of.
pub(crate) struct SharedOut<'a>(*mut f32, usize, std::marker::PhantomData<&'a mut [f32]>);

// SAFETY: `SharedOut` hands out only the pieces its callers promise are disjoint (see
// `piece`), so sharing the pointer between threads is sound.
unsafe impl Sync for SharedOut<'_> {}

impl<'a> SharedOut<'a> {
    /// Share `out` for the duration of the borrow.
    pub(crate) fn new(out: &'a mut [f32]) -> Self {
        SharedOut(out.as_mut_ptr(), out.len(), std::marker::PhantomData)
    }

    /// `out[start..start + len]`.
    ///
    /// # Safety
    /// No other live piece overlaps it.
    #[allow(clippy::mut_from_ref)] // disjoint pieces of a buffer borrowed mutably for 'a
    pub(crate) unsafe fn piece(&self, start: usize, len: usize) -> &'a mut [f32] {
        assert!(start + len <= self.1, "piece {start}+{len} of {}", self.1);
        // SAFETY: in bounds (checked above); exclusive by the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.0.add(start), len) }
    }
}

/// Threads of the team installed on this thread (0 where none is).
pub(crate) fn threads() -> usize {
    CURRENT.with(|c| c.borrow().as_ref().map_or(0, |i| i.threads))
}

/// Split `chunks` pieces of work over the installed team: `f(c)` runs exactly once for
/// every `c` in `0..chunks`, on this thread or a worker. Returns `false` (nothing ran)
/// where no team of two or more threads is installed here or the team is busy; the caller
/// then does the work its own way.
pub(crate) fn for_each_chunk(chunks: usize, f: &(dyn Fn(usize) + Sync)) -> bool {
    CURRENT.with(|c| {
        let cur = c.borrow();
        let Some(inner) = cur.as_deref().filter(|i| i.threads > 1) else {
            return false;
        };
        if inner.busy.swap(true, Ordering::Acquire) {
            return false;
        }
        let next = AtomicUsize::new(0);
        let claim = || loop {
            let c = next.fetch_add(1, Ordering::Relaxed);
            if c >= chunks {
                break;
            }
            f(c);
        };
        inner.run(&claim);
        true
    })
}

impl Inner {
    /// Publish `f`, run it here too, then close the job and wait for every worker that
    /// joined it (also when `f` panics here: the job must outlive their use of it).
    fn run(&self, f: &(dyn Fn() + Sync)) {
        struct Close<'a>(&'a Inner);
        impl Drop for Close<'_> {
            fn drop(&mut self) {
                let inner = self.0;
                let joined = (inner.state.fetch_or(CLOSED, Ordering::AcqRel) & JOINED) as u32;
                let mut i = 0u32;
                while inner.left.load(Ordering::Acquire) < joined {
                    i = i.wrapping_add(1);
                    if i % 256 == 0 {
                        // A joined worker was preempted mid-chunk: let it have the CPU.
                        std::thread::yield_now();
                    } else {
                        std::hint::spin_loop();
                    }
                }
                inner.job.store(std::ptr::null_mut(), Ordering::Relaxed);
                inner.busy.store(false, Ordering::Release);
            }
        }
        self.panicked.store(false, Ordering::Relaxed);
        let job = Job { run: f };
        // SAFETY (of the lifetime erasure): workers dereference `job` only after joining
        // this generation and before adding themselves to `left`; `Close` (which runs even
        // on unwind) closes the generation and waits for every joined worker to leave
        // before this frame, and `job` with it, goes away.
        let ptr = (&job as *const Job<'_>).cast::<Job<'static>>().cast_mut();
        self.job.store(ptr, Ordering::Relaxed);
        self.left.store(0, Ordering::Relaxed);
        let g = generation(self.state.load(Ordering::Relaxed)).wrapping_add(1);
        self.state.store(u64::from(g) << 32, Ordering::SeqCst);
        if self.sleepers.load(Ordering::SeqCst) > 0 {
            let _g = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
            self.wake.notify_all();
        }
        let close = Close(self);
        f();
        drop(close);
        if self.panicked.swap(false, Ordering::Relaxed) {
            panic!("a matmul team worker panicked (see its message above)");
        }
    }

    /// Wait for a generation other than `seen`: poll for `spin`, then park. `None` once
    /// the team stops.
    fn next_job(&self, seen: u32) -> Option<u64> {
        let start = Instant::now();
        let mut i = 0u32;
        loop {
            let s = self.state.load(Ordering::Acquire);
            if generation(s) != seen {
                return Some(s);
            }
            i = i.wrapping_add(1);
            if i % 64 != 0 || start.elapsed() < self.spin {
                if self.stop.load(Ordering::Relaxed) {
                    return None;
                }
                std::hint::spin_loop();
                continue;
            }
            let mut g = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
            self.sleepers.fetch_add(1, Ordering::SeqCst);
            let s = loop {
                let s = self.state.load(Ordering::SeqCst);
                if generation(s) != seen || self.stop.load(Ordering::SeqCst) {
                    break s;
                }
                g = self.wake.wait(g).unwrap_or_else(PoisonError::into_inner);
            };
            self.sleepers.fetch_sub(1, Ordering::SeqCst);
            if self.stop.load(Ordering::SeqCst) {
                return None;
            }
            return Some(s);
        }
    }
}

/// A worker's life: wait for a job, join it unless it is already closed, run it, leave.
fn work(inner: &Inner) {
    let mut seen = generation(inner.state.load(Ordering::Acquire));
    while let Some(mut s) = inner.next_job(seen) {
        seen = generation(s);
        let joined = loop {
            if generation(s) != seen || s & CLOSED != 0 {
                break false;
            }
            match inner
                .state
                .compare_exchange_weak(s, s + 1, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => break true,
                Err(now) => s = now,
            }
        };
        if !joined {
            continue;
        }
        let job = inner.job.load(Ordering::Acquire);
        // SAFETY: this worker joined the open generation whose job `job` points to; the
        // caller keeps it alive until `left` counts this worker (see `Inner::run`).
        let ok =
            !job.is_null() && catch_unwind(AssertUnwindSafe(|| unsafe { ((*job).run)() })).is_ok();
        if !ok {
            inner.panicked.store(true, Ordering::Relaxed);
        }
        inner.left.fetch_add(1, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_chunk_runs_exactly_once_across_many_jobs() {
        for spin in [Duration::ZERO, Duration::from_micros(50)] {
            let team = Team::with_spin(3, spin).unwrap();
            team.install(|| {
                for job in 0..2000usize {
                    let chunks = 1 + job % 17;
                    let hits: Vec<AtomicUsize> = (0..chunks).map(|_| AtomicUsize::new(0)).collect();
                    assert!(for_each_chunk(chunks, &|c| {
                        hits[c].fetch_add(1, Ordering::Relaxed);
                    }));
                    assert!(
                        hits.iter().all(|h| h.load(Ordering::Relaxed) == 1),
                        "job {job}"
                    );
                }
            });
        }
    }

    #[test]
    fn workers_share_the_work() {
        let team = Team::with_spin(2, Duration::from_millis(5)).unwrap();
        let here = std::thread::current().id();
        let elsewhere = AtomicUsize::new(0);
        team.install(|| {
            for _ in 0..200 {
                for_each_chunk(64, &|_| {
                    std::thread::sleep(Duration::from_micros(20));
                    if std::thread::current().id() != here {
                        elsewhere.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
        });
        assert!(
            elsewhere.load(Ordering::Relaxed) > 0,
            "the worker never took a chunk"
        );
    }

    #[test]
    fn no_team_one_thread_or_nested_runs_nothing() {
        assert!(!for_each_chunk(4, &|_| {}));
        let solo = Team::new(1).unwrap();
        assert!(!solo.install(|| for_each_chunk(4, &|_| {})));
        let team = Team::new(2).unwrap();
        team.install(|| {
            let nested = AtomicBool::new(true);
            assert!(for_each_chunk(2, &|_| {
                if for_each_chunk(2, &|_| {}) {
                    nested.store(false, Ordering::Relaxed);
                }
            }));
            assert!(
                nested.load(Ordering::Relaxed),
                "a nested call must not re-enter the team"
            );
        });
        // Uninstalled again: nothing is served outside `install`.
        assert!(!for_each_chunk(4, &|_| {}));
    }

    #[test]
    fn a_panicking_chunk_reaches_the_caller_and_the_team_still_works() {
        let team = Team::with_spin(2, Duration::ZERO).unwrap();
        team.install(|| {
            let r = catch_unwind(AssertUnwindSafe(|| {
                for_each_chunk(8, &|c| assert!(c != 5, "chunk five"));
            }));
            assert!(r.is_err());
            let n = AtomicUsize::new(0);
            assert!(for_each_chunk(8, &|_| {
                n.fetch_add(1, Ordering::Relaxed);
            }));
            assert_eq!(n.load(Ordering::Relaxed), 8);
        });
    }

    #[test]
    fn parked_workers_wake_for_the_next_job_and_stop_on_drop() {
        let team = Team::with_spin(3, Duration::ZERO).unwrap();
        std::thread::sleep(Duration::from_millis(20)); // every worker parks
        let n = AtomicUsize::new(0);
        team.install(|| {
            for _ in 0..50 {
                assert!(for_each_chunk(3, &|_| {
                    std::thread::sleep(Duration::from_micros(200));
                    n.fetch_add(1, Ordering::Relaxed);
                }));
                std::thread::sleep(Duration::from_micros(300));
            }
        });
        assert_eq!(n.load(Ordering::Relaxed), 150);
        drop(team); // joins: a hang here fails the test by timeout
    }
}
