//! # flow-familial
//!
//! Familial models: one transformer trunk whose early-exit branches are the small, medium
//! and large members of a family (AI-Flow-Ruyi). Members share the trunk, so their hidden
//! states are aligned and a model can be cut at any layer and continued on another node.
//!
//! Entry points:
//! - [`ModelConfig`] — HF `config.json` for `llama`, `qwen2`, `ruyi_qwen2`, `mixtral`,
//!   `qwen2_moe`, normalised (which block, norm and head every exit uses).
//! - [`FamilialModel`] — load a whole family or a [`Part`] (mmap, sharded, f32/f16/bf16) and
//!   run it: [`FamilialModel::embed`], [`FamilialModel::run_layers`],
//!   [`FamilialModel::exit`], [`FamilialModel::backfill`]. Batches are `[tokens, hidden]`
//!   with one [`Seg`] and one [`SeqCache`] per sequence.
//! - [`ModelSource`] — what `--model` points at: an HF directory or a GGUF file
//!   ([`gguf::GgufFile`]: mmap'd, validated, tensors under HF names), with its config,
//!   tokenizer ([`tokenizer::Tokenizer::from_gguf`], llama.cpp's pre-tokenizers), chat
//!   template ([`chat::ChatTemplate`], minijinja) and BOS rule.
//! - [`quant::QMatrix`] — quantized GGUF weights multiplied in place (activations quantized
//!   per 32-block, integer dot products, AVX2/VNNI with a portable fallback); [`proj`] holds
//!   a layer's dense or quantized weight; [`attention::causal_gqa`] keeps every row
//!   independent of the batch (speculation equals decoding on quantized models).
//! - [`family`] — Ruyi-style exits attached to a pretrained trunk, stored as a small overlay
//!   beside a verified reference to the base ([`family::Family`]), trained by distillation
//!   from the deepest exit with the trunk frozen ([`family::distill`]).
//! - [`confidence`] — max-prob, top-2 margin and entropy of exit logits; [`sample`] — greedy
//!   and temperature/top-p sampling.
//! - [`weights`] — checkpoint access and fingerprints; [`init`] — seeded checkpoints in the
//!   exact HF layouts (`flow-node model init`).
//! - [`tasks`] — built-in synthetic tasks (`add`, `lookup`, `reverse`, `mix`) and text data;
//!   [`train`] — joint training of every exit (AdamW, resume) and per-exit evaluation.
//!
//! Activations are f32 on the CPU; weights are f32 or, from GGUF files, stay quantized. Matmul threads come from `RAYON_NUM_THREADS`; call
//! [`set_compute_threads`] before any model work to bound them.

pub mod attention;
pub mod chat;
pub mod confidence;
pub mod config;
pub mod error;
pub mod family;
pub mod gguf;
pub mod init;
pub mod kernels;
pub mod kv;
pub mod layers;
pub mod model;
pub mod proj;
pub mod quant;
pub mod sample;
pub mod source;
pub mod tasks;
pub mod tokenizer;
pub mod train;
pub mod weights;

pub use config::{ExitSpec, Layout, ModelConfig};
pub use error::{Error, Result};
pub use kv::SeqCache;
pub use layers::{Mode, Seg};
pub use model::{FamilialModel, Part, Rows};
pub use source::ModelSource;

/// Bound the threads candle uses for matmuls and large elementwise ops. Call once at start,
/// before any tensor work, so model compute does not starve the IO runtime.
pub fn set_compute_threads(n: usize) {
    let n = n.max(1).to_string();
    // SAFETY-free in edition 2021; must run before other threads read the environment.
    std::env::set_var("RAYON_NUM_THREADS", &n);
    std::env::set_var("CANDLE_NUM_THREADS", "1");
}
