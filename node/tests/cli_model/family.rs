//! `flow-node model family` end to end on the real model (SmolLM2 from the cache): data
//! generation, a few distillation steps, the overlay written, reopened through `--model`
//! (inspect shows the members; run answers at the device exit), resume, and the refusal of
//! a base that is not the overlay's.

use std::path::PathBuf;

use super::{fails, ok, succeeds};

fn smollm2() -> Option<PathBuf> {
    let root = flow_familial::family::default_model_cache()?;
    let p = root.join("smollm2-135m-instruct/model.gguf");
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

/// Runs, must succeed; returns stderr (the command's log).
fn log(args: &[&str]) -> String {
    String::from_utf8_lossy(&succeeds(args).stderr).into_owned()
}

#[test]
fn family_is_built_reopened_resumed_and_bound_to_its_base() {
    let Some(base) = smollm2() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("fam");
    let out_s = out.to_str().unwrap();
    let base_s = base.to_str().unwrap();
    let common = [
        "model",
        "family",
        "--base",
        base_s,
        "--exits",
        "10,20",
        "--out",
        out_s,
        "--prompts",
        "4",
        "--eval-prompts",
        "2",
        "--max-new",
        "8",
        "--batch",
        "2",
        "--eval-every",
        "0",
        "--save-every",
        "1",
        "--threads",
        "1",
    ];
    let log = self::log(&[&common[..], &["--steps", "1"]].concat());
    assert!(
        log.contains("before training (logit lens): exit 10"),
        "{log}"
    );
    for f in [
        "family.json",
        "model.safetensors",
        "data/train.jsonl",
        "eval.json",
    ] {
        assert!(out.join(f).exists(), "{f} missing");
    }
    // Resume continues from step 1 to 2 with the cached data.
    let log = self::log(&[&common[..], &["--steps", "2", "--resume"]].concat());
    assert!(!log.contains("generated"), "data should be reused: {log}");
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("train_state.json")).unwrap())
            .unwrap();
    assert_eq!(state["step"], 2);

    // The overlay is a model like any other.
    let inspect = ok(&["model", "inspect", out_s]);
    assert!(inspect.contains("model.eelayers.0"), "{inspect}");
    let run = ok(&[
        "model",
        "run",
        out_s,
        "--exit",
        "10",
        "--prompt",
        "Hello",
        "--max-tokens",
        "4",
    ]);
    assert!(!run.trim().is_empty());

    // Another base under the overlay's reference is refused, naming the hashes.
    let mut m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("family.json")).unwrap()).unwrap();
    m["base"]["sha256"] = serde_json::Value::String("0".repeat(64));
    std::fs::write(out.join("family.json"), m.to_string()).unwrap();
    let err = fails(&["model", "inspect", out_s]);
    assert!(err.contains("is not this family's base"), "{err}");
}

/// The committed family's calibration: `model calibrate --check` decodes its cascade on
/// held-out chat prompts (the test split) with the committed thresholds and reports the
/// composed agreement and the layers per token; a calibration against other weights is
/// refused.
#[test]
fn committed_family_calibration_checks_on_held_out_chat() {
    if smollm2().is_none() {
        return;
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/smollm2-family");
    let cal = dir.join("aiflow_calibration.json");
    let (dir_s, cal_s) = (dir.to_str().unwrap(), cal.to_str().unwrap());
    let f: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cal).unwrap()).unwrap();
    assert_eq!(f["task"], "chat/calibrate");
    let report = ok(&[
        "model",
        "calibrate",
        dir_s,
        "--check",
        cal_s,
        "--examples",
        "3",
        "--max-new",
        "8",
    ]);
    assert!(report.contains("on task chat/test"), "{report}");
    assert!(report.contains("layers per token"), "{report}");

    // The same file next to other weights (the base's logit-lens exits) is refused.
    let tmp = tempfile::tempdir().unwrap();
    let mut m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("family.json")).unwrap()).unwrap();
    m["base"]["path"] = serde_json::Value::String(smollm2().unwrap().to_string_lossy().into());
    std::fs::write(tmp.path().join("family.json"), m.to_string()).unwrap();
    let mut f2 = f.clone();
    f2["model_fingerprint"] = serde_json::Value::String("0123456789abcdef".into());
    std::fs::write(tmp.path().join("aiflow_calibration.json"), f2.to_string()).unwrap();
    std::fs::copy(
        dir.join("model.safetensors"),
        tmp.path().join("model.safetensors"),
    )
    .unwrap();
    let err = fails(&[
        "model",
        "calibrate",
        tmp.path().to_str().unwrap(),
        "--check",
        tmp.path().join("aiflow_calibration.json").to_str().unwrap(),
        "--examples",
        "1",
        "--max-new",
        "2",
    ]);
    assert!(
        err.contains("was calibrated for model 0123456789abcdef"),
        "{err}"
    );
}
