//! Per-connection statistics for the planner's link estimates.

use std::time::Duration;

/// A snapshot of one QUIC connection's path and byte counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ConnStats {
    /// Smoothed round-trip time.
    pub rtt: Duration,
    /// Smallest RTT seen.
    pub min_rtt: Duration,
    /// Congestion window, bytes.
    pub cwnd: u64,
    /// Congestion events (loss or ECN) so far.
    pub congestion_events: u64,
    /// UDP payload bytes sent.
    pub bytes_sent: u64,
    /// UDP payload bytes received.
    pub bytes_received: u64,
    /// Packets sent.
    pub sent_packets: u64,
    /// Packets declared lost.
    pub lost_packets: u64,
    /// Bytes declared lost.
    pub lost_bytes: u64,
    /// Current path MTU.
    pub mtu: u16,
}

impl ConnStats {
    /// Lost / sent packets (0 when nothing was sent).
    pub fn loss_rate(&self) -> f64 {
        if self.sent_packets == 0 {
            0.0
        } else {
            self.lost_packets as f64 / self.sent_packets as f64
        }
    }
}

impl From<&quinn::ConnectionStats> for ConnStats {
    fn from(s: &quinn::ConnectionStats) -> Self {
        ConnStats {
            rtt: s.path.rtt,
            min_rtt: s.path.min_rtt,
            cwnd: s.path.cwnd,
            congestion_events: s.path.congestion_events,
            bytes_sent: s.udp_tx.bytes,
            bytes_received: s.udp_rx.bytes,
            sent_packets: s.path.sent_packets,
            lost_packets: s.path.lost_packets,
            lost_bytes: s.path.lost_bytes,
            mtu: s.path.current_mtu,
        }
    }
}
