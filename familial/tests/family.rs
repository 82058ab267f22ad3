//! Family overlays over a pretrained base (flow_familial::family): round trip, base
//! verification, initialisation as the logit lens, gradients only into the exits, and a
//! distillation step that learns. The base is a tiny converted GGUF fixture (Q8_0).

mod common;

use std::path::{Path, PathBuf};

use candle_core::DType;
use flow_familial::family::distill::{init_exit_tensors, Distiller};
use flow_familial::family::{
    base_digest, exit_tensor_names, select_exits, BaseRef, Family, FamilyManifest,
};
use flow_familial::tasks::Sequence;
use flow_familial::train::TrainOptions;
use flow_familial::{ModelSource, Part, Rows, Seg};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/gguf")
        .join(name)
}

/// A temp dir holding `base.gguf` (a copy of `file`) and the overlay beside it.
fn setup(file: &str) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base.gguf");
    std::fs::copy(fixture(file), &base).unwrap();
    let overlay = tmp.path().join("family");
    (tmp, base, overlay)
}

fn points(src: &ModelSource) -> Vec<usize> {
    let n = src.config().unwrap().num_layers;
    assert!(n >= 2, "fixture needs 2 layers or more");
    vec![0, n - 1]
}

fn manifest(base: &Path, points: Vec<usize>) -> FamilyManifest {
    let (sha256, bytes) = base_digest(base).unwrap();
    FamilyManifest {
        format: flow_familial::family::OVERLAY_FORMAT.into(),
        base: BaseRef {
            name: "tiny".into(),
            sha256,
            bytes,
            path: Some("../base.gguf".into()),
        },
        exit_points: points,
        trained: serde_json::Value::Null,
    }
}

fn batch() -> Vec<Sequence> {
    vec![
        Sequence {
            tokens: vec![1, 5, 9, 13, 2, 7, 11, 3],
            loss_from: 3,
        },
        Sequence {
            tokens: vec![4, 8, 15, 16, 23, 42 % 30, 6],
            loss_from: 2,
        },
    ]
}

fn opts(lr: f64) -> TrainOptions {
    TrainOptions {
        steps: 20,
        batch: 2,
        lr,
        warmup: 0,
        weight_decay: 0.0,
        ..TrainOptions::default()
    }
}

/// Before training, an exit is the logit lens of its layer: own block = trunk layer p,
/// own norm = final norm. Written as an overlay and reopened through `ModelSource`, the
/// family gives exactly those logits at the exit and the base's at the deepest exit.
#[test]
fn overlay_round_trip_starts_as_the_logit_lens() {
    // f32 weights: the copied block (dense f32) and the trunk layer compute the same thing.
    let (_tmp, base, dir) = setup("llama_f32.gguf");
    let src = ModelSource::open(&base).unwrap();
    let pts = points(&src);
    let mut fam_cfg = src.config().unwrap();
    fam_cfg.attach_exits(&pts).unwrap();
    let tensors = init_exit_tensors(&src, &fam_cfg).unwrap();
    let mut names: Vec<String> = tensors.keys().cloned().collect();
    names.sort();
    assert_eq!(names, exit_tensor_names(&fam_cfg).unwrap());
    Family::write(&dir, &manifest(&base, pts.clone()), &tensors, DType::F32).unwrap();

    let fam = ModelSource::open(&dir).unwrap();
    assert!(matches!(fam, ModelSource::Family(_)));
    assert_eq!(fam.config().unwrap().exit_points(), pts);
    let model = fam.load().unwrap();

    // The logit lens of layer p on the base: trunk [0, p], final norm, head.
    let mut lens_cfg = src.config().unwrap();
    lens_cfg.declare_exits(&pts).unwrap();
    let lens = src
        .load_part(lens_cfg.clone(), Part::full(&lens_cfg))
        .unwrap();
    let ids = [3u32, 17, 42, 5, 9];
    for &p in &pts {
        let got = model.forward_exit(&ids, p, &mut model.new_cache()).unwrap();
        let want = lens.forward_exit(&ids, p, &mut lens.new_cache()).unwrap();
        let d = common::max_diff(&got, &want);
        assert!(d <= 1e-4, "exit {p}: max |Δlogit| {d}");
    }
    // Fingerprints cover the overlay: changing an exit tensor changes the family's.
    let all: Vec<String> = fam.tensor_infos().keys().cloned().collect();
    let fp1 = fam.fingerprint(all.iter().map(String::as_str)).unwrap();
    let mut t2 = tensors.clone();
    let k = names[0].clone();
    t2.insert(k.clone(), (&t2[&k] + 1.0).unwrap());
    Family::write(&dir, &manifest(&base, pts), &t2, DType::F32).unwrap();
    let fam2 = ModelSource::open(&dir).unwrap();
    let fp2 = fam2.fingerprint(all.iter().map(String::as_str)).unwrap();
    assert_ne!(fp1, fp2);
}

/// An overlay over another file than the one it was built on is refused with both hashes.
#[test]
fn a_mismatched_base_is_refused() {
    let (_tmp, base, dir) = setup("llama_q8_0.gguf");
    let src = ModelSource::open(&base).unwrap();
    let pts = points(&src);
    let mut cfg = src.config().unwrap();
    cfg.attach_exits(&pts).unwrap();
    let tensors = init_exit_tensors(&src, &cfg).unwrap();
    Family::write(&dir, &manifest(&base, pts.clone()), &tensors, DType::F16).unwrap();
    // Same size, one byte changed deep in the tensor data: only the hash can tell.
    let mut bytes = std::fs::read(&base).unwrap();
    let at = bytes.len() - 100;
    bytes[at] ^= 0x55;
    std::fs::write(&base, &bytes).unwrap();
    let err = ModelSource::open(&dir).unwrap_err().to_string();
    assert!(
        err.contains("is not this family's base") && err.contains("sha256"),
        "{err}"
    );

    // A different model altogether: refused on size before hashing.
    std::fs::copy(fixture("qwen2_f32.gguf"), &base).unwrap();
    let err = ModelSource::open(&dir).unwrap_err().to_string();
    assert!(err.contains("bytes"), "{err}");

    // No base at all: the error says how to get it.
    std::fs::remove_file(&base).unwrap();
    let err = ModelSource::open(&dir).unwrap_err().to_string();
    assert!(err.contains("flow-node model pull tiny"), "{err}");
}

/// Every exit tensor receives a gradient; nothing of the trunk is trainable.
#[test]
fn gradients_reach_every_exit_tensor_and_only_them() {
    let src = ModelSource::open(&fixture("llama_q8_0.gguf")).unwrap();
    let pts = points(&src);
    let d = Distiller::new(src, &pts, None, opts(1e-3), 0.5).unwrap();
    let names = d.trainer().param_names().to_vec();
    assert!(!names.is_empty());
    assert!(
        names
            .iter()
            .all(|n| n.starts_with("model.eelayers.") || n.starts_with("model.norms.")),
        "{names:?}"
    );
    let grads = d.gradients(&batch()).unwrap();
    for (n, g) in names.iter().zip(&grads) {
        let g = g.as_ref().unwrap_or_else(|| panic!("no gradient for {n}"));
        let norm = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(norm > 0.0 && norm.is_finite(), "{n}: |g|² = {norm}");
    }
}

/// Distillation learns: on a fixed batch the exit's KL to the deepest exit falls and its
/// top-1 agreement does not drop; a resumed run continues with the same state.
#[test]
fn distillation_lowers_the_kl_and_resumes_exactly() {
    let src = ModelSource::open(&fixture("llama_q8_0.gguf")).unwrap();
    let pts = points(&src);
    let b = batch();
    let mut d = Distiller::new(src.clone(), &pts, None, opts(3e-3), 0.0).unwrap();
    let (before, rows) = d.evaluate(&b).unwrap();
    assert_eq!(rows, 5 + 5);
    for _ in 0..15 {
        d.step(&b).unwrap();
    }
    let (after, _) = d.evaluate(&b).unwrap();
    assert!(
        after[0].kl < 0.7 * before[0].kl,
        "KL {} -> {}",
        before[0].kl,
        after[0].kl
    );
    assert!(after[0].agree >= before[0].agree);

    let tmp = tempfile::tempdir().unwrap();
    d.save_state(tmp.path(), serde_json::Value::Null).unwrap();
    let (mut r, st) = Distiller::resume(src, &pts, tmp.path(), None, 0.0).unwrap();
    assert_eq!(st.step, 15);
    let s1 = d.step(&b).unwrap();
    let s2 = r.step(&b).unwrap();
    assert_eq!(s1.step, s2.step);
    assert!(
        (s1.loss - s2.loss).abs() < 1e-9,
        "{} vs {}",
        s1.loss,
        s2.loss
    );
}

/// The teacher cache changes nothing but speed: a run that reuses the teacher's outputs
/// (batches served from the cache, in a different packing) takes the same steps as one that
/// recomputes them.
#[test]
fn teacher_cache_gives_the_same_steps() {
    let src = ModelSource::open(&fixture("llama_q8_0.gguf")).unwrap();
    let pts = points(&src);
    let b = batch();
    let mut plain = Distiller::new(src.clone(), &pts, None, opts(3e-3), 0.5).unwrap();
    let mut cached = Distiller::new(src, &pts, None, opts(3e-3), 0.5).unwrap();
    cached.set_teacher_cache(64 << 20);
    // Fill the cache one sequence at a time, so later batches are assembled from parts.
    for s in &b {
        cached.evaluate(std::slice::from_ref(s)).unwrap();
    }
    for _ in 0..3 {
        let p = plain.step(&b).unwrap();
        let c = cached.step(&b).unwrap();
        assert!((p.loss - c.loss).abs() < 1e-5, "{} vs {}", p.loss, c.loss);
        assert_eq!(p.rows, c.rows);
        for (x, y) in p.exits.iter().zip(&c.exits) {
            assert!(
                (x.kl - y.kl).abs() < 1e-5 && x.agree == y.agree,
                "{x:?} vs {y:?}"
            );
        }
    }
}

/// I1 on a family: the device part (trunk [0, p) + exit p) and the upper part (trunk
/// [p, n-1) + deepest exit) give the single node's logits at both exits.
#[test]
fn split_family_equals_single_node() {
    let (_tmp, base, dir) = setup("qwen2_tied_f16.gguf");
    let src = ModelSource::open(&base).unwrap();
    let pts = points(&src);
    let d = Distiller::new(src, &pts, None, opts(3e-3), 0.0).unwrap();
    let mut d = d;
    for _ in 0..3 {
        d.step(&batch()).unwrap();
    }
    Family::write(
        &dir,
        &manifest(&base, pts.clone()),
        &d.exit_tensors(),
        DType::F32,
    )
    .unwrap();
    let fam = ModelSource::open(&dir).unwrap();
    let cfg = fam.config().unwrap();
    let full = fam.load().unwrap();
    let (p, last) = (pts[0], pts[1]);
    let ids = [3u32, 17, 42, 5, 9];
    let seg = [Seg::new(0, ids.len())];
    let lo = fam
        .load_part(
            cfg.clone(),
            Part {
                embed: true,
                trunk: 0..p,
                exits: vec![p],
            },
        )
        .unwrap();
    let hi = fam
        .load_part(
            cfg.clone(),
            Part {
                embed: false,
                trunk: p..last,
                exits: vec![last],
            },
        )
        .unwrap();
    let (mut c1, mut c2) = (lo.new_cache(), hi.new_cache());
    let h = lo.embed(&ids).unwrap();
    let h = lo.run_layers(&h, 0..p, &seg, &mut [&mut c1]).unwrap();
    let dev = lo.exit(&h, p, &seg, &mut [&mut c1], Rows::All).unwrap();
    let h = hi.run_layers(&h, p..last, &seg, &mut [&mut c2]).unwrap();
    let top = hi.exit(&h, last, &seg, &mut [&mut c2], Rows::All).unwrap();
    for (q, got) in [(p, dev), (last, top)] {
        let want = full.forward_exit(&ids, q, &mut full.new_cache()).unwrap();
        let d = common::max_diff(&got, &want);
        assert!(d <= 1e-4, "exit {q}: {d}");
    }
}

/// Keeping some trained exits: the overlay with exits [1, last] selected from a family
/// trained with [0, 1, last] gives exit 1 the same logits, and names a missing exit.
#[test]
fn selected_exits_keep_their_logits() {
    let (_tmp, base, dir) = setup("qwen2_tied_f16.gguf");
    let src = ModelSource::open(&base).unwrap();
    let last = src.config().unwrap().num_layers - 1;
    let all = vec![0, 1, last];
    let mut d = Distiller::new(src, &all, None, opts(3e-3), 0.0).unwrap();
    d.step(&batch()).unwrap();
    let both = dir.with_file_name("both");
    Family::write(
        &both,
        &manifest(&base, all.clone()),
        &d.exit_tensors(),
        DType::F32,
    )
    .unwrap();
    let kept = select_exits(&d.exit_tensors(), &all, &[1]).unwrap();
    assert!(kept
        .keys()
        .all(|k| k.starts_with("model.eelayers.0.") || k == "model.norms.0.weight"));
    Family::write(&dir, &manifest(&base, vec![1, last]), &kept, DType::F32).unwrap();
    let ids = [3u32, 17, 42, 5, 9];
    let a = ModelSource::open(&both).unwrap().load().unwrap();
    let b = ModelSource::open(&dir).unwrap().load().unwrap();
    let want = a.forward_exit(&ids, 1, &mut a.new_cache()).unwrap();
    let got = b.forward_exit(&ids, 1, &mut b.new_cache()).unwrap();
    assert_eq!(common::max_diff(&got, &want), 0.0);
    let err = select_exits(&d.exit_tensors(), &all, &[2])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("exit 2 is not one of the trained exits"),
        "{err}"
    );
}
