//! Peak heap measurement for training benchmarks.
//!
//! [`CountingAlloc`] wraps the system allocator and keeps the live heap bytes and their peak
//! in two relaxed atomics. It counts only where a binary installs it
//! (`#[global_allocator] static A: CountingAlloc = CountingAlloc;`, as `flow-node` does);
//! [`counting`] says whether it is. [`PeakScope`] measures the peak above the heap in use
//! when it was started.
//!
//! Counting is off until the first [`enable`] (which [`counting`] and [`PeakScope::start`]
//! call): until then the allocator costs one relaxed load of a flag that is never written,
//! so a serving node pays nothing for the benchmark's instrument (no shared counter
//! bouncing between cores on every allocation). Bytes freed after enabling that were
//! allocated before it only lower the count, so a peak is never over-stated.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicIsize, Ordering};

static ENABLED: AtomicBool = AtomicBool::new(false);
static CURRENT: AtomicIsize = AtomicIsize::new(0);
static PEAK: AtomicIsize = AtomicIsize::new(0);

/// The system allocator, counting live bytes and their peak.
#[derive(Debug, Clone, Copy, Default)]
pub struct CountingAlloc;

/// Start counting (idempotent).
pub fn enable() {
    ENABLED.store(true, Ordering::Relaxed);
}

fn grow(n: usize) {
    if !ENABLED.load(Ordering::Relaxed) {
        return;
    }
    let now = CURRENT.fetch_add(n as isize, Ordering::Relaxed) + n as isize;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

fn shrink(n: usize) {
    if !ENABLED.load(Ordering::Relaxed) {
        return;
    }
    CURRENT.fetch_sub(n as isize, Ordering::Relaxed);
}

// SAFETY: every call forwards to `System` with the caller's layout unchanged; the counters
// are plain atomics and never allocate.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded contract.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grow(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded contract.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grow(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded contract.
        unsafe { System.dealloc(ptr, layout) };
        shrink(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded contract.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size >= layout.size() {
                grow(new_size - layout.size());
            } else {
                shrink(layout.size() - new_size);
            }
        }
        p
    }
}

/// Live heap bytes counted so far (0 if [`CountingAlloc`] is not installed).
pub fn current() -> isize {
    CURRENT.load(Ordering::Relaxed)
}

/// Whether [`CountingAlloc`] is this process's global allocator (starts counting).
pub fn counting() -> bool {
    enable();
    let before = current();
    let v = std::hint::black_box(vec![0u8; 1 << 16]);
    let during = current();
    drop(v);
    during - before >= 1 << 16
}

/// Peak heap growth over a stretch of code. Not meaningful with concurrent measurements.
#[derive(Debug)]
pub struct PeakScope {
    base: isize,
}

impl PeakScope {
    /// Start measuring: resets the global peak to the current heap.
    pub fn start() -> Self {
        enable();
        let base = current();
        PEAK.store(base, Ordering::Relaxed);
        Self { base }
    }

    /// Bytes of the peak above the heap in use at [`PeakScope::start`].
    pub fn peak_bytes(&self) -> usize {
        (PEAK.load(Ordering::Relaxed) - self.base).max(0) as usize
    }
}
