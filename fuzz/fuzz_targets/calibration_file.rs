//! Fuzz the calibration file (`MODEL/aiflow_calibration.json`,
//! `flow_node::calibration::CalibrationFile::from_json_str`) and what nodes and the planner
//! do with an accepted one: the request policy, the planner's exits for the family, a plan
//! on three tiers and re-plans (`node/tests/fuzz_harness/mod.rs::calibration_file`, which CI
//! replays on the corpus).
//!
//! Run (stable toolchain, see docs/fuzzing.md):
//! `RUSTC_BOOTSTRAP=1 cargo fuzz run calibration_file -O -a fuzz/corpus/calibration_file node/tests/fuzz_corpus/calibration_file`
#![no_main]

#[allow(dead_code)]
#[path = "../../node/tests/fuzz_harness/mod.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::calibration_file(data));
