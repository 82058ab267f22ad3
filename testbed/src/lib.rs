//! `flow-testbed`: the pieces of the aiflow testbed that run without Docker.
//!
//! A testbed run replays realistic load against device/edge/cloud nodes that talk QUIC over
//! emulated links, injects faults at given times, and writes a report. This crate holds the
//! library parts; the compose files and the `flow-node testbed` CLI drive them.
//!
//! | idea | module | entry points |
//! |---|---|---|
//! | user-space UDP link shaper | [`shaper`] | [`shaper::LinkModel`] (sans-IO core), [`shaper::ShaperHandle::spawn`] (tokio relay), [`shaper::LinkSchedule`] (changes over time) |
//! | BurstGPT traces | [`trace`] | [`trace::Trace::load`], [`trace::Trace::parse`], [`trace::SyntheticConfig::generate`] |
//! | open-loop load generation | [`loadgen`] | [`loadgen::Schedule::from_trace`], [`loadgen::run_open_loop`] |
//! | fault scenarios | [`scenario`] | [`scenario::Scenario::load`], [`scenario::ScenarioTimeline`] |
//! | reports | [`report`] | [`report::Summary::compute`], [`report::write_report`] |
//!
//! Design rules (see `DESIGN.md` / `STYLE.md`): time-dependent logic is sans-IO and takes the
//! current time as an argument, so it is unit-tested with virtual time; the async parts read
//! tokio's clock so tests can use `tokio::time::pause()`; every queue is bounded and says
//! what happens when it is full; one [`Error`] enum.

pub mod error;
pub mod loadgen;
pub mod report;
pub mod scenario;
pub mod shaper;
pub mod trace;

pub use error::{Error, Result};
