//! Fuzz `config.json` parsing (`ModelConfig::from_json_str`) and what a node derives from an
//! accepted configuration: exits, tensor names, the `to_hf_json` round trip
//! (`familial/tests/fuzz_harness/mod.rs::model_config`, which CI replays on the corpus). No
//! panic, and nothing sized by a number in the file beyond `flow_familial::config::MAX_*`.
//!
//! Run (stable toolchain, see docs/fuzzing.md):
//! `RUSTC_BOOTSTRAP=1 cargo fuzz run model_config -O -a fuzz/corpus/model_config familial/tests/fuzz_corpus/model_config`
#![no_main]

#[allow(dead_code)]
#[path = "../../familial/tests/fuzz_harness/mod.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::model_config(data));
