//! Admission control at the entry node: at most `max_running` choices generate at once;
//! up to `max_waiting` further requests queue (FIFO, tokio's fair semaphore) and the rest
//! are refused at once with 429 and `Retry-After` — a request is either refused before any
//! work or served to the end, never dropped after it was accepted. The counts are
//! `vllm:num_requests_running` / `vllm:num_requests_waiting`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use super::error::{ApiError, ApiResult};

/// The entry node's admission queue.
#[derive(Debug)]
pub struct Admission {
    permits: Arc<Semaphore>,
    max_running: usize,
    max_waiting: usize,
    waiting: AtomicUsize,
}

/// Decrements the waiting count however the wait ends (admitted, or the client left).
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Admission {
    pub fn new(max_running: usize, max_waiting: usize) -> Self {
        let max_running = max_running.clamp(1, Semaphore::MAX_PERMITS);
        Admission {
            permits: Arc::new(Semaphore::new(max_running)),
            max_running,
            max_waiting,
            waiting: AtomicUsize::new(0),
        }
    }

    /// Admit a request of `n` choices: the permit and the time it queued.
    pub async fn admit(&self, n: usize) -> ApiResult<(OwnedSemaphorePermit, Duration)> {
        if n > self.max_running {
            return Err(ApiError::param(
                "n",
                format!(
                    "the request has {n} choices but this server runs at most {} at once \
                     (--max-running)",
                    self.max_running
                ),
            ));
        }
        let n32 = u32::try_from(n).unwrap_or(u32::MAX);
        if let Ok(p) = self.permits.clone().try_acquire_many_owned(n32) {
            return Ok((p, Duration::ZERO));
        }
        if self.waiting.fetch_add(1, Ordering::Relaxed) >= self.max_waiting {
            self.waiting.fetch_sub(1, Ordering::Relaxed);
            return Err(ApiError::overloaded(self.max_waiting));
        }
        let _w = Waiting(&self.waiting);
        let t0 = Instant::now();
        let p = self
            .permits
            .clone()
            .acquire_many_owned(n32)
            .await
            .map_err(|_| ApiError::unavailable("the server is shutting down"))?;
        Ok((p, t0.elapsed()))
    }

    /// Choices generating now.
    pub fn running(&self) -> usize {
        self.max_running - self.permits.available_permits()
    }

    /// Requests queued for admission.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn queues_up_to_the_bound_then_refuses_with_429() {
        let a = Arc::new(Admission::new(2, 1));
        let (p1, q) = a.admit(2).await.expect("fits");
        assert_eq!((q, a.running(), a.waiting()), (Duration::ZERO, 2, 0));
        let a2 = a.clone();
        let queued = tokio::spawn(async move { a2.admit(1).await.map(|(_, q)| q) });
        tokio::task::yield_now().await;
        assert_eq!(a.waiting(), 1);
        let e = a.admit(1).await.expect_err("queue full");
        assert_eq!((e.status.as_u16(), e.retry_after), (429, Some(1)));
        tokio::time::sleep(Duration::from_millis(30)).await;
        drop(p1);
        let q = queued
            .await
            .expect("task")
            .expect("admitted after the release");
        assert!(q >= Duration::from_millis(30), "queue time {q:?}");
        assert_eq!(a.waiting(), 0);
        let e = a.admit(3).await.expect_err("more than can ever run");
        assert_eq!(e.param.as_deref(), Some("n"));
    }

    #[tokio::test]
    async fn a_client_leaving_the_queue_is_no_longer_counted() {
        let a = Arc::new(Admission::new(1, 4));
        let _p = a.admit(1).await.expect("fits");
        let a2 = a.clone();
        let waiter = tokio::spawn(async move { a2.admit(1).await.map(|_| ()) });
        tokio::task::yield_now().await;
        assert_eq!(a.waiting(), 1);
        waiter.abort();
        let _ = waiter.await;
        assert_eq!(a.waiting(), 0);
    }
}
