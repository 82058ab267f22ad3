//! Peak training memory must not grow with the number of steps (it once did for `lora:*`:
//! every step's gradient graph stayed reachable from the AdamW moments).
//!
//! One test in this binary on purpose: the counting allocator's peak is process-global.

use std::collections::HashMap;

use candle_core::Tensor;
use flow_familial::config::Layout;
use flow_familial::init::{init_weights, preset_config, Preset};
use flow_familial::ModelConfig;
use flow_finetune::data::FtData;
use flow_finetune::mem::{counting, CountingAlloc, PeakScope};
use flow_finetune::{FtOptions, Scheme, SparseTrainer};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

fn peak_of(
    cfg: &ModelConfig,
    base: &HashMap<String, Tensor>,
    scheme: &Scheme,
    steps: u64,
) -> usize {
    let data = FtData::task("add").unwrap();
    let opts = FtOptions {
        steps,
        batch: 8,
        lr: 1e-3,
        warmup: 0,
        ..Default::default()
    };
    let batches: Vec<_> = (0..steps).map(|s| data.train_batch(8, 0, s)).collect();
    let scope = PeakScope::start();
    let mut tr = SparseTrainer::new(cfg.clone(), base, scheme.clone(), opts).unwrap();
    for b in &batches {
        tr.train_step(b).unwrap();
    }
    scope.peak_bytes()
}

#[test]
fn peak_memory_does_not_grow_with_steps() {
    assert!(
        counting(),
        "the counting allocator is installed in this test binary"
    );
    let cfg = preset_config(Preset::Tiny, Layout::RuyiQwen2).unwrap();
    let base = init_weights(&cfg, 3).unwrap();
    let schemes: Vec<Scheme> = ["lora:1:4", "channels:1:0.5", "full"]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
    // Warm-up: lazily initialised thread pools and caches are not the trainer's.
    peak_of(&cfg, &base, &schemes[0], 2);
    for s in &schemes {
        let short = peak_of(&cfg, &base, s, 10);
        let long = peak_of(&cfg, &base, s, 40);
        eprintln!("{s}: peak {short} B after 10 steps, {long} B after 40 steps");
        // Generous: allocator noise and batch-length differences, but not 30 steps of graphs.
        assert!(
            long <= short + short / 2 + (64 << 10),
            "{s}: peak grew with steps ({short} B after 10, {long} B after 40)"
        );
    }
}
