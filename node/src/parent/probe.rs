//! Probing a parent link: every round a small liveness/RTT probe, and — when the byte
//! budget ([`super::budget`]) says a decision needs it — a big goodput probe; missed rounds
//! mark the link down, answered ones feed the estimator. A parent's
//! [`flow_protocol::Upstream`] reports arrive on the same control stream and are kept on
//! the link ([`super::ParentLink::upstream`]).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use flow_partition::LinkSample;
use flow_protocol::transport::{PeerConnection, SessionStream};
use flow_protocol::{Message, Probe};
use tokio::time::Instant;

use super::{LinkHealth, ParentLink};
use crate::error::{NodeError, Result};

/// Payload bytes of the small (liveness and RTT) probe and of every probe's reply.
pub(super) const SMALL_PROBE: u32 = 16;

/// Bounds of the big probe (bytes). A probe that fits in a shaper's or policer's burst
/// allowance crosses at line rate and reads as a much faster link: with a 2 KiB floor a
/// 1 Mbit/s link with the testbed shaper's 3000-byte bucket read 1.2 to 2.8 Mbit/s from one
/// run to the next (the estimate sizes the next probe, so it wandered). The floor is ~3×
/// that bucket; a link with a bigger burst is still over-estimated until the time-based
/// size outgrows it. It costs ~65 ms of a 1 Mbit/s link per probe round.
pub(super) const BIG_PROBE_MIN: f64 = 8192.0;
const BIG_PROBE_MAX: f64 = 65536.0;
/// Seconds of transfer the big probe aims at.
const BIG_PROBE_SECS: f64 = 0.025;
/// Time the big probe gets beyond the small probe's deadline (its transfer: 64 KiB take
/// 0.5 s at 1 Mbit/s).
const BIG_PROBE_ALLOWANCE: Duration = Duration::from_secs(1);

/// Size of the big probe for the current goodput estimate.
fn big_probe_bytes(goodput_bps: f64) -> u32 {
    (goodput_bps * BIG_PROBE_SECS / 8.0).clamp(BIG_PROBE_MIN, BIG_PROBE_MAX) as u32
}

/// One probe exchange; returns the elapsed time. A parent's [`flow_protocol::Upstream`]
/// report read on the way goes to `upstream` (the newest wins).
async fn probe_once(
    control: &mut SessionStream,
    seq: u64,
    bytes: u32,
    upstream: &mut Option<flow_protocol::Upstream>,
) -> Result<Duration> {
    let t0 = Instant::now();
    control
        .send(&Message::Probe(Probe::new(seq, bytes, SMALL_PROBE)))
        .await?;
    loop {
        match control.recv().await? {
            Some(Message::ProbeReply(r)) if r.seq == seq => return Ok(t0.elapsed()),
            Some(Message::ProbeReply(_)) | Some(Message::Heartbeat(_)) => continue,
            Some(Message::Upstream(u)) => *upstream = Some(u),
            Some(other) => {
                return Err(NodeError::Protocol(format!(
                    "unexpected {} on the control stream",
                    other.name()
                )))
            }
            None => {
                return Err(NodeError::Protocol(
                    "the parent closed the control stream".into(),
                ))
            }
        }
    }
}

/// Probe rounds until the connection or the link goes away. A probe with no reply within
/// the probe deadline is a miss; `missed_probes` misses in a row mark the link down until a
/// round succeeds again.
pub(super) async fn probe_loop(
    link: Weak<ParentLink>,
    // Held so the connection outlives its probe loop; the samples come from the exchanges
    // (its QUIC counters charge the probe budget and feed the wire-byte gauge).
    conn: Arc<PeerConnection>,
    mut control: SessionStream,
    every: Duration,
    health: LinkHealth,
) {
    let mut seq = 0u64;
    // Everything the connection carries is charged to the probe budget, from here on.
    let mut wire = conn.stats().wire_bytes();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(l) = link.upgrade() else { return };
        let now_wire = conn.stats().wire_bytes();
        l.wire_bytes.store(now_wire, Ordering::Release);
        let carried = now_wire.saturating_sub(wire);
        wire = now_wire;
        let big = l.plan_round(carried, big_probe_bytes(l.estimate().goodput_bps));
        // A probe is a one-row step with no compute: the RTT part of a reply deadline.
        let wait = health.reply_deadline(l.estimate().rtt_ms, Some(0.0));
        drop(l);
        // The small probe decides liveness. The big one measures goodput only: it may take
        // its transfer time on a slow link (and the estimate it was sized from may be far
        // too high), so it gets a transfer allowance on top, and running out of it is a
        // goodput sample — not a missed probe. (Counting it as a miss marked a live 1 Mbit/s
        // link down for good: the estimate never shrank, so the next big probe missed too.)
        let big_wait = wait + BIG_PROBE_ALLOWANCE;
        seq += 2;
        let mut report = None;
        let small_t = tokio::time::timeout(
            wait,
            probe_once(&mut control, seq, SMALL_PROBE, &mut report),
        )
        .await;
        let big_t = match (&small_t, big) {
            (Ok(Ok(_)), Some(big)) => Some(
                tokio::time::timeout(
                    big_wait,
                    probe_once(&mut control, seq + 1, big, &mut report),
                )
                .await,
            ),
            _ => None,
        };
        let big = big.unwrap_or(SMALL_PROBE);
        let Some(l) = link.upgrade() else { return };
        if report.is_some() {
            l.set_upstream(report);
        }
        let goodput = match (&small_t, &big_t) {
            (Ok(Ok(s)), Some(Ok(Ok(b)))) => {
                let extra = b.saturating_sub(*s).as_secs_f64();
                (extra > 0.0).then(|| f64::from(big - SMALL_PROBE) * 8.0 / extra)
            }
            // The big probe outlived its allowance: goodput is below what it would have
            // needed to make it, a pessimistic sample that shrinks the next big probe.
            (Ok(Ok(_)), Some(Err(_))) => Some(f64::from(big) * 8.0 / big_wait.as_secs_f64()),
            _ => None,
        }
        .filter(|g| g.is_finite() && *g > 0.0);
        match (small_t, big_t) {
            (Ok(Err(e)), _) | (Ok(Ok(_)), Some(Ok(Err(e)))) => {
                tracing::info!(parent = %l.addr(), error = %e, "link probe failed; probing stops until the link is re-dialled");
                l.reachable.store(false, Ordering::Release);
                return;
            }
            (Err(_), _) => {
                let missed = l.missed.fetch_add(1, Ordering::AcqRel) + 1;
                if missed >= health.missed_probes && l.reachable.swap(false, Ordering::AcqRel) {
                    tracing::warn!(parent = %l.addr(), missed, wait_ms = wait.as_millis() as u64, "parent missed probes; link marked down");
                }
            }
            (Ok(Ok(small)), _) => {
                let now = l.now_ms();
                // The RTT sample is the small probe's own exchange: what a one-row step
                // pays besides its bytes' serialisation (propagation both ways, framing, the
                // parent's turnaround). QUIC's smoothed path RTT also averages packets that
                // queued behind the big probe or a prompt on a slow link: on a 1 Mbit/s
                // link it read 39 ms against 20 ms of propagation, and the planner charged
                // that queueing to every token on top of the goodput term.
                let rtt = small.as_secs_f64() * 1e3;
                let sample = LinkSample {
                    at_ms: now,
                    rtt_ms: Some(rtt),
                    goodput_bps: goodput,
                };
                if let Err(e) = l.observe(sample) {
                    tracing::debug!(error = %e, "probe sample refused");
                }
                l.probes.fetch_add(1, Ordering::AcqRel);
                l.missed.store(0, Ordering::Release);
                if !l.reachable.swap(true, Ordering::AcqRel) {
                    tracing::info!(parent = %l.addr(), "parent answers probes again; link up");
                }
                tracing::trace!(parent = %l.addr(), rtt_ms = rtt, goodput_bps = ?goodput, "link probe");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn big_probe_is_bounded_and_follows_the_estimate() {
        assert_eq!(big_probe_bytes(1e3), 8192);
        assert_eq!(big_probe_bytes(1e12), 65536);
        // 10 Mbit/s for 25 ms = 31 250 bytes.
        assert_eq!(big_probe_bytes(10e6), 31_250);
    }
}
