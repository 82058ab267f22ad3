//! The crate's one error type.
//!
//! Every limit violation names the field that broke it, so a log line says what to change
//! (`FrameTooLarge { field: "payload_len", got: 70000000, limit: 67108864 }`).

use crate::message::ErrorCode;

/// Result alias used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong while encoding, decoding or transporting frames.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The first four bytes of a frame were not `AIFL`: the peer does not speak this protocol
    /// or the stream lost alignment.
    #[error("bad frame magic {got:02x?}: the peer does not speak the aiflow protocol")]
    BadMagic {
        /// The bytes received instead of the magic.
        got: [u8; 4],
    },
    /// The frame's protocol version is not one this build can read.
    #[error("unsupported protocol version {got} (this node speaks {min}..={max})")]
    UnsupportedVersion {
        /// Version in the frame.
        got: u16,
        /// Oldest version this build reads.
        min: u16,
        /// Newest version this build reads.
        max: u16,
    },
    /// The frame's kind byte is unknown.
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    /// A length field is larger than the configured limit (checked before allocating).
    #[error("frame too large: {field} = {got} exceeds the limit {limit} (raise Limits::{field} if intended)")]
    FrameTooLarge {
        /// Which length field.
        field: &'static str,
        /// Value found.
        got: u64,
        /// Configured limit.
        limit: u64,
    },
    /// A tensor or message field is beyond a configured limit (rank, dim, elements, sessions).
    #[error("limit exceeded: {field} = {got} exceeds the limit {limit}")]
    LimitExceeded {
        /// Which field.
        field: &'static str,
        /// Value found.
        got: u64,
        /// Configured limit.
        limit: u64,
    },
    /// A length does not agree with the shape and encoding that describe it.
    #[error("length mismatch in {field}: expected {expected} bytes, got {got}")]
    LengthMismatch {
        /// Which field.
        field: &'static str,
        /// Bytes implied by shape × encoding.
        expected: u64,
        /// Bytes present.
        got: u64,
    },
    /// A frame is structurally wrong (bad enum tag, trailing bytes, truncated section...).
    #[error("malformed frame: {field}: {reason}")]
    Malformed {
        /// Which field.
        field: &'static str,
        /// What was wrong.
        reason: String,
    },
    /// A tensor holds NaN or infinity where finite values were required.
    #[error("non-finite value in {field} at element {index}")]
    NonFinite {
        /// Which tensor.
        field: &'static str,
        /// Flat index of the first bad element.
        index: usize,
    },
    /// Caller-side misuse: shapes that do not match data, a too-small output buffer...
    #[error("invalid argument {field}: {reason}")]
    InvalidArgument {
        /// Which argument.
        field: &'static str,
        /// What was wrong.
        reason: String,
    },
    /// A request stream's step message is inconsistent (shape, positions, draft length,
    /// backfill).
    #[error("invalid step message: {0}")]
    Step(#[from] crate::step::StepError),
    /// The postcard header could not be (de)serialised.
    #[error("header serialisation: {0}")]
    Postcard(#[from] postcard::Error),
    /// zstd failed (or a compressed section would expand past its declared size).
    #[error("zstd: {0}")]
    Zstd(String),
    /// The peer refused us (or we refused the peer) during the Hello exchange.
    #[error("refused ({code:?}): {message}")]
    Refused {
        /// Typed reason.
        code: ErrorCode,
        /// Human-readable explanation naming what did not match.
        message: String,
    },
    /// The peer sent an `Error` frame where a different message was expected.
    #[error("peer error ({code:?}): {message}")]
    Peer {
        /// Typed code from the peer.
        code: ErrorCode,
        /// Peer's message.
        message: String,
    },
    /// Certificates, keys or TLS configuration.
    #[error("tls: {0}")]
    Tls(String),
    /// Filesystem or socket IO.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// QUIC connection, stream or endpoint failure.
    #[error("quic: {0}")]
    Quic(String),
    /// A peer's certificate does not carry the role we require.
    #[error("role check failed: {0}")]
    Role(String),
    /// `--insecure-loopback` used with an address that is not loopback.
    #[error("insecure-loopback mode refuses non-loopback address {0}: use mutual TLS (flow-node certs init/issue) for real networks")]
    NotLoopback(std::net::SocketAddr),
    /// An operation did not complete in time.
    #[error("timed out: {0}")]
    Timeout(&'static str),
    /// The stream or connection ended.
    #[error("closed: {0}")]
    Closed(String),
}

impl Error {
    /// The wire [`ErrorCode`] that best describes this error when reported to a peer.
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::BadMagic { .. }
            | Error::Malformed { .. }
            | Error::Step(_)
            | Error::Postcard(_) => ErrorCode::Malformed,
            Error::UnsupportedVersion { .. } => ErrorCode::VersionMismatch,
            Error::UnknownKind(_) => ErrorCode::UnknownKind,
            Error::FrameTooLarge { .. } => ErrorCode::FrameTooLarge,
            Error::LimitExceeded { field, .. } if *field == "sessions" => {
                ErrorCode::TooManySessions
            }
            Error::LimitExceeded { .. } | Error::LengthMismatch { .. } => ErrorCode::LimitExceeded,
            Error::NonFinite { .. } => ErrorCode::NonFinite,
            Error::Refused { code, .. } | Error::Peer { code, .. } => *code,
            Error::Role(_) | Error::Tls(_) | Error::NotLoopback(_) => ErrorCode::Unauthorized,
            Error::Timeout(_) => ErrorCode::DeadlineExceeded,
            _ => ErrorCode::Internal,
        }
    }

    pub(crate) fn malformed(field: &'static str, reason: impl Into<String>) -> Self {
        Error::Malformed {
            field,
            reason: reason.into(),
        }
    }

    pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidArgument {
            field,
            reason: reason.into(),
        }
    }
}
