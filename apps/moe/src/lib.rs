//! # flow-moe
//!
//! Cloud-tier serving of Mixture-of-Experts families: task-conditioned expert pruning and
//! retrieval (PreMoe), and continuous batching with chunked prefill (Sarathi-Serve).
//!
//! Entry points:
//! - [`profile::profile`] — expert importance per task from router logits (expected
//!   selection score per layer per expert, ranking, retrieval key);
//!   [`store::save_pattern`] / [`store::PatternStore`] — the on-disk pattern store (one JSON
//!   per task) with retrieval behind the [`store::PatternIndex`] trait
//!   ([`store::ExactIndex`]: exact nearest neighbour); [`profile::signature`] — a
//!   request's key from the first MoE layer's router over its prompt.
//! - [`experts::PrunedModel`] — a family loaded without experts; `prepare(pattern, k)`
//!   pages the pattern's top-`k` experts per layer in from the mmapped checkpoint, evicts
//!   others under a memory budget, and restricts routing to them;
//!   [`experts::ExpertCache`] — the same on any model part.
//! - [`cloud::PrunedServing`] — pruned serving in a node hosting a part of the family (the
//!   cloud role of `flow-node node --moe-patterns DIR --moe-experts K`): per session, a
//!   signature at the first hosted MoE layer retrieves a pattern; batches are run with that
//!   pattern's experts resident.
//! - [`scheduler::Scheduler`] — the pure chunked-prefill scheduler (token budget, decodes
//!   first, FCFS admission under KV capacity, counted preemption);
//!   [`scheduler::plan_chunks`] — its budget-splitting core, used by the node engine;
//!   [`serve::replay`] — a serving loop driving a real model with it (benchmarks).
//!
//! `flow-node moe profile` and `flow-node bench moe|batching` are the command-line faces.

pub mod cloud;
pub mod error;
pub mod experts;
pub mod profile;
pub mod scheduler;
pub mod serve;
pub mod store;

pub use error::{Error, Result};
