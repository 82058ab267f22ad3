//! Fuzz the planner input a node reads with `--plan FILE`
//! (`flow_node::planning::plan_input_from_json`) and what the node does with an accepted one:
//! the initial plan with a live uplink estimate, what it applies, re-plans
//! (`node/tests/fuzz_harness/mod.rs::plan_file`, which CI replays on the corpus).
//!
//! Run (stable toolchain, see docs/fuzzing.md):
//! `RUSTC_BOOTSTRAP=1 cargo fuzz run plan_file -O -a fuzz/corpus/plan_file node/tests/fuzz_corpus/plan_file`
#![no_main]

#[allow(dead_code)]
#[path = "../../node/tests/fuzz_harness/mod.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::plan_file(data));
