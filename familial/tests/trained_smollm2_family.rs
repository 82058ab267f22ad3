//! The committed SmolLM2 family (`models/smollm2-family/`): its overlay bytes match the
//! recorded sha256, it opens over the pulled base, and its training shows on held-out chat
//! prompts (test split: topics never used for training or calibration): every trained exit
//! agrees with the deepest exit far more often than the same layer's logit lens.
//! How it was made is in `models/smollm2-family/TRAINED.md`.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use flow_familial::family::data::{generate, ChatEncoder};
use flow_familial::family::distill::Distiller;
use flow_familial::family::prompts::{chat_prompts, Split};
use flow_familial::train::TrainOptions;
use flow_familial::{ModelSource, Part};
use sha2::{Digest, Sha256};

mod common;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/smollm2-family")
}

#[test]
fn smollm2_family_matches_its_fingerprint() {
    let bytes = std::fs::read(dir().join("model.safetensors")).unwrap();
    let got = hex::encode(Sha256::digest(&bytes));
    let text = std::fs::read_to_string(dir().join("model.safetensors.sha256")).unwrap();
    let (want, name) = text.trim().split_once("  ").unwrap();
    assert_eq!(name, "model.safetensors");
    assert_eq!(got, want, "models/smollm2-family/model.safetensors changed: retrain with the command in TRAINED.md or update the record");
    let md = std::fs::read_to_string(dir().join("TRAINED.md")).unwrap();
    assert!(
        md.contains(want),
        "TRAINED.md does not record sha256 {want}"
    );
    assert!(bytes.len() < 24 << 20, "the overlay should stay small");
}

/// Held-out, teacher-forced on the deepest exit's own greedy answers: each trained exit's
/// top-1 agreement beats the logit lens at the same layer by a wide margin (TRAINED.md
/// records the numbers on 64 prompts; 6 prompts here keep the test quick).
#[test]
fn smollm2_family_exits_beat_the_logit_lens_on_held_out_chat() {
    let Some(base_path) = common::smollm2_gguf() else {
        return;
    };
    let fam = ModelSource::open(&dir()).unwrap();
    let cfg = fam.config().unwrap();
    let points = cfg.exit_points();
    assert_eq!(points, vec![10, 20, 29]);
    let base = ModelSource::open(&base_path).unwrap();
    let mut full_cfg = base.config().unwrap();
    full_cfg.declare_exits(&[29]).unwrap();
    let full = base
        .load_part(full_cfg.clone(), Part::full(&full_cfg))
        .unwrap();
    let enc = ChatEncoder::new(&base).unwrap();
    let prompts = chat_prompts(Split::Test, 6, 7);
    let samples = generate(&full, &enc, &prompts, 24, 6, |_| {}).unwrap();
    let batch: Vec<_> = samples.iter().map(|s| s.sequence()).collect();

    let st = candle_core::safetensors::load(dir().join("model.safetensors"), &Device::Cpu).unwrap();
    let trained: HashMap<String, Tensor> = st
        .into_iter()
        .map(|(k, v)| (k, v.to_dtype(DType::F32).unwrap()))
        .collect();
    let opts = TrainOptions::default();
    let lens = Distiller::new(base.clone(), &points, None, opts.clone(), 0.0).unwrap();
    let exits = Distiller::new(base, &points, Some(trained), opts, 0.0).unwrap();
    let (before, rows) = lens.evaluate(&batch).unwrap();
    let (after, _) = exits.evaluate(&batch).unwrap();
    eprintln!("{rows} rows; logit lens {before:?}; trained {after:?}");
    for (b, a) in before.iter().zip(&after) {
        assert!(
            a.agree >= b.agree + 0.2 && a.kl < 0.5 * b.kl,
            "exit {}: trained {a:?} vs logit lens {b:?}",
            a.point
        );
    }
}
