//! What a parent knows of the tiers beyond it, told to its children (protocol 3).
//!
//! A child sees its parent (the `Hello`, the link it probes) but not the parent's own
//! parents: an entry node's dashboard could only infer the cloud. A parent with parents of
//! its own sends [`Upstream`] on the control stream of every child that speaks protocol 3
//! or later: its links (the peer's id, role and hosted layers from that peer's `Hello`, the
//! link's health and live estimates, QUIC's byte counters), followed by what its own active
//! parent reported, so every tier of a deeper chain reaches the entry node. It goes every
//! few seconds and when a link's health changes (a few hundred bytes: well inside an idle
//! link's probe budget). A child on protocol 2 would never get one (its decoder would stop
//! on an unknown frame kind); since protocol 4 such a child is refused at the `Hello`.
//!
//! Values are checked on encode and decode (at most [`MAX_UPSTREAM_LINKS`] links, bounded
//! names, finite non-negative estimates, ordered layer ranges), so a peer cannot hand the
//! dashboard a NaN or an unbounded list.

use serde::{Deserialize, Serialize};

use crate::message::{HostedLayers, Role};

/// Most links one report carries (its own and its parents' reports together).
pub const MAX_UPSTREAM_LINKS: usize = 16;
/// Longest node id or address in a report, in bytes.
pub const MAX_UPSTREAM_TEXT: usize = 256;
/// Most hosted layer ranges per peer in a report.
pub const MAX_UPSTREAM_RANGES: usize = 16;

/// The protocol version that introduced [`Upstream`].
pub const UPSTREAM_SINCE_VERSION: u16 = 3;

/// A parent's links to its own parents, and theirs beyond.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Upstream {
    /// Links, the sender's own first (in its fail-over order), then those its active parent
    /// reported.
    pub links: Vec<UpstreamLink>,
}

/// The health of a link, as the node at its lower end sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LinkState {
    /// Connected, no failure since.
    Up,
    /// Connected, but a request failed on it since it was dialled.
    Failing,
    /// Dial or probes failed.
    Down,
    /// A fall-back parent not dialled yet.
    Idle,
}

impl LinkState {
    /// `up`, `failing`, `down` or `idle`.
    pub fn as_str(self) -> &'static str {
        match self {
            LinkState::Up => "up",
            LinkState::Failing => "failing",
            LinkState::Down => "down",
            LinkState::Idle => "idle",
        }
    }
}

/// One link from `from` to a parent of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpstreamLink {
    /// The node at the lower end (the child side of this link).
    pub from: String,
    /// The parent's id, role and hosted layers, from its `Hello` (`None`: never reached).
    pub to: Option<UpstreamPeer>,
    /// The address `from` dials.
    pub addr: String,
    /// New requests of `from` go through this link.
    pub active: bool,
    /// Health as `from` sees it.
    pub state: LinkState,
    /// Smoothed round-trip time (ms).
    pub rtt_ms: f32,
    /// Smoothed goodput (bit/s).
    pub goodput_bps: f32,
    /// Confidence of the estimates, 0 (prior) to 1.
    pub confidence: f32,
    /// Probe rounds on this link so far.
    pub probes: u64,
    /// QUIC's view of the current connection (`None` when not connected).
    pub quic: Option<UpstreamQuic>,
}

/// QUIC's statistics of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct UpstreamQuic {
    /// QUIC's smoothed RTT (ms).
    pub rtt_ms: f32,
    /// UDP bytes sent.
    pub bytes_sent: u64,
    /// UDP bytes received.
    pub bytes_received: u64,
    /// Packets declared lost.
    pub lost_packets: u64,
}

/// The node at the upper end of a link, as its `Hello` named it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpstreamPeer {
    /// Its node id.
    pub node_id: String,
    /// Its tier.
    pub role: Role,
    /// The layer ranges it hosts.
    pub hosted: Vec<HostedLayers>,
}

impl Upstream {
    pub(crate) fn check(&self) -> crate::Result<()> {
        crate::Limits::check(
            "upstream.links",
            self.links.len() as u64,
            MAX_UPSTREAM_LINKS as u64,
        )?;
        for l in &self.links {
            let peer_id = l.to.as_ref().map_or("", |p| p.node_id.as_str());
            for (field, text) in [
                ("upstream.from", l.from.as_str()),
                ("upstream.addr", l.addr.as_str()),
                ("upstream.to.node_id", peer_id),
            ] {
                crate::Limits::check(field, text.len() as u64, MAX_UPSTREAM_TEXT as u64)?;
            }
            if let Some(p) = &l.to {
                crate::Limits::check(
                    "upstream.to.hosted",
                    p.hosted.len() as u64,
                    MAX_UPSTREAM_RANGES as u64,
                )?;
                if let Some(r) = p.hosted.iter().find(|r| r.start > r.end) {
                    return Err(crate::Error::malformed(
                        "upstream.to.hosted",
                        format!("layer range {}..{} is reversed", r.start, r.end),
                    ));
                }
            }
            for (field, v) in [
                ("upstream.rtt_ms", l.rtt_ms),
                ("upstream.goodput_bps", l.goodput_bps),
                ("upstream.quic.rtt_ms", l.quic.map_or(0.0, |q| q.rtt_ms)),
            ] {
                if !(v.is_finite() && v >= 0.0) {
                    return Err(crate::Error::malformed(
                        field,
                        format!("{v} is not a finite value ≥ 0"),
                    ));
                }
            }
            if !(0.0..=1.0).contains(&l.confidence) {
                return Err(crate::Error::malformed(
                    "upstream.confidence",
                    format!("{} is not a finite value in [0, 1]", l.confidence),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Codec, Message};

    pub(crate) fn sample() -> Upstream {
        Upstream {
            links: vec![UpstreamLink {
                from: "edge".into(),
                to: Some(UpstreamPeer {
                    node_id: "cloud".into(),
                    role: Role::Cloud,
                    hosted: vec![HostedLayers {
                        start: 20,
                        end: 30,
                        digest: [7; 32],
                    }],
                }),
                addr: "10.0.0.3:7000".into(),
                active: true,
                state: LinkState::Up,
                rtt_ms: 21.5,
                goodput_bps: 9.5e6,
                confidence: 0.8,
                probes: 42,
                quic: Some(UpstreamQuic {
                    rtt_ms: 20.9,
                    bytes_sent: 1234,
                    bytes_received: 5678,
                    lost_packets: 1,
                }),
            }],
        }
    }

    #[test]
    fn round_trips_and_says_which_version_it_needs() {
        let c = Codec::default();
        let m = Message::Upstream(sample());
        let bytes = c.encode(&m).unwrap();
        // frame prefix: magic, then the version the frame needs: Upstream came with 3, but
        // no frame says less than the oldest version spoken (4 since Open)
        assert_eq!(
            u16::from_le_bytes([bytes[4], bytes[5]]),
            UPSTREAM_SINCE_VERSION.max(crate::MIN_PROTOCOL_VERSION)
        );
        assert_eq!(c.decode(&bytes).unwrap(), m);
    }

    #[test]
    fn an_upstream_frame_claiming_an_older_protocol_is_refused() {
        let c = Codec::default();
        for old in [2u16, 3] {
            let mut bytes = c.encode(&Message::Upstream(sample())).unwrap();
            bytes[4..6].copy_from_slice(&old.to_le_bytes());
            let e = c.decode(&bytes).unwrap_err();
            assert_eq!(e.code(), crate::ErrorCode::VersionMismatch);
            assert!(
                e.to_string()
                    .contains(&format!("unsupported protocol version {old}")),
                "{e}"
            );
        }
    }

    #[test]
    fn bad_values_are_refused_naming_the_field() {
        let c = Codec::default();
        let mut u = sample();
        u.links[0].rtt_ms = f32::NAN;
        let e = c.encode(&Message::Upstream(u)).unwrap_err().to_string();
        assert!(e.contains("upstream.rtt_ms"), "{e}");
        let mut u = sample();
        u.links[0].confidence = 1.5;
        let e = c.encode(&Message::Upstream(u)).unwrap_err().to_string();
        assert!(e.contains("upstream.confidence"), "{e}");
        let mut u = sample();
        u.links = vec![u.links[0].clone(); MAX_UPSTREAM_LINKS + 1];
        let e = c.encode(&Message::Upstream(u)).unwrap_err().to_string();
        assert!(e.contains("upstream.links"), "{e}");
        let mut u = sample();
        if let Some(p) = u.links[0].to.as_mut() {
            p.hosted[0].start = 40;
        }
        let e = c.encode(&Message::Upstream(u)).unwrap_err().to_string();
        assert!(e.contains("reversed"), "{e}");
    }
}
