//! The one error type of `flow-node`'s library.

/// Everything that can fail inside an agent.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// Bad configuration (file, flags, or builder calls).
    #[error("configuration: {0}")]
    Config(String),
    /// Model loading or compute failed.
    #[error("model: {0}")]
    Model(String),
    /// The wire or the peer misbehaved.
    #[error("protocol: {0}")]
    Protocol(String),
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

impl From<flow_familial::Error> for NodeError {
    fn from(e: flow_familial::Error) -> Self {
        NodeError::Model(e.to_string())
    }
}

impl From<candle_core::Error> for NodeError {
    fn from(e: candle_core::Error) -> Self {
        NodeError::Model(e.to_string())
    }
}

impl From<flow_protocol::Error> for NodeError {
    fn from(e: flow_protocol::Error) -> Self {
        NodeError::Protocol(e.to_string())
    }
}

impl From<crate::model_store::StoreError> for NodeError {
    fn from(e: crate::model_store::StoreError) -> Self {
        NodeError::Model(e.to_string())
    }
}

/// Result alias.
pub type Result<T> = std::result::Result<T, NodeError>;
