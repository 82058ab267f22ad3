//! Fuzz opening an HF checkpoint directory: the input is `model.safetensors` beside a fixed
//! tiny `config.json` (`familial/tests/fuzz_corpus/safetensors_config.json`) in a directory
//! under /dev/shm; then the tensor table, every tensor read, a fingerprint, load and forward
//! (`familial/tests/fuzz_harness/mod.rs::safetensors_header`, which CI replays on the corpus).
//!
//! Run (stable toolchain, see docs/fuzzing.md):
//! `RUSTC_BOOTSTRAP=1 cargo fuzz run safetensors_header -O -a fuzz/corpus/safetensors_header familial/tests/fuzz_corpus/safetensors_header`
#![no_main]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

#[allow(dead_code)]
#[path = "../../familial/tests/fuzz_harness/mod.rs"]
mod harness;

/// This process's checkpoint directory, on tmpfs when there is one.
fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let shm = Path::new("/dev/shm");
        let base = if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        harness::checkpoint_dir(&base.join(format!("aiflow-fuzz-{}", std::process::id())))
    })
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::safetensors_header(dir(), data));
