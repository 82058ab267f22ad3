//! Messages that push a fine-tuned delta checkpoint from an edge to its devices.
//!
//! A transfer is one session stream: edge → device [`DeltaOffer`] (base fingerprint,
//! version, size, SHA-256 of the whole file, chunk count), then [`DeltaChunk`]s in order,
//! then device → edge [`DeltaAck`] (applied, or refused with the reason). [`DeltaRollback`]
//! asks a device to return to the version before `from_version`. [`RoundUpdate`] frames a
//! federated round: the aggregator (a parent) asks a child for its update of a round, and
//! the child answers with its sample count followed by the update as a delta transfer. The delta file itself is
//! opaque bytes here (a safetensors file, see `flow-finetune`); chunks carry it in the
//! postcard header, bounded by [`DELTA_CHUNK_BYTES`], so a transfer never needs a frame
//! larger than that plus a few bytes, and the receiver allocates at most the announced
//! size, itself bounded by [`MAX_DELTA_BYTES`].

use serde::{Deserialize, Serialize};

/// Largest chunk of a delta transfer, bytes.
pub const DELTA_CHUNK_BYTES: usize = 128 << 10;
/// Largest delta a transfer may announce, bytes.
pub const MAX_DELTA_BYTES: u64 = 256 << 20;
/// Longest free-text field (scheme name, ack message), bytes.
pub const MAX_DELTA_TEXT: usize = 1024;

/// Start of a delta transfer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeltaOffer {
    /// Transfer id (echoed in chunks and the ack).
    pub update_id: u64,
    /// Fingerprint of the base checkpoint the delta applies to.
    pub base_digest: [u8; 32],
    /// Version of the delta (>= 1; the device refuses one not newer than what it runs).
    pub version: u64,
    /// Size of the delta file.
    pub total_bytes: u64,
    /// Number of chunks (= `total_bytes` / [`DELTA_CHUNK_BYTES`], rounded up).
    pub chunks: u32,
    /// SHA-256 of the whole delta file.
    pub sha256: [u8; 32],
    /// Scheme that produced it (informational).
    pub scheme: String,
}

/// One piece of the delta file, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeltaChunk {
    /// Transfer id.
    pub update_id: u64,
    /// 0-based chunk index.
    pub index: u32,
    /// Bytes (1 ..= [`DELTA_CHUNK_BYTES`]).
    pub data: Vec<u8>,
}

/// What the device did with a transfer or a rollback.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeltaStatus {
    /// The delta is live; `version` is the new version.
    Applied,
    /// Refused (wrong base, old version, bad digest, malformed); `version` is unchanged.
    Refused,
    /// Rolled back; `version` is the version now live.
    RolledBack,
}

/// The device's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeltaAck {
    /// Transfer id.
    pub update_id: u64,
    /// Outcome.
    pub status: DeltaStatus,
    /// The version live on the device after this.
    pub version: u64,
    /// Why, for humans.
    pub message: String,
}

/// Ask a device to undo version `from_version` (it must be the live one).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeltaRollback {
    /// Request id (echoed in the ack).
    pub update_id: u64,
    /// The version to undo.
    pub from_version: u64,
}

/// One federated-averaging round on a session the aggregator (the parent) opened.
///
/// Aggregator → participant: `RoundUpdate { samples: 0, .. }` asks for the participant's
/// update of `round` within `deadline_ms`. Participant → aggregator: `RoundUpdate` with the
/// samples behind its update (the FedAvg weight), then a [`DeltaOffer`] and its
/// [`DeltaChunk`]s carrying the trained tensors; the aggregator answers with a [`DeltaAck`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoundUpdate {
    /// Round number (>= 1).
    pub round: u64,
    /// Training samples behind the update (0 in the aggregator's request).
    pub samples: u64,
    /// How long the aggregator waits for this answer, ms.
    pub deadline_ms: u64,
}

impl RoundUpdate {
    pub(crate) fn check(&self) -> crate::Result<()> {
        if self.round == 0 {
            return Err(crate::Error::malformed(
                "round_update.round",
                "rounds are numbered from 1",
            ));
        }
        Ok(())
    }
}

impl DeltaOffer {
    /// The chunk count a transfer of `total_bytes` must announce.
    pub fn chunks_for(total_bytes: u64) -> u32 {
        total_bytes.div_ceil(DELTA_CHUNK_BYTES as u64) as u32
    }

    pub(crate) fn check(&self) -> crate::Result<()> {
        if self.total_bytes == 0 || self.total_bytes > MAX_DELTA_BYTES {
            return Err(crate::Error::LimitExceeded {
                field: "delta_offer.total_bytes",
                got: self.total_bytes,
                limit: MAX_DELTA_BYTES,
            });
        }
        let want = Self::chunks_for(self.total_bytes);
        if self.chunks != want {
            return Err(crate::Error::LengthMismatch {
                field: "delta_offer.chunks",
                expected: u64::from(want),
                got: u64::from(self.chunks),
            });
        }
        if self.version == 0 {
            return Err(crate::Error::malformed(
                "delta_offer.version",
                "version 0 is the base itself",
            ));
        }
        check_text("delta_offer.scheme", &self.scheme)
    }
}

impl DeltaChunk {
    pub(crate) fn check(&self) -> crate::Result<()> {
        if self.data.is_empty() {
            return Err(crate::Error::malformed("delta_chunk.data", "empty chunk"));
        }
        crate::Limits::check(
            "delta_chunk.data",
            self.data.len() as u64,
            DELTA_CHUNK_BYTES as u64,
        )
    }
}

pub(crate) fn check_text(field: &'static str, s: &str) -> crate::Result<()> {
    crate::Limits::check(field, s.len() as u64, MAX_DELTA_TEXT as u64)
}
