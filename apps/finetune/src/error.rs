//! The crate's error type.

use std::path::PathBuf;

/// Everything that can go wrong in fine-tuning, deltas and aggregation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Model(#[from] flow_familial::Error),
    #[error("tensor math: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("invalid {what}: {msg}")]
    Invalid { what: &'static str, msg: String },
    #[error("{path}: {msg}")]
    File { path: PathBuf, msg: String },
    #[error("delta refused: {0}")]
    DeltaRefused(String),
    #[error("aggregation: {0}")]
    Aggregate(String),
}

impl Error {
    /// A bad value of `what`.
    pub fn invalid(what: &'static str, msg: impl Into<String>) -> Self {
        Error::Invalid {
            what,
            msg: msg.into(),
        }
    }

    pub(crate) fn file(path: &std::path::Path, msg: impl std::fmt::Display) -> Self {
        Error::File {
            path: path.to_path_buf(),
            msg: msg.to_string(),
        }
    }
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
