//! Fuzz the OpenAI request checks of the HTTP API (`flow_node::http::params::{chat,
//! completion}`) with arbitrary bodies (`node/tests/fuzz_harness/mod.rs::openai_request`,
//! which CI replays on the corpus and on proptest mutations). Bodies are bounded by
//! `--max-body-bytes` before they reach this code.
//!
//! Run (stable toolchain, see docs/fuzzing.md):
//! `RUSTC_BOOTSTRAP=1 cargo fuzz run openai_request -O -a fuzz/corpus/openai_request node/tests/fuzz_corpus/openai_request`
#![no_main]

#[allow(dead_code)]
#[path = "../../node/tests/fuzz_harness/mod.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::openai_request(data));
