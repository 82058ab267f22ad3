//! The one error type of `flow-node`'s library, and the wire code each failure is reported
//! to a peer with ([`NodeError::code`]).

use flow_protocol::ErrorCode;

/// Everything that can fail inside an agent. Failures of the crates below keep their typed
/// source (`#[from]`); the `String` variants are this crate's own findings.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// Bad configuration (file, flags, or builder calls).
    #[error("configuration: {0}")]
    Config(String),
    /// Model loading or compute failed (this crate's own finding).
    #[error("model: {0}")]
    Model(String),
    /// The model crate failed: loading, a malformed checkpoint, a forward pass.
    #[error(transparent)]
    Familial(#[from] flow_familial::Error),
    /// A tensor operation failed.
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
    /// The model cache failed (pull, import, a wrong hash).
    #[error(transparent)]
    Store(#[from] crate::model_store::StoreError),
    /// The peer sent something this state does not expect (this crate's own finding).
    #[error("protocol: {0}")]
    Protocol(String),
    /// The peer sent a well-formed message its stream's state does not allow (a `Continue`
    /// before the stream's `Open`, a second `Open`).
    #[error("unexpected message: {0}")]
    Unexpected(String),
    /// The wire failed: a frame that does not decode, a limit, the transport.
    #[error(transparent)]
    Wire(#[from] flow_protocol::Error),
    /// The parent tier could not be reached or failed the request.
    #[error("parent {addr}: {msg}")]
    Parent { addr: String, msg: String },
    /// The session's KV was evicted under memory pressure.
    #[error("{0}")]
    Evicted(String),
    /// The request was malformed (bad prompt, unknown exit, ...).
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The node is overloaded or shutting down.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// A bug: something that should not happen.
    #[error("internal: {0}")]
    Internal(String),
}

impl NodeError {
    /// The wire code a peer sees when this error fails its request. A child reads
    /// [`ErrorCode::is_refusal`] codes as "what you sent is wrong" (fail over, never
    /// degrade) and [`ErrorCode::Overloaded`] as "retry elsewhere or later".
    pub fn code(&self) -> ErrorCode {
        match self {
            NodeError::Wire(e) => e.code(),
            NodeError::Protocol(_) | NodeError::BadRequest(_) => ErrorCode::Malformed,
            NodeError::Unexpected(_) => ErrorCode::Unexpected,
            NodeError::Evicted(_) | NodeError::Unavailable(_) => ErrorCode::Overloaded,
            NodeError::Config(_)
            | NodeError::Model(_)
            | NodeError::Familial(_)
            | NodeError::Tensor(_)
            | NodeError::Store(_)
            | NodeError::Parent { .. }
            | NodeError::Internal(_) => ErrorCode::Internal,
        }
    }
}

/// Result alias.
pub type Result<T> = std::result::Result<T, NodeError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_map_to_wire_codes() {
        let code = |e: NodeError| e.code();
        assert_eq!(code(NodeError::Protocol("x".into())), ErrorCode::Malformed);
        assert_eq!(
            code(NodeError::Unexpected("x".into())),
            ErrorCode::Unexpected
        );
        assert_eq!(
            code(NodeError::BadRequest("x".into())),
            ErrorCode::Malformed
        );
        assert_eq!(code(NodeError::Evicted("x".into())), ErrorCode::Overloaded);
        assert_eq!(
            code(NodeError::Unavailable("x".into())),
            ErrorCode::Overloaded
        );
        assert_eq!(code(NodeError::Internal("x".into())), ErrorCode::Internal);
        // A typed wire failure keeps its own code.
        let wire = flow_protocol::Error::UnknownKind(200);
        assert_eq!(code(NodeError::from(wire)), ErrorCode::UnknownKind);
        let version = flow_protocol::Error::UnsupportedVersion {
            got: 9,
            min: 1,
            max: 3,
        };
        assert_eq!(code(version.into()), ErrorCode::VersionMismatch);
        assert!(ErrorCode::VersionMismatch.is_refusal());
        assert!(!ErrorCode::Overloaded.is_refusal());
    }

    #[test]
    fn typed_sources_are_kept() {
        let e = NodeError::from(flow_protocol::Error::UnknownKind(7));
        let source = std::error::Error::source(&e).map(|s| s.to_string());
        // Transparent: the wire error's own message, its own source chain (none here).
        assert_eq!(e.to_string(), "unknown message kind 7");
        assert!(source.is_none());
        assert!(matches!(
            e,
            NodeError::Wire(flow_protocol::Error::UnknownKind(7))
        ));
    }
}
