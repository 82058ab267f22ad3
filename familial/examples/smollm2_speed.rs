//! End-to-end speed of SmolLM2-135M-Instruct (GGUF) on the CPU: one prefill of a 128-token
//! prompt (a single call) and 64 greedy decode steps, median of `REPS` runs (default 5).
//!
//! ```text
//! RAYON_NUM_THREADS=1 cargo run --release -p flow-familial --example smollm2_speed [model.gguf]
//! ```
//!
//! Like the node's engine (`node/src/engine.rs`), every step runs inside a rayon pool of
//! `RAYON_NUM_THREADS` threads (`pool.install`) with a matmul `Team` of as many, so
//! kernels split work with the pool's other workers instead of handing each op over from
//! an outside thread.
//!
//! The model path defaults to `~/.cache/aiflow/models/smollm2-135m-instruct/model.gguf`.
//! `PROMPT_JSON=1` prints the prompt ids (for the llama.cpp worker) and exits. Prints one
//! line per run and a final `median` line with prefill and decode tok/s.

use std::time::Instant;

use flow_familial::{ModelSource, Rows, Seg};

/// The benchmark prompt: 128 fixed, ordinary token ids.
fn prompt() -> Vec<u32> {
    (0..128u32).map(|i| 200 + (i * 7919) % 40000).collect()
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> flow_familial::Result<()> {
    let ids = prompt();
    if std::env::var("PROMPT_JSON").is_ok() {
        println!("{}", serde_json::to_string(&ids).unwrap_or_default());
        return Ok(());
    }
    let path = std::env::args()
        .nth(1)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(std::env::var("HOME").unwrap_or_default())
                .join(".cache/aiflow/models/smollm2-135m-instruct/model.gguf")
        });
    let reps: usize = std::env::var("REPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let decode: usize = std::env::var("DECODE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(64);
    let threads: usize = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| flow_familial::Error::Invalid(format!("thread pool: {e}")))?;
    let team = flow_familial::quant::Team::new(threads)?;
    pool.install(|| team.install(|| run(&path, &ids, reps, decode)))
}

fn run(
    path: &std::path::Path,
    ids: &[u32],
    reps: usize,
    decode: usize,
) -> flow_familial::Result<()> {
    let t = Instant::now();
    let src = ModelSource::open(path)?;
    let cfg = src.config()?;
    let exit = cfg.last_exit().point;
    let model = src.load_part(cfg.clone(), flow_familial::Part::full(&cfg))?;
    println!(
        "loaded {} in {:.0} ms; threads {}",
        path.display(),
        t.elapsed().as_secs_f64() * 1e3,
        rayon::current_num_threads()
    );
    let step = |ids: &[u32], pos: usize, cache: &mut flow_familial::SeqCache| {
        let seg = [Seg::new(pos, ids.len())];
        let h = model.embed(ids)?;
        let h = model.run_layers(&h, 0..exit, &seg, &mut [&mut *cache])?;
        let l = model.exit(&h, exit, &seg, &mut [cache], Rows::Last)?;
        let v: Vec<f32> = l.squeeze(0)?.to_vec1()?;
        flow_familial::Result::Ok(flow_familial::sample::argmax(&v))
    };
    let (mut pre, mut dec) = (Vec::new(), Vec::new());
    // One warm-up run, then `reps` timed ones.
    for rep in 0..=reps {
        let mut cache = model.new_cache();
        let t = Instant::now();
        let mut tok = step(ids, 0, &mut cache)?;
        let p = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let mut toks = Vec::with_capacity(decode);
        for i in 0..decode {
            tok = step(&[tok], ids.len() + i, &mut cache)?;
            toks.push(tok);
        }
        let d = t.elapsed().as_secs_f64();
        if rep == 0 {
            println!("warm-up; greedy ids {:?}", &toks[..toks.len().min(8)]);
            continue;
        }
        println!(
            "run {rep}: prefill {:.1} ms ({:.1} tok/s), decode {decode} in {:.1} ms ({:.1} tok/s)",
            p * 1e3,
            ids.len() as f64 / p,
            d * 1e3,
            decode as f64 / d
        );
        pre.push(p);
        dec.push(d);
    }
    let (p, d) = (median(&mut pre), median(&mut dec));
    println!(
        "median: prefill_ms {:.1} prefill_tok_s {:.1} decode_ms {:.1} decode_tok_s {:.1}",
        p * 1e3,
        ids.len() as f64 / p,
        d * 1e3,
        decode as f64 / d
    );
    Ok(())
}
