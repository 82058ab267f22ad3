//! Fuzz opening an HF checkpoint directory: the input is `model.safetensors` beside a fixed
//! tiny `config.json` (`familial/tests/fuzz_corpus/safetensors_config.json`) in a directory
//! under /dev/shm; then the tensor table, every tensor read, a fingerprint, load and forward
//! (`familial/tests/fuzz_harness/mod.rs::safetensors_header`, which CI replays on the corpus).
//!
//! Run (stable toolchain, see docs/fuzzing.md):
//! `RUSTC_BOOTSTRAP=1 cargo fuzz run safetensors_header -O -a fuzz/corpus/safetensors_header familial/tests/fuzz_corpus/safetensors_header`
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

#[allow(dead_code)]
#[path = "../../familial/tests/fuzz_harness/mod.rs"]
mod harness;

/// This process's checkpoint directory.
fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| harness::checkpoint_dir(&harness::process_dir("aiflow-fuzz")))
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::safetensors_header(dir(), data));
