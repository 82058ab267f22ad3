//! Fine-tuning over a base read in place ([`SparseTrainer::over_source`]) on a toy with
//! SmolLM2's shape: llama layout, the head tied to the embedding, the last layer the only
//! exit. The same checks run on the real model in `smollm2.rs` when it is pulled.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use candle_core::{DType, Tensor};
use flow_familial::config::Layout;
use flow_familial::init::{init_weights, preset_config, tensor_shapes, Preset};
use flow_familial::weights::{MemorySource, Stacked, TensorSource};
use flow_familial::{FamilialModel, Mode, ModelConfig};
use flow_finetune::data::FtData;
use flow_finetune::scheme::{member_part, SliceKind};
use flow_finetune::{Delta, Error, FtOptions, Scheme, SparseTrainer};

fn toy() -> (ModelConfig, HashMap<String, Tensor>, usize) {
    let mut cfg = preset_config(Preset::Tiny, Layout::Llama).unwrap();
    cfg.tie_word_embeddings = true;
    let last = cfg.num_layers - 1;
    cfg.declare_exits(&[last]).unwrap();
    let w = init_weights(&cfg, 5).unwrap();
    (cfg, w, last)
}

fn opts(last: usize) -> FtOptions {
    FtOptions {
        steps: 10,
        batch: 4,
        lr: 1e-2,
        warmup: 0,
        exits: vec![last],
        ..Default::default()
    }
}

fn abs_sum(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Every variable gets a non-zero gradient; no tensor of the base does (they are plain
/// tensors read from the source, never variables); training changes exactly the planned
/// tensors (and of a row-sliced matrix only the selected rows).
#[test]
fn gradients_reach_exactly_the_trainable_slices() {
    let (cfg, w, last) = toy();
    let base = Arc::new(MemorySource::new(w.clone()));
    let data = FtData::task("add").unwrap();
    let mut schemes = Scheme::candidates_pretrained(cfg.num_layers);
    schemes.push(Scheme::FfnOut {
        last: 1,
        ratio: 0.5,
    });
    for scheme in schemes {
        let mut tr =
            SparseTrainer::over_source(cfg.clone(), base.clone(), scheme.clone(), opts(last))
                .unwrap();
        assert!(
            tr.frozen().is_empty(),
            "{scheme}: frozen tensors were copied"
        );
        tr.train_step(&data.train_batch(4, 0, 0)).unwrap();
        let (store, _) = tr.backward_store(&data.train_batch(4, 0, 1)).unwrap();
        let trained: HashSet<&str> = tr.trainables().iter().map(|p| p.name.as_str()).collect();
        for p in tr.trainables() {
            for v in p.vars() {
                let g = store
                    .get(v.as_tensor())
                    .unwrap_or_else(|| panic!("{scheme}: `{}` got no gradient", p.name));
                assert!(
                    abs_sum(g) > 0.0,
                    "{scheme}: `{}` has a zero gradient",
                    p.name
                );
            }
        }
        for (n, t) in &w {
            if !trained.contains(n.as_str()) {
                assert!(
                    store.get(t).is_none(),
                    "{scheme}: frozen `{n}` got a gradient"
                );
            }
        }
        let upd = tr.updated().unwrap();
        assert_eq!(upd.len(), trained.len());
        for p in tr.trainables() {
            let (new, old) = (&upd[&p.name], &w[&p.name]);
            let diff = abs_sum(&(new - old).unwrap());
            assert!(diff > 0.0, "{scheme}: `{}` did not change", p.name);
        }
        if let Scheme::Channels { .. } | Scheme::FfnOut { .. } = scheme {
            let plan = scheme.plan(&cfg, &[last]).unwrap();
            for spec in plan.iter().filter(|s| matches!(s.kind, SliceKind::Rows(_))) {
                let (new, old) = (&upd[&spec.name], &w[&spec.name]);
                let rows_changed = (new - old)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .sum(1)
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .filter(|d| **d > 0.0)
                    .count();
                let out = old.dims()[0];
                let SliceKind::Rows(r) = spec.kind else {
                    unreachable!()
                };
                assert!(
                    rows_changed <= (out as f64 * r).ceil() as usize,
                    "{scheme}: {rows_changed} rows of `{}` changed",
                    spec.name
                );
            }
        }
    }
}

fn logits(model: &FamilialModel, tokens: &[u32], point: usize) -> Vec<Vec<f32>> {
    let mut cache = model.new_cache();
    model
        .forward_exit(tokens, point, &mut cache)
        .unwrap()
        .to_vec2()
        .unwrap()
}

/// A delta (f32) stacked over the base gives the fine-tuned model's logits bit for bit;
/// a delta for another base is refused.
#[test]
fn a_delta_reproduces_the_fine_tuned_logits_and_names_its_base() {
    let (cfg, w, last) = toy();
    let base: Arc<dyn TensorSource + Send + Sync> = Arc::new(MemorySource::new(w));
    let data = FtData::task("add").unwrap();
    let shapes = tensor_shapes(&cfg).unwrap();
    for scheme in [
        Scheme::Blocks { last: 1 },
        Scheme::Lora { last: 2, rank: 4 },
        Scheme::Channels {
            last: 1,
            ratio: 0.25,
        },
    ] {
        let mut tr =
            SparseTrainer::over_source(cfg.clone(), base.clone(), scheme.clone(), opts(last))
                .unwrap();
        for step in 0..3 {
            tr.train_step(&data.train_batch(4, 0, step)).unwrap();
        }
        let fp = [3u8; 32];
        let d = Delta::diff_source(
            base.as_ref(),
            &shapes,
            &tr.updated().unwrap(),
            DType::F32,
            fp,
            1,
            &scheme.to_string(),
        )
        .unwrap();
        let d = Delta::from_bytes(&d.to_bytes().unwrap()).unwrap();
        let top = d.over(&fp, &shapes).unwrap();
        let applied = FamilialModel::from_source(
            cfg.clone(),
            member_part(&cfg, &[last]).unwrap(),
            &Stacked {
                top: &top,
                base: base.as_ref(),
            },
            Mode::Infer,
        )
        .unwrap();
        let tokens = &data.train_batch(1, 9, 0)[0].tokens;
        let want = logits(&tr.infer_model().unwrap(), tokens, last);
        assert_eq!(logits(&applied, tokens, last), want, "{scheme}");
        let e = d.over(&[4u8; 32], &shapes).unwrap_err();
        assert!(matches!(e, Error::DeltaRefused(_)), "{scheme}: {e}");
        let mut other = shapes.clone();
        let name = d.tensors.keys().next().unwrap().clone();
        other.insert(name, vec![1, 1]);
        assert!(matches!(
            d.over(&fp, &other).unwrap_err(),
            Error::DeltaRefused(_)
        ));
    }
}
