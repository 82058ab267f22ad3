//! Lazy expert residency: a model loaded without experts and paged in one by one from the
//! mmapped checkpoint computes exactly what the fully loaded model (or its router
//! restriction) computes.

use flow_familial::config::Layout;
use flow_familial::init::{init_checkpoint, Preset};
use flow_familial::weights::Checkpoint;
use flow_familial::{FamilialModel, ModelConfig, Part};

mod common;
use common::max_diff;

fn logits(model: &FamilialModel, tokens: &[u32]) -> candle_core::Tensor {
    let point = *model.config().exit_points().last().unwrap();
    let mut cache = model.new_cache();
    model.forward_exit(tokens, point, &mut cache).unwrap()
}

#[test]
fn lazy_experts_match_full_and_restricted_models() {
    for layout in [Layout::Qwen2Moe, Layout::Mixtral] {
        let dir = tempfile::tempdir().unwrap();
        let cfg: ModelConfig = init_checkpoint(Preset::MoeSmall, layout, 7, dir.path()).unwrap();
        let tokens: Vec<u32> = b"12+345=".iter().map(|&b| b as u32).collect();
        let mut full = FamilialModel::load(dir.path()).unwrap();
        let mut lazy =
            FamilialModel::load_part_without_experts(dir.path(), cfg.clone(), Part::full(&cfg))
                .unwrap();
        let layers = lazy.moe_layers();
        assert!(!layers.is_empty());
        for &l in &layers {
            assert!(lazy.moe(l).unwrap().resident().iter().all(|r| !r));
        }
        // Nothing resident: a clear error, not NaNs.
        let mut cache = lazy.new_cache();
        let err = lazy.forward_exit(&tokens, 7, &mut cache).unwrap_err();
        assert!(err.to_string().contains("no usable expert"), "{err}");

        let ck = Checkpoint::open(dir.path()).unwrap();
        let n = cfg.ffn.iter().find_map(|f| match f {
            flow_familial::config::Ffn::Moe(s) => Some(s.num_experts),
            _ => None,
        });
        let n = n.unwrap();
        // Half of the experts resident == the full model restricted to that half.
        let keep: Vec<bool> = (0..n).map(|j| j % 2 == 1).collect();
        for &l in &layers {
            for j in (0..n).filter(|&j| keep[j]) {
                lazy.load_expert(&ck, l, j).unwrap();
            }
            full.restrict_experts(l, Some(keep.clone()));
        }
        let (a, b) = (logits(&lazy, &tokens), logits(&full, &tokens));
        assert_eq!(max_diff(&a, &b), 0.0, "{layout:?} half resident");
        // Eviction takes effect, loading is idempotent.
        assert!(lazy.evict_expert(layers[0], 1).unwrap());
        assert!(!lazy.evict_expert(layers[0], 1).unwrap());
        // All resident, no restriction: bit-identical to the eagerly loaded model.
        for &l in &layers {
            full.restrict_experts(l, None);
            for j in 0..n {
                lazy.load_expert(&ck, l, j).unwrap();
                lazy.load_expert(&ck, l, j).unwrap();
            }
            assert!(lazy.moe(l).unwrap().resident().iter().all(|&r| r));
        }
        let (a, b) = (logits(&lazy, &tokens), logits(&full, &tokens));
        assert_eq!(max_diff(&a, &b), 0.0, "{layout:?} all resident");
        assert!(lazy.load_expert(&ck, layers[0], n).is_err());
        assert!(lazy.moe(0).is_err() || layout == Layout::Mixtral);
    }
}
