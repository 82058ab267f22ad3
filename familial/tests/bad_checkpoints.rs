//! Broken checkpoints give typed errors that name what is wrong.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use flow_familial::init::{init_checkpoint, Preset};
use flow_familial::{Error, FamilialModel, Layout};

mod common;
use common::max_diff;

fn fresh() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    init_checkpoint(Preset::Tiny, Layout::Qwen2, 5, dir.path()).unwrap();
    dir
}

fn rewrite(dir: &std::path::Path, f: impl FnOnce(&mut HashMap<String, Tensor>)) {
    let p = dir.join("model.safetensors");
    let mut t = candle_core::safetensors::load(&p, &Device::Cpu).unwrap();
    f(&mut t);
    candle_core::safetensors::save(&t, &p).unwrap();
}

#[test]
fn truncated_file_is_named() {
    let dir = fresh();
    let p = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let err = FamilialModel::load(dir.path()).unwrap_err();
    assert!(
        matches!(&err, Error::Checkpoint { path, .. } if path.ends_with("model.safetensors")),
        "{err}"
    );
    assert!(err.to_string().contains("truncated"), "{err}");
}

#[test]
fn missing_tensor_is_named_with_its_shape() {
    let dir = fresh();
    rewrite(dir.path(), |t| {
        t.remove("model.layers.2.mlp.up_proj.weight");
    });
    let err = FamilialModel::load(dir.path()).unwrap_err();
    match &err {
        Error::MissingTensor { name, expected } => {
            assert_eq!(name, "model.layers.2.mlp.up_proj.weight");
            assert_eq!(expected, &vec![128, 64]);
        }
        other => panic!("wrong error {other}"),
    }
}

#[test]
fn misshaped_tensor_reports_both_shapes() {
    let dir = fresh();
    rewrite(dir.path(), |t| {
        t.insert(
            "model.layers.0.self_attn.k_proj.weight".into(),
            Tensor::zeros((31, 64), DType::F32, &Device::Cpu).unwrap(),
        );
    });
    let err = FamilialModel::load(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("k_proj.weight") && err.contains("[31, 64]") && err.contains("[32, 64]"),
        "{err}"
    );
}

#[test]
fn wrong_dtype_is_refused() {
    let dir = fresh();
    rewrite(dir.path(), |t| {
        t.insert(
            "model.norm.weight".into(),
            Tensor::zeros(64, DType::I64, &Device::Cpu).unwrap(),
        );
    });
    let err = FamilialModel::load(dir.path()).unwrap_err();
    assert!(
        matches!(&err, Error::BadDtype { name, .. } if name == "model.norm.weight"),
        "{err}"
    );
}

#[test]
fn half_precision_weights_load() {
    let dir = fresh();
    let f32_model = FamilialModel::load(dir.path()).unwrap();
    rewrite(dir.path(), |t| {
        for v in t.values_mut() {
            *v = v.to_dtype(DType::BF16).unwrap();
        }
    });
    let bf16_model = FamilialModel::load(dir.path()).unwrap();
    let exit = f32_model.config().last_exit().point;
    let a = f32_model
        .forward_exit(&[1, 2, 3], exit, &mut f32_model.new_cache())
        .unwrap();
    let b = bf16_model
        .forward_exit(&[1, 2, 3], exit, &mut bf16_model.new_cache())
        .unwrap();
    let d = max_diff(&a, &b);
    assert!(
        d > 0.0 && d < 0.5,
        "bf16 weights should be close but not identical: {d}"
    );
}

#[test]
fn unknown_model_type_and_missing_shard() {
    let dir = fresh();
    let cfg = dir.path().join("config.json");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, text.replace("\"qwen2\"", "\"gpt_neox\"")).unwrap();
    let err = FamilialModel::load(dir.path()).unwrap_err();
    assert!(
        matches!(&err, Error::UnknownModelType(t) if t == "gpt_neox"),
        "{err}"
    );
    std::fs::write(&cfg, text).unwrap();
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        r#"{"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}"#,
    )
    .unwrap();
    let err = FamilialModel::load(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("model-00002-of-00002.safetensors") && err.contains("does not exist"),
        "{err}"
    );
}

#[test]
fn out_of_vocabulary_token_is_an_error() {
    let dir = fresh();
    let m = FamilialModel::load(dir.path()).unwrap();
    let err = m.embed(&[5, 100_000]).unwrap_err().to_string();
    assert!(err.contains("100000"), "{err}");
}
