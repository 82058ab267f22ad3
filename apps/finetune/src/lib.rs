//! # flow-finetune
//!
//! Edge-side personalisation of a familial model: sparse fine-tuning of the shallow members,
//! delta checkpoints that devices apply, and hierarchical federated averaging.
//!
//! - [`scheme`] — sparse update schemes as configuration ([`Scheme`]: exit heads, biases and
//!   norms, channel slices by weight magnitude, FFN output channels (`ffn-out`), LoRA,
//!   full) and their plans.
//! - [`sparse`] — [`SparseTrainer`]: only the planned slices are candle `Var`s, so the
//!   backward graph is pruned by construction; per-parameter AdamW updates.
//! - [`select`] — memory estimate per scheme and the contribution analysis that picks the
//!   best scheme within a memory budget ([`select::choose`]).
//! - [`delta`] — [`Delta`]: only the changed tensors, with the base fingerprint and a
//!   version, as one safetensors file.
//! - [`aggregate`] — FedAvg weighted by samples and hierarchical rounds with deadlines
//!   ([`aggregate::run_round`], [`aggregate::federate`]).
//! - [`data`] — fine-tuning data, including the benchmark's shifted `add-long` domain.
//! - [`mem`] — an opt-in counting allocator for measuring peak training memory.
//! - [`words`] — `word-category`, the task for a pretrained chat model (SmolLM2): held-out
//!   words, a fixed answer format, exact-match accuracy ([`words::accuracy`]).
//!
//! On a pretrained GGUF base, [`SparseTrainer::over_source`] reads the frozen weights in
//! place (quantized kernels, no copies) and holds f32 master copies of the trained slices
//! only.
//!
//! The CLI is `flow-node finetune`; the benchmark `flow-node bench finetune`.

pub mod aggregate;
pub mod data;
pub mod delta;
pub mod error;
pub mod mem;
pub mod scheme;
pub mod select;
pub mod sparse;
pub mod words;

pub use delta::Delta;
pub use error::{Error, Result};
pub use scheme::Scheme;
pub use sparse::{FtOptions, SparseTrainer};
