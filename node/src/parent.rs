//! The link to a parent tier: one QUIC connection (re-dialled when it breaks), one stream
//! per request session, the wire encoding used on this link, and a live estimate of the
//! link (RTT and goodput, smoothed by a [`flow_partition::LinkEstimator`]).
//!
//! The estimate is fed by the traffic the link carries and, within a byte budget, by a
//! probe task on the connection's control stream. Every `probe_interval` it sends a tiny
//! [`Probe`](flow_protocol::Probe) (16 bytes each way: liveness, and the RTT sample — the
//! fixed cost of one small exchange; QUIC's smoothed path RTT also averages packets queued
//! behind transfers). A larger probe follows only when the goodput estimate is stale and a
//! decision depends on it ([`budget`]): the planner read it recently and no goodput sample
//! — a request's transfer ([`ParentLink::observe_transfer`]) or a probe — came for a while.
//! Its sample is `(big − small) bytes · 8 / (t_big − t_small)` (the fixed costs —
//! propagation, framing, the parent's turnaround — cancel in the difference). It is sized
//! to ~25 ms of transfer at the current estimate (8 KiB to 64 KiB), and goes only while a
//! token bucket charged with everything the connection carries (QUIC's byte and datagram
//! counters) holds its cost: the link stays within [`ProbeBudget::bytes_per_s`] (default
//! 1000 B/s) on average. An idle link that no planner reads costs the tiny probe and QUIC
//! keep-alives only (~0.4 KB/s on the wire instead of ~67 KB/s when every round sent a big
//! probe).
//!
//! Dead parents are noticed fast ([`LinkHealth`]): parent connections use a short QUIC
//! keep-alive and idle timeout, a probe that gets no reply within its deadline counts as
//! missed and `missed_probes` misses in a row mark the link down (new requests then answer
//! locally, degraded, or use another parent, without trying it), and a supervisor task
//! re-dials a lost connection with a short bounded backoff so escalation resumes within a
//! couple of seconds of the parent coming back. Each escalation waits for the parent's
//! reply at most [`ParentLink::reply_deadline`]: the link RTT times a factor plus the
//! parent's observed service time, never less than a floor.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use flow_partition::{LinkEstimate, LinkEstimator, LinkSample};
use flow_protocol::transport::{ConnStats, Endpoint, ParentName, PeerConnection, SessionStream};
use flow_protocol::{Encoding, Hello};
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::error::{NodeError, Result};

pub mod budget;
mod health;
mod parents;
mod probe;
mod supervise;
pub mod upstream;
pub use budget::ProbeBudget;
use budget::{GoodputView, Prober};
pub use health::{LinkHealth, ProbeConfig};
pub use parents::Parents;
use supervise::supervise;
pub use upstream::answer_probes;

/// Smoothed service time of the parent (reply time minus RTT): per decode step (one row)
/// and per row of a multi-row step (prefill, backfill).
#[derive(Debug, Default, Clone, Copy)]
struct ServiceTimes {
    step_ms: Option<f64>,
    row_ms: Option<f64>,
}

/// Weight of a new observation in the service-time averages.
const SERVICE_ALPHA: f64 = 0.2;

fn ewma(old: Option<f64>, x: f64) -> f64 {
    match old {
        Some(o) => o + SERVICE_ALPHA * (x - o),
        None => x,
    }
}

/// A parent tier this node escalates to.
#[derive(Debug)]
pub struct ParentLink {
    endpoint: Endpoint,
    /// Where the parent is now (re-resolved from `host` before each dial when set).
    addr: std::sync::Mutex<SocketAddr>,
    /// `HOST:PORT` the parent was named by (a Service or swarm service name).
    host: std::sync::OnceLock<String>,
    /// The DNS name the parent's certificate must carry, if pinned (`--parent-name`).
    name: ParentName,
    encoding: Encoding,
    conn: Mutex<Option<Arc<PeerConnection>>>,
    estimator: std::sync::Mutex<LinkEstimator>,
    probe: ProbeConfig,
    /// Clock origin of the estimator's timestamps.
    epoch: Instant,
    /// Probe rounds completed.
    probes: AtomicU64,
    /// The probe budget (kept across re-dials: a flapping link does not get a fresh burst
    /// per connection).
    prober: std::sync::Mutex<Prober>,
    /// When (estimator ms) a planner last read the estimate; `u64::MAX`: never.
    wanted_at: AtomicU64,
    /// When (estimator ms) the newest goodput sample came; `u64::MAX`: none yet.
    goodput_at: AtomicU64,
    /// Goodput samples from request transfers.
    transfer_samples: AtomicU64,
    /// Bytes on the wire (both ways) of the current connection at the last probe round.
    wire_bytes: AtomicU64,
    /// Whether the last dial or probe round succeeded.
    reachable: AtomicBool,
    /// A request failed on this link since it was last dialled (fail-over skips it).
    failed: AtomicBool,
    /// Probe rounds missed in a row.
    missed: AtomicU32,
    /// Smoothed service times of the parent.
    service: std::sync::Mutex<ServiceTimes>,
    /// The supervisor (re-dialler) runs.
    supervised: AtomicBool,
    /// [`ParentLink::close`] was called: no more re-dials.
    closing: AtomicBool,
    /// The parent's latest report of the tiers beyond it (protocol 3; cleared on dial).
    upstream: std::sync::Mutex<Option<flow_protocol::Upstream>>,
}

impl Drop for ParentLink {
    fn drop(&mut self) {
        // Wakes the supervisor, which then ends.
        if let Some(c) = self.conn.get_mut().take() {
            c.close("parent link dropped");
        }
    }
}

impl ParentLink {
    /// Connect to `addr` and exchange `Hello`s. The parent's certificate must chain to the
    /// cluster CA and carry a parent role; its name must be `name` when pinned.
    pub async fn connect(
        endpoint: Endpoint,
        addr: SocketAddr,
        name: ParentName,
        encoding: Encoding,
        probe: ProbeConfig,
    ) -> Result<Arc<Self>> {
        let link = Self::lazy(endpoint, addr, name, encoding, probe)?;
        link.dial().await?;
        if !link.supervised.swap(true, Ordering::AcqRel) {
            tokio::spawn(supervise(Arc::downgrade(&link), probe.health));
        }
        Ok(link)
    }

    /// A link that dials on first use (a fail-over parent that may be down at start).
    pub fn lazy(
        endpoint: Endpoint,
        addr: SocketAddr,
        name: ParentName,
        encoding: Encoding,
        probe: ProbeConfig,
    ) -> Result<Arc<Self>> {
        let estimator = LinkEstimator::new(probe.estimator)
            .map_err(|e| NodeError::Config(format!("link estimator: {e}")))?;
        probe.health.validate()?;
        probe
            .budget
            .validate()
            .map_err(|e| NodeError::Config(format!("probe budget {e}")))?;
        let epoch = Instant::now();
        Ok(Arc::new(Self {
            endpoint,
            addr: std::sync::Mutex::new(addr),
            host: std::sync::OnceLock::new(),
            name,
            encoding,
            conn: Mutex::new(None),
            estimator: std::sync::Mutex::new(estimator),
            probe,
            epoch,
            probes: AtomicU64::new(0),
            prober: std::sync::Mutex::new(Prober::new(probe.budget, Duration::ZERO)),
            wanted_at: AtomicU64::new(u64::MAX),
            goodput_at: AtomicU64::new(u64::MAX),
            transfer_samples: AtomicU64::new(0),
            wire_bytes: AtomicU64::new(0),
            reachable: AtomicBool::new(false),
            failed: AtomicBool::new(false),
            missed: AtomicU32::new(0),
            service: std::sync::Mutex::new(ServiceTimes::default()),
            upstream: std::sync::Mutex::new(None),
            supervised: AtomicBool::new(false),
            closing: AtomicBool::new(false),
        }))
    }

    /// Dial once, bounded by the dial timeout, and make sure the supervisor re-dials the
    /// link whenever its connection is lost (also when this dial failed).
    pub(crate) async fn dial_bounded(self: &Arc<Self>) -> Result<()> {
        let r = match tokio::time::timeout(self.probe.health.dial_timeout, self.dial()).await {
            Ok(r) => r,
            Err(_) => {
                self.reachable.store(false, Ordering::Release);
                Err(NodeError::Parent {
                    addr: self.addr().to_string(),
                    msg: format!(
                        "no connection within {} ms",
                        self.probe.health.dial_timeout.as_millis()
                    ),
                })
            }
        };
        if !self.supervised.swap(true, Ordering::AcqRel) {
            tokio::spawn(supervise(Arc::downgrade(self), self.probe.health));
        }
        r
    }

    /// Resolve `host` (`HOST:PORT`) again before every re-dial: a parent named by DNS that
    /// comes back at another address (a restarted container, a rescheduled pod) is found.
    pub fn redial_by_name(&self, host: String) {
        let _ = self.host.set(host);
    }

    /// The address to dial: `host` resolved now, else the address given (also when the
    /// name does not resolve at the moment).
    async fn resolve(&self) -> SocketAddr {
        let given = self.addr();
        let Some(host) = self.host.get() else {
            return given;
        };
        match tokio::net::lookup_host(host.as_str()).await {
            Ok(mut found) => match found.next() {
                Some(a) => {
                    if a != given {
                        tracing::info!(parent = %host, from = %given, to = %a, "parent name resolves to a new address");
                        *self.addr.lock().unwrap_or_else(|e| e.into_inner()) = a;
                    }
                    a
                }
                None => given,
            },
            Err(e) => {
                tracing::debug!(parent = %host, error = %e, "parent name does not resolve; dialling the last address");
                given
            }
        }
    }

    async fn dial(self: &Arc<Self>) -> Result<()> {
        let addr = self.resolve().await;
        let c = match self.endpoint.connect(addr, &self.name).await {
            Ok(c) => Arc::new(c),
            Err(e) => {
                self.reachable.store(false, Ordering::Release);
                return Err(NodeError::Parent {
                    addr: self.addr().to_string(),
                    msg: e.to_string(),
                });
            }
        };
        tracing::info!(parent = %self.addr(), node = %c.peer_hello().node_id, role = %c.peer_hello().role, "connected to parent");
        self.reachable.store(true, Ordering::Release);
        self.failed.store(false, Ordering::Release);
        self.missed.store(0, Ordering::Release);
        self.set_upstream(None);
        if let (Some(every), Some(control)) = (self.probe.interval, c.take_control()) {
            let me = Arc::downgrade(self);
            let conn = c.clone();
            tokio::spawn(probe::probe_loop(
                me,
                conn,
                control,
                every,
                self.probe.health,
            ));
        }
        *self.conn.lock().await = Some(c);
        Ok(())
    }

    /// The live connection, if any (the parent opens fleet sessions on it: delta pushes,
    /// rollbacks, round requests).
    pub async fn connection(&self) -> Option<Arc<PeerConnection>> {
        self.conn.lock().await.clone()
    }

    /// The parent's address.
    pub fn addr(&self) -> SocketAddr {
        *self.addr.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wire encoding of hidden states on this link.
    pub fn encoding(&self) -> Encoding {
        self.encoding
    }

    /// The parent's `Hello`, if connected.
    pub async fn hello(&self) -> Option<Hello> {
        self.conn
            .lock()
            .await
            .as_ref()
            .map(|c| c.peer_hello().clone())
    }

    /// Dead-parent detection and reply deadlines of this link.
    pub fn health(&self) -> LinkHealth {
        self.probe.health
    }

    /// UDP datagrams received on the current connection (0 without one): the parent is
    /// alive while this grows (it acknowledges what we send and our keep-alives).
    pub async fn packets_received(&self) -> u64 {
        self.conn
            .lock()
            .await
            .as_ref()
            .map_or(0, |c| c.stats().datagrams_received)
    }

    /// Live QUIC statistics (RTT, cwnd, bytes, losses) for the planner.
    pub async fn stats(&self) -> Option<ConnStats> {
        self.conn.lock().await.as_ref().map(|c| c.stats())
    }

    /// Milliseconds since this link was created (the estimator's clock).
    pub fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// The smoothed link estimate now (the prior while no probe has completed).
    pub fn estimate(&self) -> LinkEstimate {
        let now = self.now_ms();
        match self.estimator.lock() {
            Ok(e) => e.estimate(now),
            Err(p) => p.into_inner().estimate(now),
        }
    }

    /// The estimate to plan with: smoothed values blended with the prior by confidence.
    /// Reading it marks the goodput estimate as wanted: a stale one is refreshed by a
    /// goodput probe within the budget.
    pub fn planning_estimate(&self) -> LinkEstimate {
        let now = self.now_ms();
        self.wanted_at.store(now, Ordering::Release);
        match self.estimator.lock() {
            Ok(e) => e.planning_estimate(now),
            Err(p) => p.into_inner().planning_estimate(now),
        }
    }

    /// Feed one sample (probes do; tests and operators may inject one). Invalid samples
    /// are refused with an error naming the field.
    pub fn observe(&self, sample: LinkSample) -> Result<()> {
        let mut e = self
            .estimator
            .lock()
            .map_err(|_| NodeError::Internal("link estimator lock poisoned".into()))?;
        e.observe(sample)
            .map_err(|e| NodeError::BadRequest(format!("link sample: {e}")))?;
        if sample.goodput_bps.is_some() {
            self.goodput_at.store(sample.at_ms, Ordering::Release);
        }
        Ok(())
    }

    /// A request exchange on this link sent `bytes` (its tensors) and had the reply
    /// `elapsed` after the send began. Large transfers give a goodput sample without a
    /// probe: `bytes · 8 / (elapsed − RTT)` is a lower bound of the goodput (the parent's
    /// compute counts as transfer time), so it is fed only when it is at least the current
    /// estimate (the link is at least that fast); a lower one says nothing and the budgeted
    /// probe corrects an estimate that is too high. Returns whether a sample was fed.
    pub fn observe_transfer(&self, bytes: u64, elapsed: Duration) -> bool {
        let est = self.estimate();
        let Some(g) = budget::transfer_goodput(bytes, elapsed, est.rtt_ms, est.goodput_bps) else {
            return false;
        };
        let sample = LinkSample {
            at_ms: self.now_ms(),
            rtt_ms: None,
            goodput_bps: Some(g),
        };
        let fed = self.observe(sample).is_ok();
        if fed {
            self.transfer_samples.fetch_add(1, Ordering::AcqRel);
        }
        fed
    }

    /// Goodput samples so far (probes and request transfers).
    pub fn goodput_samples(&self) -> u64 {
        match self.estimator.lock() {
            Ok(e) => e.sample_counts().1,
            Err(p) => p.into_inner().sample_counts().1,
        }
    }

    /// Goodput samples taken from request transfers ([`ParentLink::observe_transfer`]).
    pub fn transfer_samples(&self) -> u64 {
        self.transfer_samples.load(Ordering::Acquire)
    }

    /// Goodput probes that went on this link (planned: one whose round lost its liveness
    /// probe is counted though not sent). The liveness probe goes every round; these only
    /// when a decision needs a stale goodput estimate and the budget allows.
    pub fn goodput_probes(&self) -> u64 {
        match self.prober.lock() {
            Ok(p) => p.big_probes(),
            Err(p) => p.into_inner().big_probes(),
        }
    }

    /// Bytes on the wire (IP packets both ways: probes, keep-alives, requests) of the
    /// current connection, from QUIC's counters at the last probe round.
    pub fn wire_bytes(&self) -> u64 {
        self.wire_bytes.load(Ordering::Acquire)
    }

    /// What the prober sees of the goodput estimate at `now_ms`.
    fn goodput_view(&self, now_ms: u64) -> GoodputView {
        let at = self.goodput_at.load(Ordering::Acquire);
        let wanted = self.wanted_at.load(Ordering::Acquire);
        let samples = self.goodput_samples();
        let window = self.probe.budget.demand_window.as_millis() as u64;
        GoodputView {
            age: (at != u64::MAX).then(|| Duration::from_millis(now_ms.saturating_sub(at))),
            samples,
            wanted: wanted != u64::MAX && now_ms.saturating_sub(wanted) <= window,
        }
    }

    /// Plan this round's probes after the link carried `carried` bytes since the last one:
    /// the liveness probe always, the goodput probe when it is due and within the budget.
    /// Returns the big probe's size, if one goes.
    fn plan_round(&self, carried: u64, want_big: u32) -> Option<u32> {
        let now = self.now_ms();
        let g = self.goodput_view(now);
        let mut p = match self.prober.lock() {
            Ok(p) => p,
            Err(p) => p.into_inner(),
        };
        p.round(
            Duration::from_millis(now),
            carried,
            want_big,
            probe::BIG_PROBE_MIN as u32,
            probe::SMALL_PROBE,
            &g,
        )
        .big
    }

    /// What the parent last reported of the tiers beyond it ([`flow_protocol::Upstream`]);
    /// `None` before its first report on this connection, or from a protocol-2 parent.
    pub fn upstream(&self) -> Option<flow_protocol::Upstream> {
        self.upstream
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set_upstream(&self, u: Option<flow_protocol::Upstream>) {
        *self.upstream.lock().unwrap_or_else(|e| e.into_inner()) = u;
    }

    /// The link's health: [`upstream::link_state`] of what the probes and requests saw.
    pub fn state(&self) -> flow_protocol::LinkState {
        upstream::link_state(self.reachable(), self.failed(), self.is_down())
    }

    /// Probe rounds completed on this link.
    pub fn probe_rounds(&self) -> u64 {
        self.probes.load(Ordering::Acquire)
    }

    /// Whether the last dial or probe round succeeded.
    pub fn reachable(&self) -> bool {
        self.reachable.load(Ordering::Acquire)
    }

    /// Record that a request failed on this link: fail-over avoids it until a dial
    /// succeeds again. (Whether new requests still try it is [`ParentLink::is_down`]'s
    /// call: a slow reply alone does not take a live parent down.)
    pub fn mark_failed(&self) {
        self.failed.store(true, Ordering::Release);
    }

    /// Whether a request failed on this link since it was last dialled.
    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// Whether the link is known to be down (dial failed, connection lost, or probes
    /// missed): requests do not try it until a dial or a probe succeeds again. A link
    /// never dialled yet (a lazy fail-over parent) is not down.
    pub fn is_down(&self) -> bool {
        !self.reachable() && self.supervised.load(Ordering::Acquire)
    }

    /// How long an escalation of `rows` rows waits for the parent's reply
    /// ([`LinkHealth::reply_deadline`] with this link's RTT estimate and the parent's
    /// smoothed service time for such a step).
    pub fn reply_deadline(&self, rows: usize) -> Duration {
        let rtt = self.estimate().rtt_ms;
        let service = match self.service.lock() {
            Ok(s) => *s,
            Err(p) => *p.into_inner(),
        };
        let svc = if rows <= 1 {
            service.step_ms
        } else {
            service.row_ms.map(|r| r * rows as f64)
        };
        self.probe.health.reply_deadline(rtt, svc)
    }

    /// Record the time the parent took to reply to a step of `rows` rows.
    pub fn observe_reply(&self, rows: usize, elapsed: Duration) {
        let ms = (elapsed.as_secs_f64() * 1e3 - self.estimate().rtt_ms).max(0.0);
        let mut s = match self.service.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        if rows <= 1 {
            s.step_ms = Some(ewma(s.step_ms, ms));
        } else {
            s.row_ms = Some(ewma(s.row_ms, ms / rows as f64));
        }
    }

    /// A new request session; re-dials once if the connection is gone. Fails at once when
    /// the link is down (the supervisor re-dials it in the background).
    pub async fn open_session(self: &Arc<Self>) -> Result<SessionStream> {
        if self.is_down() {
            return Err(NodeError::Parent {
                addr: self.addr().to_string(),
                msg: "the parent link is down (connection lost or probes missed)".into(),
            });
        }
        for attempt in 0..2 {
            let conn = self.conn.lock().await.clone();
            let stream = match conn {
                Some(c) => Some(c.open_session().await),
                None => None,
            };
            match stream {
                Some(Ok(s)) => return Ok(s),
                Some(Err(e)) if attempt == 1 => {
                    self.reachable.store(false, Ordering::Release);
                    return Err(NodeError::Parent {
                        addr: self.addr().to_string(),
                        msg: e.to_string(),
                    });
                }
                _ => {
                    *self.conn.lock().await = None;
                    self.dial_bounded().await?;
                }
            }
        }
        Err(NodeError::Parent {
            addr: self.addr().to_string(),
            msg: "could not open a session".into(),
        })
    }

    /// Close the connection.
    pub async fn close(&self) {
        self.closing.store(true, Ordering::Release);
        if let Some(c) = self.conn.lock().await.take() {
            c.close("shutdown");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_deadline_follows_rtt_and_service_within_floor_and_cap() {
        let h = LinkHealth::default();
        // Fast link, fast parent: the floor.
        assert_eq!(h.reply_deadline(1.0, Some(1.0)), h.reply_floor);
        // 8 × 40 ms + 4 × 100 ms.
        assert_eq!(
            h.reply_deadline(40.0, Some(100.0)),
            Duration::from_millis(720)
        );
        // Nothing observed yet: the service prior (4 × 1.5 s), capped.
        assert_eq!(h.reply_deadline(1.0, None), h.reply_cap);
        assert_eq!(h.reply_deadline(f64::NAN, Some(1.0)), h.reply_floor);
        assert_eq!(h.reply_deadline(f64::INFINITY, Some(1.0)), h.reply_cap);
    }

    #[test]
    fn link_health_rejects_bad_values_naming_the_field() {
        assert!(LinkHealth::default().validate().is_ok());
        let e = LinkHealth {
            keep_alive: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(3),
            ..LinkHealth::default()
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(e.contains("keep_alive"), "{e}");
        let e = LinkHealth {
            missed_probes: 0,
            ..LinkHealth::default()
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(e.contains("missed_probes"), "{e}");
        let e = LinkHealth {
            redial_max: Duration::from_millis(10),
            ..LinkHealth::default()
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(e.contains("redial_min"), "{e}");
    }
}
