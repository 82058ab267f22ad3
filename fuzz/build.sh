#!/usr/bin/env bash
# Build every fuzz target with the flags `cargo fuzz build -O -a` passes (cargo-fuzz 0.12:
# sancov inline 8-bit counters + pc-table + trace-compares, AddressSanitizer, debug
# assertions, release profile), for a machine without cargo-fuzz. The stable toolchain takes
# the nightly flags with RUSTC_BOOTSTRAP=1. Binaries land in
# ${FUZZ_TARGET_DIR:-fuzz/target}/x86_64-unknown-linux-gnu/release/. See docs/fuzzing.md.
set -euo pipefail
cd "$(dirname "$0")"
export RUSTC_BOOTSTRAP=1
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing \
-Cllvm-args=-simplifycfg-branch-fold-threshold=0 -Zsanitizer=address -Cdebug-assertions \
-Cforce-frame-pointers"
exec cargo build --release --target x86_64-unknown-linux-gnu --bins \
  --target-dir "${FUZZ_TARGET_DIR:-target}" "$@"
