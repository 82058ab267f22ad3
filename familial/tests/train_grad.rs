//! Every trainable tensor of a family receives a non-zero gradient from the joint exit loss.
//!
//! candle's fused kernels (rms_norm, softmax, rope) have no backward pass and would stop
//! gradients silently; this test catches any such op on the training path, for a dense
//! Ruyi family and for both MoE layouts (router, experts, shared expert and its gate).

use flow_familial::config::Layout;
use flow_familial::init::{init_weights, preset_config, Preset};
use flow_familial::tasks::{generate, Sequence, Task};
use flow_familial::train::{TrainOptions, Trainer};

mod common;
use common::max_diff;

fn check(preset: Preset, layout: Layout, batch: usize) {
    let cfg = preset_config(preset, layout).unwrap();
    let w = init_weights(&cfg, 3).unwrap();
    let t = Trainer::new(cfg, &w, TrainOptions::default()).unwrap();
    let seqs: Vec<Sequence> = generate(Task::Mix, batch, 11)
        .iter()
        .map(Sequence::from)
        .collect();
    let (grads, losses) = t.gradients(&seqs).unwrap();
    assert!(
        losses.iter().all(|l| l.is_finite() && *l > 0.0),
        "{losses:?}"
    );
    let mut missing = Vec::new();
    for (name, g) in t.param_names().iter().zip(&grads) {
        let norm = g.as_ref().map(|g| {
            g.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        });
        match norm {
            Some(n) if n > 0.0 && n.is_finite() => {}
            other => missing.push(format!("{name}: {other:?}")),
        }
    }
    assert!(
        missing.is_empty(),
        "{:?}/{:?}: {} of {} tensors got no (or a zero) gradient:\n{}",
        preset,
        layout,
        missing.len(),
        grads.len(),
        missing.join("\n")
    );
}

#[test]
fn every_tensor_gets_gradient_ruyi_tiny() {
    check(Preset::Tiny, Layout::RuyiQwen2, 4);
}

#[test]
fn every_tensor_gets_gradient_ruyi_small() {
    check(Preset::Small, Layout::RuyiQwen2, 2);
}

#[test]
fn every_tensor_gets_gradient_moe_mixtral() {
    check(Preset::MoeSmall, Layout::Mixtral, 16);
}

#[test]
fn every_tensor_gets_gradient_moe_qwen2_moe() {
    check(Preset::MoeSmall, Layout::Qwen2Moe, 16);
}

#[test]
fn data_parallel_gradients_equal_single_worker() {
    let cfg = preset_config(Preset::Tiny, Layout::RuyiQwen2).unwrap();
    let w = init_weights(&cfg, 5).unwrap();
    let seqs: Vec<Sequence> = generate(Task::Mix, 6, 2)
        .iter()
        .map(Sequence::from)
        .collect();
    let one = Trainer::new(cfg.clone(), &w, TrainOptions::default()).unwrap();
    let two = Trainer::new(
        cfg,
        &w,
        TrainOptions {
            workers: 2,
            ..Default::default()
        },
    )
    .unwrap();
    let (g1, l1) = one.gradients(&seqs).unwrap();
    let (g2, l2) = two.gradients(&seqs).unwrap();
    for (a, b) in l1.iter().zip(&l2) {
        assert!((a - b).abs() < 1e-4, "{l1:?} vs {l2:?}");
    }
    for ((n, a), b) in one.param_names().iter().zip(&g1).zip(&g2) {
        let (a, b) = (a.as_ref().unwrap(), b.as_ref().unwrap());
        let d = max_diff(a, b);
        let s = a
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d <= 1e-4 * s.max(1e-3), "{n}: diff {d}, scale {s}");
    }
}
