//! `flow-node model init | inspect | run | family` through the real binary.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

/// `model family` on the real model (SmolLM2 from the cache).
#[path = "cli_model/family.rs"]
mod family;

fn flow_node(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flow-node"))
        .args(args)
        .env("RAYON_NUM_THREADS", "1")
        .env("RUST_LOG", "warn")
        .output()
        .expect("run flow-node")
}

/// Runs, must succeed; returns the whole output.
fn succeeds(args: &[&str]) -> Output {
    let out = flow_node(args);
    assert!(
        out.status.success(),
        "flow-node {args:?} failed:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs, must succeed; returns stdout.
fn ok(args: &[&str]) -> String {
    String::from_utf8(succeeds(args).stdout).expect("utf-8 stdout")
}

/// Runs, must fail; returns stderr.
fn fails(args: &[&str]) -> String {
    let out = flow_node(args);
    assert!(
        !out.status.success(),
        "flow-node {args:?} should have failed; stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn init(dir: &Path, preset: &str, layout: &str, seed: u64, dtype: &str) -> String {
    ok(&[
        "model",
        "init",
        "--preset",
        preset,
        "--layout",
        layout,
        "--seed",
        &seed.to_string(),
        "--dtype",
        dtype,
        "--out",
        dir.to_str().expect("utf-8 path"),
    ])
}

fn inspect_json(dir: &Path) -> Value {
    let text = ok(&[
        "model",
        "inspect",
        dir.to_str().expect("utf-8 path"),
        "--json",
    ]);
    serde_json::from_str(&text).expect("inspect --json is JSON")
}

fn run_json(dir: &Path, exit: usize, prompt: &str, max_tokens: usize) -> Value {
    let text = ok(&[
        "model",
        "run",
        dir.to_str().expect("utf-8 path"),
        "--exit",
        &exit.to_string(),
        "--prompt",
        prompt,
        "--max-tokens",
        &max_tokens.to_string(),
        "--json",
    ]);
    serde_json::from_str(text.trim()).expect("run --json is JSON")
}

fn exits_of(report: &Value) -> Vec<usize> {
    report["exits"]
        .as_array()
        .expect("exits")
        .iter()
        .map(|e| e.as_u64().expect("exit") as usize)
        .collect()
}

/// init → inspect (table and JSON) → run --json at every exit, deterministically.
fn round_trip(preset: &str, layout: &str) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join(format!("{preset}-{layout}"));
    let printed = init(&dir, preset, layout, 3, "f32");
    assert!(printed.contains("parameters"), "{printed}");
    assert!(printed.contains("exit"), "{printed}");
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert!(dir.join(f).exists(), "{f} missing");
    }

    let table = ok(&["model", "inspect", dir.to_str().expect("utf-8 path")]);
    assert!(table.contains(layout), "{table}");
    assert!(table.contains("fingerprint"), "{table}");

    let r = inspect_json(&dir);
    assert_eq!(r["layout"], layout);
    assert_eq!(r["dtype_on_disk"], serde_json::json!(["f32"]));
    let exits = exits_of(&r);
    assert!(exits.len() >= 3, "{exits:?}");
    let members = r["members"].as_array().expect("members");
    assert_eq!(members.len(), exits.len());
    let total = r["total_parameters"].as_u64().expect("total");
    let total_bytes = r["total_bytes"].as_u64().expect("bytes");
    assert_eq!(total_bytes, 4 * total, "f32 stores 4 bytes per parameter");
    let mut prev = 0;
    for (m, &e) in members.iter().zip(&exits) {
        assert_eq!(m["exit"].as_u64(), Some(e as u64));
        assert_eq!(m["depth"].as_u64(), Some(e as u64 + 1));
        let p = m["parameters"].as_u64().expect("parameters");
        assert!(
            p > prev && p <= total,
            "members grow with depth: {p} after {prev}"
        );
        assert_eq!(m["bytes"].as_u64(), Some(4 * p));
        prev = p;
    }
    let fp = r["fingerprint"].as_str().expect("fingerprint");
    assert_eq!(fp.len(), 16);
    // Same seed, same weights, same fingerprint.
    let again = tmp.path().join("again");
    init(&again, preset, layout, 3, "f32");
    assert_eq!(inspect_json(&again)["fingerprint"], r["fingerprint"]);

    for &e in &exits {
        let a = run_json(&dir, e, "12+34=", 6);
        let b = run_json(&dir, e, "12+34=", 6);
        assert_eq!(a, b, "exit {e}: greedy generation is deterministic");
        assert_eq!(a["exit"].as_u64(), Some(e as u64));
        assert_eq!(a["prompt_tokens"].as_u64(), Some(7), "BOS + 6 bytes");
        let toks = a["tokens"].as_array().expect("tokens");
        assert!(toks.len() <= 6);
        let top = a["top_logits"].as_array().expect("top_logits");
        assert_eq!(top.len(), 10);
        let first = top[0].as_array().expect("[token, logit, text]");
        assert_eq!(first.len(), 3);
        let l0 = first[1].as_f64().expect("logit");
        let l9 = top[9][1].as_f64().expect("logit");
        assert!(l0 >= l9, "top logits are sorted");
        let c = &a["confidence"];
        let p = c["max_prob"].as_f64().expect("max_prob");
        assert!(p > 0.0 && p <= 1.0);
        assert!(c["margin"].as_f64().expect("margin") >= 0.0);
        assert!(c["entropy"].as_f64().expect("entropy") >= 0.0);
        if a["stop"] == "max_tokens" {
            assert_eq!(toks.len(), 6);
            // The last generated token is the argmax of the reported logits.
            assert_eq!(toks[5], first[0]);
        }
    }
    // Streaming text mode works too.
    ok(&[
        "model",
        "run",
        dir.to_str().expect("utf-8 path"),
        "--exit",
        &exits[0].to_string(),
        "--prompt",
        "hi",
        "--max-tokens",
        "3",
    ]);
}

#[test]
fn tiny_ruyi_qwen2_round_trip() {
    round_trip("tiny", "ruyi_qwen2");
}

#[test]
fn tiny_qwen2_round_trip() {
    round_trip("tiny", "qwen2");
}

#[test]
fn tiny_llama_round_trip() {
    round_trip("tiny", "llama");
}

#[test]
fn moe_small_mixtral_round_trip() {
    round_trip("moe-small", "mixtral");
}

#[test]
fn moe_small_qwen2_moe_round_trip() {
    round_trip("moe-small", "qwen2_moe");
}

#[test]
fn errors_tell_the_user_what_to_do() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("m");
    init(&dir, "tiny", "ruyi_qwen2", 1, "f32");
    let d = dir.to_str().expect("utf-8 path");

    let e = fails(&["model", "run", d, "--exit", "4", "--prompt", "x"]);
    assert!(e.contains("exit 4 is not an exit"), "{e}");
    assert!(e.contains("[1, 3, 5]"), "{e}");
    assert!(e.contains("model inspect"), "{e}");

    let missing = tmp.path().join("nope");
    let m = missing.to_str().expect("utf-8 path");
    for args in [
        vec!["model", "inspect", m],
        vec!["model", "run", m, "--exit", "1", "--prompt", "x"],
    ] {
        let e = fails(&args);
        assert!(e.contains("does not exist"), "{e}");
        assert!(e.contains("model init"), "{e}");
    }

    // Refuses to overwrite without --force.
    let e = fails(&[
        "model", "init", "--preset", "tiny", "--layout", "qwen2", "--out", d,
    ]);
    assert!(e.contains("--force"), "{e}");
    ok(&[
        "model", "init", "--preset", "tiny", "--layout", "qwen2", "--out", d, "--force",
    ]);
    assert_eq!(inspect_json(&dir)["layout"], "qwen2");

    // Unknown names say what is accepted.
    let e = fails(&["model", "init", "--preset", "huge", "--out", m]);
    assert!(e.contains("tiny"), "{e}");
    let e = fails(&["model", "init", "--layout", "gpt2", "--out", m]);
    assert!(e.contains("ruyi_qwen2"), "{e}");
    let e = fails(&[
        "model", "init", "--preset", "tiny", "--layout", "mixtral", "--out", m,
    ]);
    assert!(e.contains("moe-small"), "{e}");

    // A corrupted weight file is named.
    let st = dir.join("model.safetensors");
    let bytes = std::fs::read(&st).expect("read");
    std::fs::write(&st, &bytes[..bytes.len() / 2]).expect("truncate");
    for args in [
        vec!["model", "inspect", d],
        vec!["model", "run", d, "--exit", "1", "--prompt", "x"],
    ] {
        let e = fails(&args);
        assert!(e.contains("model.safetensors"), "{e}");
    }
    std::fs::write(&st, b"this is not a safetensors file").expect("garble");
    let e = fails(&["model", "run", d, "--exit", "1", "--prompt", "x"]);
    assert!(e.contains("model.safetensors"), "{e}");
}

#[test]
fn f16_checkpoint_gives_logits_close_to_f32() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let f32_dir = tmp.path().join("f32");
    let f16_dir = tmp.path().join("f16");
    let bf16_dir = tmp.path().join("bf16");
    init(&f32_dir, "tiny", "ruyi_qwen2", 11, "f32");
    init(&f16_dir, "tiny", "ruyi_qwen2", 11, "f16");
    init(&bf16_dir, "tiny", "ruyi_qwen2", 11, "bf16");
    let r16 = inspect_json(&f16_dir);
    assert_eq!(r16["dtype_on_disk"], serde_json::json!(["f16"]));
    let r32 = inspect_json(&f32_dir);
    assert_eq!(
        r16["total_bytes"].as_u64().expect("bytes") * 2,
        r32["total_bytes"].as_u64().expect("bytes")
    );
    for (dir, tol) in [(&f16_dir, 0.05), (&bf16_dir, 0.3)] {
        for e in [1usize, 5] {
            let a = run_json(&f32_dir, e, "hello", 0);
            let b = run_json(dir, e, "hello", 0);
            let top = |v: &Value| -> Vec<(u64, f64)> {
                v["top_logits"]
                    .as_array()
                    .expect("top")
                    .iter()
                    .map(|t| (t[0].as_u64().expect("id"), t[1].as_f64().expect("logit")))
                    .collect()
            };
            let (ta, tb) = (top(&a), top(&b));
            let mut common = 0;
            for (tok, la) in &ta {
                if let Some((_, lb)) = tb.iter().find(|(t, _)| t == tok) {
                    common += 1;
                    assert!(
                        (la - lb).abs() < tol,
                        "{}: exit {e} token {tok}: {la} vs {lb}",
                        dir.display()
                    );
                }
            }
            assert!(common >= 7, "{}: top-10 overlap {common}", dir.display());
        }
    }
}

#[test]
fn help_explains_exits() {
    let h = ok(&["model", "run", "--help"]);
    assert!(h.contains("What an exit is"), "{h}");
    assert!(h.contains("Examples"), "{h}");
    let h = ok(&["bench", "model", "--help"]);
    assert!(h.contains("reference"), "{h}");
}

#[test]
fn bench_model_smoke_on_tiny() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let json = tmp.path().join("bench.json");
    let out = ok(&[
        "bench",
        "model",
        "--preset",
        "tiny",
        "--threads",
        "1",
        "--prompt-len",
        "8",
        "--decode-tokens",
        "4",
        "--reps",
        "1",
        "--json",
        json.to_str().expect("utf-8 path"),
    ]);
    assert!(out.contains("decode tok/s"), "{out}");
    let r: Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("bench json")).expect("json");
    let run = &r["runs"][0];
    assert_eq!(run["threads"].as_u64(), Some(1));
    assert_eq!(run["exits"].as_array().expect("exits").len(), 3);
    let reference = &run["reference"];
    assert!(reference["max_abs_diff_prefill"].as_f64().expect("diff") < 1e-3);
    assert!(reference["max_abs_diff_decode"].as_f64().expect("diff") < 1e-3);
    assert!(reference["ratio_decode"].as_f64().expect("ratio") > 0.0);
    assert!(run["peak_rss_kb"].as_u64().expect("rss") > 0);
}

/// `model init --preset moe-small` alone gives a qwen2_moe family whose deep layers are MoE.
#[test]
fn moe_small_defaults_to_qwen2_moe_with_deep_moe_layers() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("moe");
    ok(&[
        "model",
        "init",
        "--preset",
        "moe-small",
        "--out",
        dir.to_str().expect("utf-8 path"),
    ]);
    let cfg: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("config.json")).expect("config.json"),
    )
    .expect("json");
    assert_eq!(cfg["model_type"], "qwen2_moe");
    assert_eq!(cfg["num_experts"], 8);
    assert_eq!(cfg["num_experts_per_tok"], 2);
    // Layers 0-3 dense, 4-7 MoE.
    assert_eq!(cfg["mlp_only_layers"], serde_json::json!([0, 1, 2, 3]));
}

/// `flow-node model inspect DIR | head`: a reader that goes away ends the command quietly
/// (no "failed printing to stdout" panic).
#[test]
fn inspect_into_a_closed_pipe_ends_quietly() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("tiny");
    init(&dir, "tiny", "llama", 3, "f32");
    let mut child = Command::new(env!("CARGO_BIN_EXE_flow-node"))
        .args(["model", "inspect", dir.to_str().expect("utf-8 path")])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run flow-node");
    // Close the read end before the table is printed.
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("wait");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!stderr.contains("Broken pipe"), "{stderr}");
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        assert!(
            out.status.success() || out.status.signal() == Some(libc::SIGPIPE),
            "{:?}: {stderr}",
            out.status
        );
    }
}
