//! The task that keeps a parent link connected.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use super::{LinkHealth, ParentLink};

/// Keeps a parent link connected: waits for its connection to close, then re-dials with a
/// bounded backoff (`redial_min` doubling to `redial_max`) until a dial succeeds. Ends when
/// the link is dropped or closed.
pub(super) async fn supervise(link: Weak<ParentLink>, health: LinkHealth) {
    let mut backoff = health.redial_min;
    loop {
        let Some(l) = link.upgrade() else { return };
        let conn = l.conn.lock().await.clone();
        match conn {
            Some(c) => {
                drop(l);
                let why = c.closed().await;
                let Some(l) = link.upgrade() else { return };
                let mut slot = l.conn.lock().await;
                if slot.as_ref().is_some_and(|cur| Arc::ptr_eq(cur, &c)) {
                    *slot = None;
                    drop(slot);
                    if l.closing.load(Ordering::Acquire) {
                        return;
                    }
                    l.reachable.store(false, Ordering::Release);
                    tracing::warn!(parent = %l.addr(), reason = %why, "parent connection lost; re-dialling");
                }
                backoff = health.redial_min;
            }
            None => {
                if l.closing.load(Ordering::Acquire) {
                    return;
                }
                let r = tokio::time::timeout(health.dial_timeout, l.dial()).await;
                match r {
                    Ok(Ok(())) => {
                        tracing::info!(parent = %l.addr(), "parent re-dialled");
                        backoff = health.redial_min;
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(parent = %l.addr(), error = %e, backoff_ms = backoff.as_millis() as u64, "re-dial failed");
                    }
                    Err(_) => {
                        l.reachable.store(false, Ordering::Release);
                        tracing::debug!(parent = %l.addr(), backoff_ms = backoff.as_millis() as u64, "re-dial timed out");
                    }
                }
                let connected = l.conn.lock().await.is_some();
                drop(l);
                if !connected {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(health.redial_max);
                }
            }
        }
    }
}
