//! # flow-node: the aiflow agent
//!
//! Every tier of a device → edge → cloud cluster runs the same [`Agent`]. A node hosts a
//! [`Stage`] of a familial model — trunk layers `[a, b)` and the exit at `b` — and decides
//! per token whether its exit is confident enough to answer or whether to ship the hidden
//! state to its parent, which continues from layer `b` with no recomputation.
//!
//! Entry points:
//! - [`Agent::start`] with an [`AgentConfig`]: load the node's part of the model (mmap,
//!   only the hosted tensors), start the engine thread, listen for children over QUIC with
//!   mutual TLS, connect to the parent.
//! - [`Agent::generate`] on the entry node: a stream of [`GenEvent`]s, in one of four
//!   modes ([`flow_protocol::InferMode`]): `route` (one exit for the whole request),
//!   `escalate` (per-token confidence escalation with exact KV backfill), `speculate` (the
//!   device drafts, the top tier verifies a whole draft in one batched pass), `local`.
//! - [`engine`] — the compute thread with continuous batching across sessions;
//!   [`session`] — one request at one tier: a sans-IO state machine and its driver; [`metrics`] — Prometheus text;
//!   [`delta`] — versioned weights and delta-checkpoint transfers from edge to device;
//!   [`fleet`] — deltas distributed down a running cluster ([`Agent::distribute`]) and
//!   federated rounds aggregated up it ([`Agent::federate`]);
//!   [`model_store`] — the local cache of real models (`flow-node model pull`) and
//!   [`model_store::resolve_model`] for `--model` arguments.

// Outside tests, failures are errors with context; an invariant that cannot fail says why
// under a scoped #[allow] (node/clippy.toml lets tests unwrap).
#![warn(clippy::unwrap_used, clippy::expect_used)]

pub mod agent;
pub mod calibration;
pub mod cluster;
pub mod delta;
pub mod engine;
pub mod error;
pub mod fleet;
pub mod http;
pub mod metrics;
pub mod model_store;
pub mod parent;
pub mod planning;
pub mod session;

pub use agent::{
    Agent, AgentBuilder, AgentConfig, GenEvent, GenStats, GenerateRequest, MoePruning,
};
pub use engine::{EngineConfig, Stage};
pub use error::{NodeError, Result};
