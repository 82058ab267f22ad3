//! Sparse fine-tuning on the real SmolLM2-135M-Instruct (GGUF, quantized weights read in
//! place): gradients reach exactly the trainable slices, a delta stacked over the base
//! reproduces the fine-tuned logits, and a delta is bound to the base file's SHA-256.
//!
//! The model is looked up as `tests/real_model.rs` does ($AIFLOW_SMOLLM2_GGUF, else
//! `<$AIFLOW_HOME or ~/.cache/aiflow/models>/smollm2-135m-instruct/model.gguf`); absent,
//! each test is skipped with a note, except under `CI=true`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::DType;
use flow_familial::init::tensor_shapes;
use flow_familial::weights::{Stacked, TensorSource};
use flow_familial::{FamilialModel, Mode, ModelConfig, ModelSource};
use flow_finetune::delta::file_fingerprint;
use flow_finetune::scheme::{member_part, SliceKind};
use flow_finetune::words::{Split, WordTask};
use flow_finetune::{Delta, Error, FtOptions, Scheme, SparseTrainer};

/// SHA-256 of the pinned file (`flow-node model pull smollm2-135m-instruct`).
const SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

fn model_path() -> Option<PathBuf> {
    let p = std::env::var_os("AIFLOW_SMOLLM2_GGUF")
        .map(PathBuf::from)
        .or_else(|| {
            flow_familial::family::default_model_cache()
                .map(|root| root.join("smollm2-135m-instruct/model.gguf"))
        })
        .unwrap_or_default();
    if p.exists() {
        return Some(p);
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{} is missing: CI pulls it with `flow-node model pull smollm2-135m-instruct`",
        p.display()
    );
    eprintln!("skipped: {} is absent", p.display());
    None
}

struct Setup {
    cfg: ModelConfig,
    point: usize,
    base: Arc<dyn TensorSource + Send + Sync>,
    task: WordTask,
}

fn setup(path: &Path) -> Setup {
    flow_familial::set_compute_threads(2);
    let src = ModelSource::open(path).unwrap();
    let mut cfg = src.config().unwrap();
    let point = cfg.num_layers - 1;
    cfg.declare_exits(&[point]).unwrap();
    let tok = src.tokenizer().unwrap();
    let chat = src.chat().unwrap().unwrap();
    let eos = tok.token_id("<|im_end|>").unwrap();
    let task = WordTask::new(&tok, &chat, eos).unwrap();
    Setup {
        cfg,
        point,
        base: Arc::new(src),
        task,
    }
}

fn opts(point: usize) -> FtOptions {
    FtOptions {
        steps: 4,
        batch: 2,
        lr: 1e-3,
        warmup: 0,
        exits: vec![point],
        ..Default::default()
    }
}

/// For each scheme: every variable gets a non-zero gradient, nothing is copied frozen,
/// training changes the planned tensors only (row slices: only their rows).
#[test]
fn smollm2_gradients_reach_exactly_the_trainable_slices() {
    let Some(path) = model_path() else { return };
    let s = setup(&path);
    let shapes = tensor_shapes(&s.cfg).unwrap();
    for scheme in [
        Scheme::Blocks { last: 1 },
        Scheme::BiasNorm { last: 30 },
        Scheme::Lora { last: 2, rank: 4 },
        Scheme::Channels {
            last: 1,
            ratio: 0.25,
        },
    ] {
        let mut tr = SparseTrainer::over_source(
            s.cfg.clone(),
            s.base.clone(),
            scheme.clone(),
            opts(s.point),
        )
        .unwrap();
        assert!(tr.frozen().is_empty());
        tr.train_step(&s.task.train_batch(2, 0, 0)).unwrap();
        let (grads, loss) = tr.gradients(&s.task.train_batch(2, 0, 1)).unwrap();
        assert!(loss.is_finite());
        let vars: Vec<&str> = tr
            .trainables()
            .iter()
            .flat_map(|p| p.vars().into_iter().map(move |_| p.name.as_str()))
            .collect();
        assert_eq!(grads.len(), vars.len());
        for (g, n) in grads.iter().zip(&vars) {
            let g = g
                .as_ref()
                .unwrap_or_else(|| panic!("{scheme}: `{n}` got no gradient"));
            let sum = g
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(sum > 0.0, "{scheme}: `{n}` has a zero gradient");
        }
        let plan = scheme.plan(&s.cfg, &[s.point]).unwrap();
        assert!(plan.iter().all(|p| p.name != "model.embed_tokens.weight"));
        let upd = tr.updated().unwrap();
        assert_eq!(upd.len(), plan.len());
        for spec in &plan {
            let old = s.base.get(&spec.name, &shapes[&spec.name]).unwrap();
            let diff = (&upd[&spec.name] - &old).unwrap().abs().unwrap();
            if let SliceKind::Rows(r) = spec.kind {
                let changed = diff
                    .sum(1)
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .filter(|d| **d > 0.0)
                    .count();
                let out = shapes[&spec.name][0];
                assert!(changed > 0 && changed <= (out as f64 * r).ceil() as usize);
            }
        }
    }
}

/// A delta (f32) over the GGUF base reproduces the fine-tuned logits bit for bit; it is
/// bound to the file's SHA-256 and refused for another base.
#[test]
fn smollm2_delta_reproduces_the_logits_and_is_refused_for_another_base() {
    let Some(path) = model_path() else { return };
    let s = setup(&path);
    let fp = file_fingerprint(&path).unwrap();
    assert_eq!(hex::encode(fp), SHA256);
    let shapes = tensor_shapes(&s.cfg).unwrap();
    let scheme = Scheme::Lora { last: 1, rank: 4 };
    let mut tr =
        SparseTrainer::over_source(s.cfg.clone(), s.base.clone(), scheme, opts(s.point)).unwrap();
    for step in 0..2 {
        tr.train_step(&s.task.train_batch(2, 0, step)).unwrap();
    }
    let d = Delta::diff_source(
        s.base.as_ref(),
        &shapes,
        &tr.updated().unwrap(),
        DType::F32,
        fp,
        1,
        "lora:1:4",
    )
    .unwrap();
    let d = Delta::from_bytes(&d.to_bytes().unwrap()).unwrap();
    let top = d.over(&fp, &shapes).unwrap();
    let applied = FamilialModel::from_source(
        s.cfg.clone(),
        member_part(&s.cfg, &[s.point]).unwrap(),
        &Stacked {
            top: &top,
            base: s.base.as_ref(),
        },
        Mode::Infer,
    )
    .unwrap();
    let tokens = &s.task.examples(Split::Test)[0].prompt;
    let logits = |m: &FamilialModel| -> Vec<Vec<f32>> {
        let mut cache = m.new_cache();
        m.forward_exit(tokens, s.point, &mut cache)
            .unwrap()
            .to_vec2()
            .unwrap()
    };
    assert_eq!(logits(&applied), logits(&tr.infer_model().unwrap()));
    let mut other = fp;
    other[0] ^= 1;
    let e = d.over(&other, &shapes).unwrap_err();
    assert!(matches!(e, Error::DeltaRefused(_)), "{e}");
}
