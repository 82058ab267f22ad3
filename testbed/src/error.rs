//! The one error type of `flow-testbed`.

use std::path::PathBuf;

/// Everything that can go wrong in the testbed library.
///
/// Messages name the file, line and field at fault so a user can fix their input.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing a file failed.
    #[error("{action} {path}: {source}")]
    File {
        /// What we were doing ("reading", "writing", "creating directory").
        action: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A socket operation of the link shaper failed.
    #[error("shaper: {context}: {source}")]
    Socket {
        /// What the shaper was doing.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The trace header lacks a required BurstGPT column.
    #[error(
        "trace header: missing column `{column}` (BurstGPT layout: Timestamp, Model, \
         Request tokens, Response tokens, Total tokens, Log Type[, Session ID, Elapsed time])"
    )]
    TraceHeader {
        /// The missing column.
        column: &'static str,
    },
    /// A trace row could not be parsed.
    #[error("trace line {line}, column `{column}`: {reason}")]
    TraceRow {
        /// 1-based line number in the CSV file (the header is line 1).
        line: u64,
        /// The column at fault (or `*` for the whole row).
        column: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A TOML file (shaper schedule, scenario) failed to parse or validate.
    #[error("{what} line {line}, field `{field}`: {reason}")]
    Toml {
        /// Which kind of file ("scenario", "shaper schedule").
        what: &'static str,
        /// 1-based line number (0 when unknown).
        line: usize,
        /// The field at fault.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A configuration value is out of range.
    #[error("invalid {field}: {reason}")]
    Config {
        /// The field at fault.
        field: &'static str,
        /// What is wrong with it and what is accepted.
        reason: String,
    },
    /// Drawing or encoding a plot failed.
    #[error("plot {path}: {reason}")]
    Plot {
        /// The plot file being produced.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// JSON serialization failed.
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
    /// CSV writing failed.
    #[error("csv: {0}")]
    Csv(#[from] csv::Error),
}

/// `Result` with the testbed [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn file(
        action: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        Error::File {
            action,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn socket(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Socket {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn config(field: &'static str, reason: impl Into<String>) -> Self {
        Error::Config {
            field,
            reason: reason.into(),
        }
    }
}

/// 1-based line number of byte offset `offset` in `text`.
pub(crate) fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// Turn a `toml` parse error into [`Error::Toml`], keeping its line number.
pub(crate) fn toml_error(what: &'static str, text: &str, err: toml::de::Error) -> Error {
    let line = err.span().map(|s| line_of(text, s.start)).unwrap_or(0);
    Error::Toml {
        what,
        line,
        field: "*".to_string(),
        reason: err.message().to_string(),
    }
}
