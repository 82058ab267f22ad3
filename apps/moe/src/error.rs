//! The one error type of `flow-moe`.

use std::path::PathBuf;

/// What can go wrong while profiling, retrieving patterns or serving with pruned experts.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The model failed (loading an expert, a forward pass).
    #[error(transparent)]
    Model(#[from] flow_familial::Error),
    /// A pattern-store file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A stored pattern is malformed or does not fit the model.
    #[error("pattern {path}: {msg}")]
    Pattern { path: PathBuf, msg: String },
    /// Bad input from a caller (empty calibration set, unknown task, bad budget...).
    #[error("{0}")]
    Invalid(String),
    /// The expert memory budget cannot hold the experts a pattern needs.
    #[error("expert memory budget of {budget} bytes cannot hold the {need} bytes of the {experts} experts this pattern keeps; raise the budget or keep fewer experts")]
    Budget {
        budget: usize,
        need: usize,
        experts: usize,
    },
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Model(flow_familial::Error::from(e))
    }
}

impl Error {
    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// `Result` with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
