//! The one error type of `flow-familial`.

use std::path::PathBuf;

/// Everything that can go wrong while loading, running or training a familial model.
///
/// Messages name the file, tensor or field at fault and, where there is one, what to do.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `config.json` is malformed or inconsistent.
    #[error("config {path}: {msg}")]
    Config { path: PathBuf, msg: String },
    /// `model_type` names an architecture this crate does not implement.
    #[error(
        "unsupported model_type `{0}`: supported are llama, qwen2, ruyi_qwen2, mixtral, qwen2_moe"
    )]
    UnknownModelType(String),
    /// A tensor the layout requires is absent from every checkpoint file.
    #[error("tensor `{name}` is missing from the checkpoint (expected shape {expected:?}); is the checkpoint complete and of the layout config.json declares?")]
    MissingTensor { name: String, expected: Vec<usize> },
    /// A tensor exists but has the wrong shape.
    #[error("tensor `{name}` has shape {got:?}, expected {expected:?}")]
    ShapeMismatch {
        name: String,
        got: Vec<usize>,
        expected: Vec<usize>,
    },
    /// A tensor is stored in a dtype we cannot load.
    #[error("tensor `{name}` has dtype {got}, expected one of f32, f16, bf16")]
    BadDtype { name: String, got: String },
    /// A GGUF file is malformed, truncated, or describes a model we cannot run.
    #[error("GGUF {path}: {msg}")]
    Gguf { path: PathBuf, msg: String },
    /// A checkpoint file is truncated, corrupt, or its index is inconsistent.
    #[error("checkpoint {path}: {msg}")]
    Checkpoint { path: PathBuf, msg: String },
    /// A call asked this model part for a layer or exit it does not host.
    #[error(
        "{what} is not hosted by this model part (hosted trunk layers {hosted:?}, exits {exits:?})"
    )]
    NotHosted {
        what: String,
        hosted: std::ops::Range<usize>,
        exits: Vec<usize>,
    },
    /// The KV cache does not hold what a call needs (a gap that needs a backfill first).
    #[error("kv cache: {0}")]
    Kv(String),
    /// A caller passed arguments that do not fit together.
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// Tokenizer loading or encoding failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A GGUF metadata key is missing, of the wrong type or holds an unusable value.
    #[error("GGUF metadata `{key}`: {msg}")]
    GgufMetadata { key: String, msg: String },
    /// A chat template failed to compile or to render (including `raise_exception`).
    #[error("chat template: {0}")]
    ChatTemplate(String),
    /// A quantized matrix is stored in a dtype the quant kernels do not implement.
    #[error("quantized matrix: dtype {0} is not supported (supported: f32, f16, bf16, q4_0, q4_1, q5_0, q5_1, q8_0, q4k, q5k, q6k)")]
    UnsupportedQuant(String),
    /// A quantized matrix or its input does not fit together: byte range, length,
    /// alignment, block size or shape (the message names which).
    #[error("quantized matrix: {0}")]
    Quant(String),
    /// An error from candle's tensor library.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result alias used throughout the crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Return early with [`Error::Invalid`].
#[macro_export]
macro_rules! bail {
    ($($arg:tt)*) => {
        return Err($crate::Error::Invalid(format!($($arg)*)))
    };
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
