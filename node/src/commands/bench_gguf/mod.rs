//! `flow-node bench model --model <GGUF>`: our decoder beside llama.cpp on the same file,
//! same thread counts, each measurement in a fresh process, the two engines alternated
//! (ours, llama.cpp, llama.cpp, ours, …: which goes first swaps every repetition) so
//! background load hits both alike; medians and ratios.
//!
//! llama.cpp runs through llama-cpp-python (`pip install llama-cpp-python`) with the worker
//! script beside this file; both sides keep an f32 KV cache and greedy-decode the same
//! prompt ids. Per run: prefill of `--prompt-len` tokens in one call, `--decode-tokens`
//! single-token steps, and peak RSS (VmHWM) of the process.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context};
use flow_familial::{ModelSource, Part, Rows, Seg};
use serde::{Deserialize, Serialize};

use super::bench_model::BenchModelArgs;
use super::OsInstant;

const LLAMACPP_WORKER: &str = include_str!("llamacpp_worker.py");

/// One measurement (one process) of either engine.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Run {
    pub engine: String,
    pub load_ms: f64,
    pub prefill_ms: f64,
    pub decode_ms: f64,
    pub decode_steps: usize,
    pub hwm_kb: u64,
}

/// Medians per engine and thread count.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub threads: usize,
    pub engine: String,
    pub prefill_tok_s: f64,
    pub decode_tok_s: f64,
    pub peak_rss_mib: f64,
    pub runs: Vec<Run>,
}

/// The prompt both engines prefill: fixed ids spread over the vocabulary (no BOS).
fn prompt_ids(len: usize, vocab: usize) -> Vec<u32> {
    (0..len)
        .map(|i| (100 + (i * 7919) % (vocab.saturating_sub(200).max(1))) as u32)
        .collect()
}

/// The in-process measurement (`--worker`): load, warm up, time one prefill and the
/// decode steps.
pub fn worker(path: &Path, a: &BenchModelArgs) -> anyhow::Result<Run> {
    let t0 = OsInstant::now();
    let src = ModelSource::open(path)?;
    let cfg = src.config()?;
    let exit = cfg.last_exit().point;
    let model = src.load_part(cfg.clone(), Part::full(&cfg))?;
    let load_ms = t0.elapsed().as_secs_f64() * 1e3;
    let prompt = prompt_ids(a.prompt_len, cfg.vocab_size);
    let prefill = |cache: &mut flow_familial::SeqCache| -> anyhow::Result<Vec<f32>> {
        let seg = [Seg::new(0, prompt.len())];
        let h = model.embed(&prompt)?;
        let h = model.run_layers(&h, 0..exit, &seg, &mut [&mut *cache])?;
        let l = model.exit(&h, exit, &seg, &mut [cache], Rows::Last)?;
        Ok(l.squeeze(0)?.to_vec1()?)
    };
    prefill(&mut model.new_cache())?; // warm-up
    let mut cache = model.new_cache();
    let t = OsInstant::now();
    let mut row = prefill(&mut cache)?;
    let prefill_ms = t.elapsed().as_secs_f64() * 1e3;
    let t = OsInstant::now();
    for pos in prompt.len()..prompt.len() + a.decode_tokens {
        let next = [flow_familial::sample::argmax(&row)];
        let seg = [Seg::new(pos, 1)];
        let h = model.embed(&next)?;
        let h = model.run_layers(&h, 0..exit, &seg, &mut [&mut cache])?;
        let l = model.exit(&h, exit, &seg, &mut [&mut cache], Rows::Last)?;
        row = l.squeeze(0)?.to_vec1()?;
    }
    Ok(Run {
        engine: "aiflow".into(),
        load_ms,
        prefill_ms,
        decode_ms: t.elapsed().as_secs_f64() * 1e3,
        decode_steps: a.decode_tokens,
        hwm_kb: super::bench_model::proc_status_kb("VmHWM:"),
    })
}

fn last_json_line<T: for<'de> Deserialize<'de>>(out: &[u8], what: &str) -> anyhow::Result<T> {
    let text = String::from_utf8_lossy(out);
    let line = text.lines().last().unwrap_or_default();
    serde_json::from_str(line).with_context(|| format!("parsing {what}'s output: {line:?}"))
}

fn ours(path: &Path, t: usize, a: &BenchModelArgs) -> anyhow::Result<Run> {
    let exe = std::env::current_exe().context("locating the flow-node binary")?;
    let out = super::bench_model::worker_command(&exe, path, t, a)
        .output()
        .context("running the benchmark child process")?;
    if !out.status.success() {
        bail!("our benchmark worker with {t} thread(s) failed (see above)");
    }
    last_json_line(&out.stdout, "our worker")
}

fn llama_cpp(script: &Path, path: &Path, t: usize, a: &BenchModelArgs) -> anyhow::Result<Run> {
    let vocab = ModelSource::open(path)?.config()?.vocab_size;
    let cfg = serde_json::json!({
        "model": path,
        "n_ctx": (a.prompt_len + a.decode_tokens + 16).next_power_of_two().max(256),
        "threads": t,
        "prompt": prompt_ids(a.prompt_len, vocab),
        "decode": a.decode_tokens,
    });
    let python = std::env::var("AIFLOW_PYTHON").unwrap_or_else(|_| "python3".into());
    let out = Command::new(&python)
        .arg(script)
        .arg(cfg.to_string())
        .env("OMP_NUM_THREADS", t.to_string())
        .output()
        .with_context(|| format!("running {python} (is llama-cpp-python installed?)"))?;
    if !out.status.success() {
        bail!(
            "the llama.cpp worker failed ({}); install it with `pip install llama-cpp-python`, \
             or run without --vs-llama-cpp. stderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or_default()
        );
    }
    last_json_line(&out.stdout, "the llama.cpp worker")
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn row(threads: usize, engine: &str, runs: Vec<Run>, a: &BenchModelArgs) -> Row {
    Row {
        threads,
        engine: engine.into(),
        prefill_tok_s: median(
            runs.iter()
                .map(|r| a.prompt_len as f64 / (r.prefill_ms / 1e3))
                .collect(),
        ),
        decode_tok_s: median(
            runs.iter()
                .map(|r| r.decode_steps as f64 / (r.decode_ms / 1e3))
                .collect(),
        ),
        peak_rss_mib: median(runs.iter().map(|r| r.hwm_kb as f64 / 1024.0).collect()),
        runs,
    }
}

/// The parent: alternate the engines (swapping which goes first) per repetition and thread
/// count, print the table.
pub fn run(path: &Path, a: &BenchModelArgs) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let script = dir.path().join("llamacpp_worker.py");
    std::fs::write(&script, LLAMACPP_WORKER)?;
    let with_llama = a.vs_llama_cpp;
    let mut rows = Vec::new();
    for &t in &a.threads {
        let (mut o, mut l) = (Vec::new(), Vec::new());
        for rep in 0..a.reps {
            eprintln!("threads {t}: repetition {}/{}", rep + 1, a.reps);
            // Which engine goes first swaps every repetition: on a shared VM the first
            // process of a pair was measured ~1.15x slower (docs/benchmarks.md, session 15).
            if with_llama && rep % 2 == 1 {
                l.push(llama_cpp(&script, path, t, a)?);
                o.push(ours(path, t, a)?);
            } else {
                o.push(ours(path, t, a)?);
                if with_llama {
                    l.push(llama_cpp(&script, path, t, a)?);
                }
            }
        }
        rows.push(row(t, "aiflow", o, a));
        if with_llama {
            rows.push(row(t, "llama.cpp", l, a));
        }
    }
    println!(
        "{} — prompt {} tokens, {} decode steps, {} repetitions (medians); load average {}",
        path.display(),
        a.prompt_len,
        a.decode_tokens,
        a.reps,
        super::bench_model::loadavg()
    );
    println!(
        "{:>7} {:<10} {:>13} {:>12} {:>13}",
        "threads", "engine", "prefill tok/s", "decode tok/s", "peak RSS MiB"
    );
    for r in &rows {
        println!(
            "{:>7} {:<10} {:>13.1} {:>12.1} {:>13.1}",
            r.threads, r.engine, r.prefill_tok_s, r.decode_tok_s, r.peak_rss_mib
        );
    }
    if with_llama {
        for pair in rows.chunks(2) {
            if let [ours, llama] = pair {
                println!(
                    "threads {}: aiflow / llama.cpp = prefill {:.2}x, decode {:.2}x, peak RSS {:.2}x",
                    ours.threads,
                    ours.prefill_tok_s / llama.prefill_tok_s,
                    ours.decode_tok_s / llama.decode_tok_s,
                    ours.peak_rss_mib / llama.peak_rss_mib
                );
            }
        }
    }
    if let Some(p) = &a.json {
        let j = serde_json::json!({
            "command": std::env::args().collect::<Vec<_>>().join(" "),
            "model": path,
            "prompt_len": a.prompt_len,
            "decode_tokens": a.decode_tokens,
            "reps": a.reps,
            "rows": rows,
        });
        std::fs::write(p, serde_json::to_string_pretty(&j)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}
