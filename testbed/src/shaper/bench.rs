//! Accuracy measurements of the real relay on loopback: configured delay, rate and loss
//! versus what a receiver observes. Used by the loopback tests (generous tolerances), the
//! `shaper_accuracy` example (precise numbers for `docs/benchmarks.md`) and later
//! `flow-node bench shaper`.
//!
//! Each probe packet carries its sequence number and its send time (ns since the probe
//! started, same process and clock), so one-way delay is measured directly.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::net::UdpSocket;
use tokio::time::Instant;

use super::model::LinkParams;
use super::relay::{ShaperConfig, ShaperHandle, ShaperStats};
use crate::error::{Error, Result};

const HEADER: usize = 16;

/// Observed one-way delay versus the configured one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DelayMeasurement {
    /// Configured one-way delay, ms.
    pub configured_ms: f64,
    /// Packets received.
    pub samples: usize,
    /// Mean one-way delay, ms.
    pub mean_ms: f64,
    /// Median, ms.
    pub p50_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
    /// Minimum, ms.
    pub min_ms: f64,
}

impl DelayMeasurement {
    /// `(mean - configured) / configured`.
    pub fn mean_error(&self) -> f64 {
        (self.mean_ms - self.configured_ms) / self.configured_ms
    }
}

/// Observed throughput versus the configured rate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RateMeasurement {
    /// Configured rate, bit/s.
    pub configured_bps: f64,
    /// Received payload rate between the first and the last packet, bit/s.
    pub measured_bps: f64,
    /// Packets sent by the prober.
    pub sent: u64,
    /// Packets received.
    pub received: u64,
    /// The shaper's counters at the end.
    pub stats: ShaperStats,
}

impl RateMeasurement {
    /// `(measured - configured) / configured`.
    pub fn error(&self) -> f64 {
        (self.measured_bps - self.configured_bps) / self.configured_bps
    }
}

/// Observed loss versus the configured probability.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LossMeasurement {
    /// Configured loss probability.
    pub configured: f64,
    /// `1 - received / sent`.
    pub measured: f64,
    /// Packets sent.
    pub sent: u64,
    /// Packets received.
    pub received: u64,
    /// The shaper's counters at the end.
    pub stats: ShaperStats,
}

struct Arrival {
    sent_ns: u64,
    recv_ns: u64,
    bytes: usize,
}

async fn bind_loopback(what: &str) -> Result<UdpSocket> {
    UdpSocket::bind("127.0.0.1:0")
        .await
        .map_err(|e| Error::socket(format!("binding the {what} socket"), e))
}

fn addr(s: &UdpSocket) -> Result<SocketAddr> {
    s.local_addr()
        .map_err(|e| Error::socket("reading a local address", e))
}

/// Receive until `expected` packets arrived or nothing came for `idle`.
async fn collect(sink: UdpSocket, start: Instant, expected: u64, idle: Duration) -> Vec<Arrival> {
    let mut buf = vec![0u8; 65_535];
    let mut got = Vec::new();
    while (got.len() as u64) < expected {
        match tokio::time::timeout(idle, sink.recv_from(&mut buf)).await {
            Ok(Ok((n, _))) if n >= HEADER => {
                let recv_ns = start.elapsed().as_nanos() as u64;
                let mut ns = [0u8; 8];
                ns.copy_from_slice(&buf[8..16]);
                got.push(Arrival {
                    sent_ns: u64::from_le_bytes(ns),
                    recv_ns,
                    bytes: n,
                });
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    got
}

/// Send `count` probes of `bytes` bytes at `pps` packets per second through a shaper with
/// `up` as its client→upstream link; return what the sink saw and the shaper's counters.
async fn probe(
    up: LinkParams,
    seed: u64,
    count: u64,
    bytes: usize,
    pps: f64,
) -> Result<(Vec<Arrival>, ShaperStats)> {
    let sink = bind_loopback("sink").await?;
    let mut cfg = ShaperConfig::loopback(addr(&sink)?);
    cfg.up = up;
    cfg.seed = seed;
    let shaper = ShaperHandle::spawn(cfg).await?;
    let client = bind_loopback("client").await?;
    let start = Instant::now();
    let receiver = tokio::spawn(collect(sink, start, count, Duration::from_millis(1500)));
    let mut payload = vec![0u8; bytes.max(HEADER)];
    for seq in 0..count {
        // paced by computed time: the k-th packet leaves at k / pps
        let due = start + Duration::from_secs_f64(seq as f64 / pps);
        tokio::time::sleep_until(due).await;
        payload[..8].copy_from_slice(&seq.to_le_bytes());
        payload[8..16].copy_from_slice(&(start.elapsed().as_nanos() as u64).to_le_bytes());
        client
            .send_to(&payload, shaper.local_addr())
            .await
            .map_err(|e| Error::socket("sending a probe", e))?;
    }
    let got = receiver
        .await
        .map_err(|e| Error::socket("probe receiver", std::io::Error::other(e.to_string())))?;
    Ok((got, shaper.stats()))
}

/// Measure one-way delay: `count` small packets, `interval` apart, through `delay`.
pub async fn measure_delay(
    delay: Duration,
    count: u64,
    interval: Duration,
) -> Result<DelayMeasurement> {
    let pps = 1.0 / interval.as_secs_f64().max(1e-6);
    let (got, _) = probe(LinkParams::with_delay(delay), 0, count, 64, pps).await?;
    let mut d: Vec<f64> = got
        .iter()
        .map(|a| (a.recv_ns.saturating_sub(a.sent_ns)) as f64 / 1e6)
        .collect();
    if d.is_empty() {
        return Err(Error::config(
            "measure_delay",
            "no probe came through the shaper",
        ));
    }
    d.sort_by(f64::total_cmp);
    let pct = |p: f64| d[((p * d.len() as f64).ceil() as usize).clamp(1, d.len()) - 1];
    Ok(DelayMeasurement {
        configured_ms: delay.as_secs_f64() * 1000.0,
        samples: d.len(),
        mean_ms: d.iter().sum::<f64>() / d.len() as f64,
        p50_ms: pct(0.5),
        p99_ms: pct(0.99),
        min_ms: d[0],
    })
}

/// Measure throughput: offer 125 % of `rate_bps` for about `duration` in `bytes`-byte packets
/// (bucket one packet deep, queue large enough not to drop).
pub async fn measure_rate(
    rate_bps: u64,
    bytes: usize,
    duration: Duration,
) -> Result<RateMeasurement> {
    let offered_pps = rate_bps as f64 * 1.25 / 8.0 / bytes as f64;
    let count = (offered_pps * duration.as_secs_f64() / 1.25)
        .ceil()
        .max(10.0) as u64;
    let up = LinkParams {
        rate_bps: Some(rate_bps),
        bucket_bytes: bytes.max(1500) as u64,
        queue_limit: count as usize + 1,
        ..LinkParams::default()
    };
    let (got, stats) = probe(up, 0, count, bytes, offered_pps).await?;
    let measured_bps = match (got.first(), got.last()) {
        (Some(a), Some(b)) if b.recv_ns > a.recv_ns => {
            let payload: usize = got[1..].iter().map(|a| a.bytes).sum();
            payload as f64 * 8.0 / ((b.recv_ns - a.recv_ns) as f64 / 1e9)
        }
        _ => 0.0,
    };
    Ok(RateMeasurement {
        configured_bps: rate_bps as f64,
        measured_bps,
        sent: count,
        received: got.len() as u64,
        stats,
    })
}

/// Measure loss: `count` packets at 5000 packets/s through a link with loss `loss`.
pub async fn measure_loss(loss: f64, count: u64, seed: u64) -> Result<LossMeasurement> {
    let up = LinkParams {
        loss,
        ..LinkParams::default()
    };
    let (got, stats) = probe(up, seed, count, 200, 5000.0).await?;
    let received = got.len() as u64;
    Ok(LossMeasurement {
        configured: loss,
        measured: 1.0 - received as f64 / count.max(1) as f64,
        sent: count,
        received,
        stats,
    })
}
