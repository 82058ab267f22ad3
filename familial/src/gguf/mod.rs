//! GGUF checkpoints (llama.cpp's single-file format): the header and metadata are parsed by
//! candle's maintained reader (`candle_core::quantized::gguf_file`, which bounds every
//! length before allocating); the file itself is memory-mapped and tensors are handed out
//! as zero-copy views into the mapping, so a node pages in only the layers it hosts.
//!
//! Entry points:
//! - [`GgufFile::open`] — parse, validate every tensor's extent against the file, mmap.
//! - [`GgufFile::config`] — `general.architecture` (`llama`, `qwen2`) and its keys → the
//!   crate's [`ModelConfig`](crate::ModelConfig).
//! - [`GgufFile`] implements [`TensorSource`](crate::weights::TensorSource) under HF tensor
//!   names (`model.layers.3.self_attn.q_proj.weight` ↔ `blk.3.attn_q.weight`), so the
//!   decoder, split points and exits work on GGUF models exactly as on HF checkpoints.
//!
//! Why candle's reader and not ours: it is maintained, bounds string/array lengths and
//! counts against the file size (llama.cpp's caps), and is what candle's own quantized
//! models use. What it does not do, we add here: per-tensor extent and alignment checks,
//! overflow-checked element counts, and mapping instead of reading tensors into memory.

mod config;
mod file;
mod inspect;
mod names;
mod walk;

pub use config::config_json;
pub use file::{GgufFile, TensorEntry};
pub use names::{gguf_name, hf_name};
