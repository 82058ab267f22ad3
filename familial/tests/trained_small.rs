//! The committed trained `small` family (`models/small/`): its bytes match the recorded
//! fingerprint, it loads, and its training shows: on held-out `add` examples the deepest
//! exit is clearly more accurate, and has a lower answer loss, than the shallowest.
//! How it was made is in `models/small/TRAINED.md`.

use std::path::PathBuf;

use flow_familial::tasks::{eval_set, Task};
use flow_familial::train::evaluate_examples;
use flow_familial::FamilialModel;
use sha2::{Digest, Sha256};

/// Recorded at commit time (TRAINED.md): on eval split 1 the deepest exit scores 98% and
/// the shallowest 68%; these bounds leave room for platform float differences.
const MARGIN: f64 = 0.10;
const MIN_DEEP: f64 = 0.80;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/small")
}

fn recorded_sha256() -> String {
    let text = std::fs::read_to_string(dir().join("model.safetensors.sha256")).unwrap();
    let (hex, name) = text.trim().split_once("  ").unwrap();
    assert_eq!(name, "model.safetensors");
    hex.to_string()
}

#[test]
fn trained_small_matches_its_fingerprint() {
    let bytes = std::fs::read(dir().join("model.safetensors")).unwrap();
    let got = hex::encode(Sha256::digest(&bytes));
    let want = recorded_sha256();
    assert_eq!(got, want, "models/small/model.safetensors changed: retrain with the command in TRAINED.md or update the record with it");
    let md = std::fs::read_to_string(dir().join("TRAINED.md")).unwrap();
    assert!(
        md.contains(&want),
        "TRAINED.md does not record sha256 {want}"
    );
    assert!(
        bytes.len() < 8 << 20,
        "the committed family should stay a few MB"
    );
}

#[test]
fn trained_small_loads_as_an_f16_family() {
    let m = FamilialModel::load(&dir()).unwrap();
    let cfg = m.config();
    assert_eq!(cfg.exit_points(), vec![1, 3, 5, 7]);
    assert_eq!(cfg.num_layers, 8);
    assert_eq!(cfg.stored_dtype.as_deref(), Some("float16"));
}

#[test]
fn trained_small_deep_exit_beats_shallow_on_held_out_add() {
    let m = FamilialModel::load(&dir()).unwrap();
    // Split 1: held out from training and from the split TRAINED.md reports.
    let ex = eval_set(Task::Add, 200, 1);
    let s = evaluate_examples(&m, &ex).unwrap();
    eprintln!("held-out add (split 1, 200): {s:?}");
    let (shallow, deep) = (&s[0], &s[s.len() - 1]);
    assert!(
        deep.exact >= shallow.exact + MARGIN,
        "deepest exit {:.3} vs shallowest {:.3} exact on held-out add: {s:?}",
        deep.exact,
        shallow.exact
    );
    assert!(deep.loss < shallow.loss, "{s:?}");
    assert!(deep.exact >= MIN_DEEP, "{s:?}");
}

#[test]
fn trained_small_easy_sums_need_less_depth() {
    // Difficulty really varies: the shallowest exit handles 1-digit sums far better than
    // 4-digit ones, while the deepest exit still gets most 4-digit sums right.
    let m = FamilialModel::load(&dir()).unwrap();
    let mut rows = Vec::new();
    for level in 1..=4 {
        let ex = flow_familial::tasks::generate_level(Task::Add, level, 100, 1000 + level as u64);
        let s = evaluate_examples(&m, &ex).unwrap();
        eprintln!(
            "add level {level}: {}",
            s.iter()
                .map(|e| format!("e{} {:.0}%", e.point, 100.0 * e.exact))
                .collect::<Vec<_>>()
                .join("  ")
        );
        rows.push(s);
    }
    let shallow = |l: usize| rows[l][0].exact;
    let deep = |l: usize| rows[l][rows[l].len() - 1].exact;
    assert!(shallow(0) >= shallow(3) + 0.2, "{rows:?}");
    assert!(deep(3) >= shallow(3) + 0.1, "{rows:?}");
}
