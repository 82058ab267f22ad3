//! Fuzz an HF checkpoint's tokenizer files: the input is `tokenizer.json`, then (after the
//! first NUL byte) `tokenizer_config.json`, beside a fixed tiny `config.json` and
//! `model.safetensors` in a directory under /dev/shm; then the tokenizer (encode, decode),
//! the chat template (compile, render) and the BOS rule
//! (`familial/tests/fuzz_harness/mod.rs::hf_tokenizer`, which CI replays on the corpus).
//!
//! Run (stable toolchain, see docs/fuzzing.md):
//! `RUSTC_BOOTSTRAP=1 cargo fuzz run hf_tokenizer -O -a fuzz/corpus/hf_tokenizer familial/tests/fuzz_corpus/hf_tokenizer`
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

#[allow(dead_code)]
#[path = "../../familial/tests/fuzz_harness/mod.rs"]
mod harness;

/// This process's checkpoint directory.
fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| harness::tokenizer_dir(&harness::process_dir("aiflow-fuzz-tok")))
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::hf_tokenizer(dir(), data));
