//! Fuzz the GGUF loader (`GgufFile::from_bytes`) and what a node does with a file it opened:
//! tensor table, every tensor dequantized, tokenizer and chat template from the metadata,
//! configuration, load and a forward of a small model
//! (`familial/tests/fuzz_harness/mod.rs::gguf_file`, which CI replays on the corpus).
//!
//! Run (stable toolchain, see docs/fuzzing.md):
//! `RUSTC_BOOTSTRAP=1 cargo fuzz run gguf_file -O -a fuzz/corpus/gguf_file familial/tests/fuzz_corpus/gguf_file familial/tests/fixtures/gguf/bad`
#![no_main]

#[allow(dead_code)]
#[path = "../../familial/tests/fuzz_harness/mod.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::gguf_file(data));
