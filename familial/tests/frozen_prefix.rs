//! A training-mode model whose lower layers hold no trainable tensor runs those layers with
//! the inference kernels and builds no graph there; the result matches the all-training-
//! kernel computation, and gradients still reach the trainable layer above.

use std::collections::HashMap;

use candle_core::{Tensor, Var};
use flow_familial::config::Layout;
use flow_familial::init::{init_weights, preset_config, Preset};
use flow_familial::weights::MemorySource;
use flow_familial::{FamilialModel, Mode, Part};

mod common;
use common::max_diff;

fn hidden_after(
    w: &HashMap<String, Tensor>,
    mode: Mode,
    layers: std::ops::Range<usize>,
) -> (Tensor, FamilialModel) {
    let cfg = preset_config(Preset::Tiny, Layout::RuyiQwen2).unwrap();
    let part = Part::full(&cfg);
    let m = FamilialModel::from_source(cfg, part, &MemorySource::new(w.clone()), mode).unwrap();
    let tokens: Vec<u32> = (0..10).map(|i| (i * 7 + 3) % 200).collect();
    let segs = [
        flow_familial::layers::Seg::new(0, 6),
        flow_familial::layers::Seg::new(0, 4),
    ];
    let mut caches = [m.new_cache(), m.new_cache()];
    let mut refs: Vec<_> = caches.iter_mut().collect();
    let h = m.embed(&tokens).unwrap();
    let h = m.run_layers(&h, layers, &segs, &mut refs).unwrap();
    (h, m)
}

#[test]
fn frozen_layers_build_no_graph_and_match_inference() {
    let cfg = preset_config(Preset::Tiny, Layout::RuyiQwen2).unwrap();
    let w = init_weights(&cfg, 5).unwrap();
    let (infer, _) = hidden_after(&w, Mode::Infer, 0..3);
    let (frozen_train, _) = hidden_after(&w, Mode::Train, 0..3);
    assert!(!frozen_train.track_op(), "a frozen prefix built a graph");
    assert!(max_diff(&infer, &frozen_train) < 1e-5);

    // Layer 2's input norm trainable: layers 0-1 stay frozen, layer 2 builds the graph
    // and its norm weight gets a gradient; the values match the inference model.
    let name = "model.layers.2.input_layernorm.weight";
    let var = Var::from_tensor(&w[name]).unwrap();
    let mut wt = w.clone();
    wt.insert(name.to_string(), var.as_tensor().clone());
    let (h, _) = hidden_after(&wt, Mode::Train, 0..3);
    assert!(h.track_op());
    assert!(max_diff(&infer, &h) < 1e-4);
    let g = h.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    let gn = g
        .get(var.as_tensor())
        .expect("the trainable norm got no gradient");
    assert!(
        gn.abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            > 0.0
    );
}
