//! Fuzz the incremental frame decoder (invariant I6: no panic, no allocation beyond limits).
//!
//! Run (stable toolchain, see docs/fuzzing.md):
//! `RUSTC_BOOTSTRAP=1 cargo fuzz run frame_decoder -O fuzz/corpus/frame_decoder protocol/tests/corpus`
//! (from the repository root; the second directory is the committed seed corpus).
#![no_main]

use flow_protocol::{FrameDecoder, Limits};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first byte picks a chunk size so partial reads are exercised too.
    let (split, data) = match data.split_first() {
        Some((s, rest)) => (usize::from(*s).max(1), rest),
        None => return,
    };
    let limits = Limits {
        max_frame_bytes: 1 << 20,
        max_header_bytes: 1 << 14,
        max_elements: 1 << 16,
        ..Limits::default()
    };
    let mut dec = FrameDecoder::new(limits);
    for chunk in data.chunks(split) {
        dec.push(chunk);
        loop {
            match dec.next_message() {
                Ok(Some(msg)) => {
                    for t in msg.tensors() {
                        let _ = t.decode();
                    }
                }
                Ok(None) => break,
                Err(_) if dec.is_failed() => return,
                Err(_) => {}
            }
        }
        assert!(dec.needed() as u64 <= limits.max_frame_bytes);
    }
});
