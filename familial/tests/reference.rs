//! The Rust forward against PyTorch/transformers reference outputs
//! (`tests/fixtures/make_fixtures.py`): every layout, every exit, prefill, KV decode and
//! batched segments, within 1e-4 × max |reference|.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use flow_familial::{FamilialModel, Rows, Seg};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

struct Reference {
    ids: Vec<Vec<u32>>,
    tensors: std::collections::HashMap<String, Tensor>,
}

fn reference(name: &str) -> Reference {
    let tensors =
        candle_core::safetensors::load(fixture(name).join("reference.safetensors"), &Device::Cpu)
            .unwrap();
    let ids: Vec<Vec<i64>> = tensors["input_ids"].to_vec2().unwrap();
    let ids = ids
        .into_iter()
        .map(|r| r.into_iter().map(|x| x as u32).collect())
        .collect();
    Reference { ids, tensors }
}

fn assert_close(got: &Tensor, want: &Tensor, what: &str) {
    let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let want = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
    let diff = got
        .iter()
        .zip(&want)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        diff <= 1e-4 * scale,
        "{what}: max abs diff {diff} > 1e-4 × {scale}"
    );
}

fn row(t: &Tensor, b: usize) -> Tensor {
    t.get(b).unwrap()
}

/// Every exit: prefill logits, incremental decode with KV, and both rows in one batch.
fn check(name: &str) {
    let model = FamilialModel::load(&fixture(name)).unwrap();
    let r = reference(name);
    let cfg = model.config().clone();
    for exit in cfg.exit_points() {
        let key = if cfg.exits.len() > 1 && r.tensors.contains_key(&format!("logits.exit.{exit}")) {
            format!("logits.exit.{exit}")
        } else {
            "logits".to_string()
        };
        let want = &r.tensors[&key];
        for (b, ids) in r.ids.iter().enumerate() {
            // Prefill of the whole sequence.
            let mut cache = model.new_cache();
            let got = model.forward_exit(ids, exit, &mut cache).unwrap();
            assert_close(
                &got,
                &row(want, b),
                &format!("{name} exit {exit} row {b} prefill"),
            );
            // Prefill 3, then decode one position at a time with the KV cache.
            let mut cache = model.new_cache();
            let first = model.forward_exit(&ids[..3], exit, &mut cache).unwrap();
            assert_close(
                &first,
                &row(want, b).narrow(0, 0, 3).unwrap(),
                &format!("{name} exit {exit} row {b} prefill 3"),
            );
            for p in 3..ids.len() {
                let got = model
                    .forward_exit(&ids[p..p + 1], exit, &mut cache)
                    .unwrap();
                let w = row(want, b).narrow(0, p, 1).unwrap();
                assert_close(&got, &w, &format!("{name} exit {exit} row {b} decode {p}"));
            }
        }
        // Both sequences in one batch, two segments of different lengths.
        let (a, b) = (&r.ids[0], &r.ids[1][..5]);
        let tokens: Vec<u32> = a.iter().chain(b.iter()).copied().collect();
        let segs = [Seg::new(0, a.len()), Seg::new(0, b.len())];
        let mut c0 = model.new_cache();
        let mut c1 = model.new_cache();
        let h = model.embed(&tokens).unwrap();
        let h = model
            .run_layers(&h, 0..exit, &segs, &mut [&mut c0, &mut c1])
            .unwrap();
        let logits = model
            .exit(&h, exit, &segs, &mut [&mut c0, &mut c1], Rows::All)
            .unwrap();
        assert_close(
            &logits.narrow(0, 0, a.len()).unwrap(),
            &row(want, 0),
            &format!("{name} batch row 0"),
        );
        assert_close(
            &logits.narrow(0, a.len(), b.len()).unwrap(),
            &row(want, 1).narrow(0, 0, b.len()).unwrap(),
            &format!("{name} batch row 1"),
        );
        let last = model.exit(
            &model
                .run_layers(
                    &model.embed(&[a[0], b[0]]).unwrap(),
                    0..exit,
                    &[Seg::new(a.len(), 1), Seg::new(b.len(), 1)],
                    &mut [&mut c0, &mut c1],
                )
                .unwrap(),
            exit,
            &[Seg::new(a.len(), 1), Seg::new(b.len(), 1)],
            &mut [&mut c0, &mut c1],
            Rows::Last,
        );
        assert!(last.is_ok(), "batched decode after batched prefill");
    }
    // Hidden states after each trunk layer.
    for (b, ids) in r.ids.iter().enumerate() {
        let mut cache = model.new_cache();
        let mut h = model.embed(ids).unwrap();
        assert_close(
            &h,
            &row(&r.tensors["hidden.embed"], b),
            &format!("{name} embed row {b}"),
        );
        for l in 0..cfg.num_layers {
            h = model
                .run_layers(&h, l..l + 1, &[Seg::new(0, ids.len())], &mut [&mut cache])
                .unwrap();
            let key = format!("hidden.layer.{l}");
            assert_close(
                &h,
                &row(&r.tensors[&key], b),
                &format!("{name} {key} row {b}"),
            );
        }
    }
}

#[test]
fn llama_matches_transformers() {
    check("llama");
}

#[test]
fn qwen2_matches_transformers() {
    check("qwen2");
}

#[test]
fn qwen2_sharded_checkpoint_loads_and_matches() {
    check("qwen2_sharded");
}

#[test]
fn qwen2_tied_embeddings_match() {
    check("qwen2_tied");
}

#[test]
fn ruyi_every_exit_matches_reference() {
    check("ruyi_qwen2");
}

#[test]
fn ruyi_shared_heads_match() {
    check("ruyi_qwen2_shared");
}

#[test]
fn mixtral_moe_matches_transformers() {
    check("mixtral");
}

#[test]
fn qwen2_moe_matches_transformers() {
    check("qwen2_moe");
}
