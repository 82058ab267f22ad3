//! A node's parents in preference order and the one in use ([`Parents`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::ParentLink;
use crate::error::{NodeError, Result};

/// The parents of a node in preference order (`--parent A --parent B`) and the one in
/// use. A request that loses its parent fails over with [`Parents::fail_over`]; later
/// requests start on the parent in use.
#[derive(Debug)]
pub struct Parents {
    links: Vec<Arc<ParentLink>>,
    active: std::sync::atomic::AtomicUsize,
    failovers: AtomicU64,
}

impl Parents {
    /// A set of at least one parent; the first is in use.
    pub fn new(links: Vec<Arc<ParentLink>>) -> Result<Arc<Self>> {
        if links.is_empty() {
            return Err(NodeError::Config(
                "a parent set needs at least one parent".into(),
            ));
        }
        Ok(Arc::new(Self {
            links,
            active: std::sync::atomic::AtomicUsize::new(0),
            failovers: AtomicU64::new(0),
        }))
    }

    /// Every configured parent, in preference order.
    pub fn all(&self) -> &[Arc<ParentLink>] {
        &self.links
    }

    /// The parent in use.
    pub fn active(&self) -> Arc<ParentLink> {
        let i = self
            .active
            .load(Ordering::Acquire)
            .min(self.links.len() - 1);
        self.links[i].clone()
    }

    /// The parent a new request should use: the one in use unless it is down, then the
    /// first other parent that is not down (it becomes the one in use); the one in use
    /// when all are down (its escalations then fail at once and answer degraded).
    pub fn pick(&self) -> Arc<ParentLink> {
        let cur = self.active();
        if !cur.is_down() {
            return cur;
        }
        match self.links.iter().position(|l| !l.is_down() && !l.failed()) {
            Some(i) => {
                self.active.store(i, Ordering::Release);
                tracing::info!(from = %cur.addr(), to = %self.links[i].addr(), "parent in use is down; new requests use another");
                self.links[i].clone()
            }
            None => cur,
        }
    }

    /// Use parent `i` (in preference order) for new requests: at start, when the parents
    /// before it did not answer. Out of range → ignored.
    pub(crate) fn set_active(&self, i: usize) {
        if i < self.links.len() {
            self.active.store(i, Ordering::Release);
        }
    }

    /// Fail-overs so far.
    pub fn failovers(&self) -> u64 {
        self.failovers.load(Ordering::Acquire)
    }

    /// `failed` just lost a request: mark it and switch to the best other parent that has
    /// not failed ([`flow_partition::choose_parent`]: the lowest predicted RTT, ties to
    /// the earlier one). `None` when there is none (one parent, or all failed).
    pub fn fail_over(&self, failed: &Arc<ParentLink>) -> Option<Arc<ParentLink>> {
        failed.mark_failed();
        let options: Vec<flow_partition::ParentOption> = self
            .links
            .iter()
            .enumerate()
            .map(|(i, l)| flow_partition::ParentOption {
                id: i.to_string(),
                reachable: !Arc::ptr_eq(l, failed) && !l.failed() && !l.is_down(),
                predicted_ms: l.planning_estimate().rtt_ms.max(0.0),
            })
            .collect();
        let pick = flow_partition::choose_parent(&options)
            .ok()
            .flatten()
            .and_then(|o| o.id.parse::<usize>().ok())?;
        self.active.store(pick, Ordering::Release);
        self.failovers.fetch_add(1, Ordering::AcqRel);
        tracing::warn!(from = %failed.addr(), to = %self.links[pick].addr(), "failing over to another parent");
        Some(self.links[pick].clone())
    }
}
