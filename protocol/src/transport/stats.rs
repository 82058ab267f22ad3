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
    /// UDP datagrams sent.
    pub datagrams_sent: u64,
    /// UDP datagrams received.
    pub datagrams_received: u64,
}

/// IPv4 and UDP header bytes of one datagram.
const IP_UDP_HEADERS: u64 = 28;

impl ConnStats {
    /// Bytes both ways on the wire as IP packets (UDP payloads plus IPv4 and UDP headers):
    /// what a capture of the connection counts.
    pub fn wire_bytes(&self) -> u64 {
        self.bytes_sent
            + self.bytes_received
            + IP_UDP_HEADERS * (self.datagrams_sent + self.datagrams_received)
    }

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
            datagrams_sent: s.udp_tx.datagrams,
            datagrams_received: s.udp_rx.datagrams,
        }
    }
}
