//! `flow-node bench model`: prefill and decode tokens/s of every exit of a family, peak RSS
//! and load time, against a plain reference loop over candle-nn building blocks that runs the
//! deepest exit's forward on the same weights in the same process.
//!
//! Each thread count runs in a child process of this binary (rayon's pool is sized once per
//! process, and peak RSS is per process); the parent collects the children's JSON.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};
use candle_core::{DType, Device, Module, Tensor};
use flow_familial::config::{ExitBlock, Ffn, HeadRef, NormRef};
use flow_familial::init::{init_weights, preset_config, write_checkpoint, Preset};
use flow_familial::sample::argmax;
use flow_familial::weights::{checkpoint_files, Checkpoint, TensorSource};
use flow_familial::{FamilialModel, Layout, ModelConfig, Rows, Seg, SeqCache};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};

use super::model::{group, human_bytes, parse_layout, parse_preset};
use super::OsInstant;

/// Arguments.
#[derive(clap::Args, Debug)]
#[command(after_long_help = "\
For every exit E of the family: prefill tokens/s (the whole prompt in one call) and decode
tokens/s (one token per step with the KV cache), each the median of --reps repetitions.
In the same process, a plain reference loop built from candle-nn pieces (Linear, rms_norm,
rope, KvCache, separate q/k/v projections) runs the deepest exit's forward on the same
weights; its logits are checked against ours before anything is timed, and ours/reference
is reported for prefill and decode (measured interleaved, so background load hits both).
Also: load time next to a plain read of the weight files, RSS growth during load and peak
RSS (VmHWM) of each run.

Examples:
  flow-node bench model                               # fresh `small` family in a temp dir
  flow-node bench model --model models/small --threads 1,2 --json bench.json
  flow-node bench model --preset tiny --prompt-len 32 --decode-tokens 16 --reps 3
  flow-node bench model --model smollm2-135m-instruct --vs-llama-cpp --threads 1,2

With a GGUF model (a pulled name or a .gguf file) the quantized decoder is measured instead,
each repetition in a fresh process, and --vs-llama-cpp runs llama.cpp on the same file in
alternation (medians, ratios, peak RSS).")]
pub struct BenchModelArgs {
    /// Checkpoint directory to benchmark. Without it, a fresh --preset family is initialised
    /// in a temporary directory.
    #[arg(value_parser = super::model_arg, long)]
    pub model: Option<PathBuf>,
    /// Preset to initialise when no --model is given.
    #[arg(long, default_value = "small", value_parser = parse_preset, conflicts_with = "model")]
    pub preset: Preset,
    /// Layout of the fresh preset family.
    #[arg(long, default_value = "ruyi_qwen2", value_parser = parse_layout, conflicts_with = "model")]
    pub layout: Layout,
    /// Matmul thread counts to measure (comma-separated); each runs in its own process.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    pub threads: Vec<usize>,
    /// Prompt tokens for prefill.
    #[arg(long, default_value_t = 128)]
    pub prompt_len: usize,
    /// Tokens generated after the prompt for decode timing.
    #[arg(long, default_value_t = 64)]
    pub decode_tokens: usize,
    /// Timed repetitions per measurement (after one warm-up); medians are reported.
    #[arg(long, default_value_t = 5)]
    pub reps: usize,
    /// Also write the full results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Run the model inside a rayon pool of --threads threads (`ThreadPool::install`), so
    /// candle's parallel elementwise/norm/softmax kernels run inline on the calling worker
    /// instead of being handed from the main thread to the global pool for every op.
    #[arg(long)]
    pub in_pool: bool,
    /// With a GGUF --model: also run llama.cpp (llama-cpp-python) on the same file, same
    /// threads, alternating with ours, and print the ratios.
    #[arg(long)]
    pub vs_llama_cpp: bool,
    /// Internal: run one thread count in this process and print JSON.
    #[arg(long, hide = true)]
    pub worker: bool,
}

/// One exit's numbers.
#[derive(Debug, Serialize, Deserialize, Clone)]
pub struct ExitResult {
    pub exit: usize,
    pub blocks: usize,
    pub prefill_tok_s: f64,
    pub decode_tok_s: f64,
    pub prefill_ms: Vec<f64>,
    pub decode_ms: Vec<f64>,
}

/// Load numbers.
#[derive(Debug, Serialize, Deserialize, Clone)]
pub struct LoadResult {
    pub file_bytes: u64,
    /// `std::fs::read` of every weight file (page cache warm).
    pub plain_read_ms: f64,
    /// `Checkpoint::open`: mmap and header parse only.
    pub mmap_open_ms: f64,
    /// `FamilialModel::load`: open, map, check and build every tensor of the family.
    pub load_ms: f64,
    pub rss_before_kb: u64,
    pub rss_after_kb: u64,
    /// Peak RSS right after the load, before any benchmark.
    pub hwm_after_load_kb: u64,
}

/// Ours vs the candle-nn reference loop at the deepest exit.
#[derive(Debug, Serialize, Deserialize, Clone)]
pub struct ReferenceResult {
    pub exit: usize,
    pub max_abs_diff_prefill: f32,
    pub max_abs_diff_decode: f32,
    pub ours_prefill_tok_s: f64,
    pub ours_decode_tok_s: f64,
    pub ref_prefill_tok_s: f64,
    pub ref_decode_tok_s: f64,
    pub ratio_prefill: f64,
    pub ratio_decode: f64,
}

/// One thread count.
#[derive(Debug, Serialize, Deserialize, Clone)]
pub struct WorkerResult {
    pub threads: usize,
    pub load: LoadResult,
    pub exits: Vec<ExitResult>,
    pub reference: Option<ReferenceResult>,
    pub reference_note: Option<String>,
    pub peak_rss_kb: u64,
}

/// The whole run.
#[derive(Debug, Serialize, Deserialize)]
pub struct BenchReport {
    pub command: String,
    pub model: String,
    pub layout: String,
    pub parameters: u64,
    pub prompt_len: usize,
    pub decode_tokens: usize,
    pub reps: usize,
    /// Whether the model ran inside `rayon::ThreadPool::install`.
    pub in_pool: bool,
    pub cores: usize,
    pub loadavg_before: String,
    pub loadavg_after: String,
    pub runs: Vec<WorkerResult>,
}

pub fn run(a: BenchModelArgs) -> anyhow::Result<()> {
    if a.reps == 0 || a.prompt_len == 0 || a.decode_tokens == 0 {
        bail!("--reps, --prompt-len and --decode-tokens must be at least 1");
    }
    if let Some(m) = a
        .model
        .as_deref()
        .filter(|m| flow_familial::source::is_gguf(m))
    {
        if a.worker {
            // Inside a pool of --threads workers and a matmul team of as many, as the node's
            // engine thread runs the model.
            let threads = *a.threads.first().unwrap_or(&1);
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .context("building the rayon pool")?;
            let team = flow_familial::quant::Team::new(threads)?;
            let r = pool.install(|| team.install(|| super::bench_gguf::worker(m, &a)))?;
            println!("{}", serde_json::to_string(&r)?);
            return Ok(());
        }
        return super::bench_gguf::run(m, &a);
    }
    if a.worker {
        let dir = a
            .model
            .as_deref()
            .context("internal: --worker needs --model")?;
        let threads = *a.threads.first().unwrap_or(&1);
        let r = if a.in_pool {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .context("building the rayon pool")?;
            pool.install(|| worker(dir, threads, &a))?
        } else {
            worker(dir, threads, &a)?
        };
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    if a.threads.is_empty() || a.threads.contains(&0) {
        bail!("--threads needs one or more positive counts, e.g. --threads 1,2");
    }
    let mut _tmp = None;
    let (dir, label) = match &a.model {
        Some(d) => (d.clone(), d.display().to_string()),
        None => {
            let t = tempfile::tempdir().context("creating a temporary directory")?;
            let cfg = preset_config(a.preset, a.layout)?;
            let spinner = spinner(&format!("initialising a fresh {:?} family", a.preset));
            let w = init_weights(&cfg, 0)?;
            write_checkpoint(&cfg, &w, DType::F32, t.path())?;
            spinner.finish_and_clear();
            let label = format!(
                "fresh --preset {} --layout {} --seed 0 (f32, temp dir)",
                format!("{:?}", a.preset).to_lowercase(),
                a.layout.model_type()
            );
            let d = t.path().to_path_buf();
            _tmp = Some(t);
            (d, label)
        }
    };
    let cfg = flow_familial::source::model_config(&dir)
        .with_context(|| format!("reading the model in {}", dir.display()))?;
    check_lengths(&cfg, &a)?;
    let parameters = {
        let ck = Checkpoint::open(&dir)?;
        ck.tensor_infos()
            .values()
            .map(|(_, s)| s.iter().product::<usize>() as u64)
            .sum()
    };
    let exe = std::env::current_exe().context("locating the flow-node binary")?;
    let loadavg_before = loadavg();
    let mut runs = Vec::new();
    for &t in &a.threads {
        eprintln!("threads {t}: measuring (child process)...");
        let out = worker_command(&exe, &dir, t, &a)
            .args(["--reps", &a.reps.to_string()])
            .args(a.in_pool.then_some("--in-pool"))
            .output()
            .context("running the benchmark child process")?;
        if !out.status.success() {
            bail!("the benchmark with {t} thread(s) failed (see above)");
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text.lines().last().unwrap_or_default();
        let r: WorkerResult = serde_json::from_str(line)
            .with_context(|| format!("parsing the child's output: {line}"))?;
        runs.push(r);
    }
    let report = BenchReport {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        model: label,
        layout: cfg.layout.model_type().into(),
        parameters,
        prompt_len: a.prompt_len,
        decode_tokens: a.decode_tokens,
        reps: a.reps,
        in_pool: a.in_pool,
        cores: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        loadavg_before,
        loadavg_after: loadavg(),
        runs,
    };
    print_report(&report);
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_string_pretty(&report)? + "\n")
            .with_context(|| format!("writing {}", p.display()))?;
        eprintln!("wrote {}", p.display());
    }
    Ok(())
}

fn check_lengths(cfg: &ModelConfig, a: &BenchModelArgs) -> anyhow::Result<()> {
    let need = a.prompt_len + a.decode_tokens + 1;
    if need > cfg.max_position_embeddings {
        bail!(
            "--prompt-len {} + --decode-tokens {} exceed the model's {} positions",
            a.prompt_len,
            a.decode_tokens,
            cfg.max_position_embeddings
        );
    }
    Ok(())
}

fn spinner(msg: &str) -> ProgressBar {
    let s = ProgressBar::new_spinner();
    s.set_message(msg.to_string());
    s.enable_steady_tick(Duration::from_millis(120));
    s
}

fn print_report(r: &BenchReport) {
    println!(
        "model: {} ({}, {} parameters)",
        r.model,
        r.layout,
        group(r.parameters)
    );
    println!(
        "prompt {} tokens, decode {} tokens, median of {} reps{}; {} cores, load average before {} / after {}",
        r.prompt_len,
        r.decode_tokens,
        r.reps,
        if r.in_pool { ", inside a rayon pool" } else { "" },
        r.cores,
        r.loadavg_before,
        r.loadavg_after
    );
    println!();
    println!(
        "{:>7} {:>5} {:>6} {:>14} {:>13}",
        "threads", "exit", "blocks", "prefill tok/s", "decode tok/s"
    );
    for run in &r.runs {
        for e in &run.exits {
            println!(
                "{:>7} {:>5} {:>6} {:>14.0} {:>13.0}",
                run.threads, e.exit, e.blocks, e.prefill_tok_s, e.decode_tok_s
            );
        }
    }
    println!();
    println!(
        "reference loop (candle-nn building blocks) at the deepest exit, measured interleaved:"
    );
    println!(
        "{:>7} {:>5} {:>11} {:>11} {:>9} {:>11} {:>11} {:>9} {:>10}",
        "threads",
        "exit",
        "ours pre",
        "ref pre",
        "ratio",
        "ours dec",
        "ref dec",
        "ratio",
        "max |Δ|"
    );
    for run in &r.runs {
        match &run.reference {
            Some(x) => println!(
                "{:>7} {:>5} {:>11.0} {:>11.0} {:>9.3} {:>11.0} {:>11.0} {:>9.3} {:>10.1e}",
                run.threads,
                x.exit,
                x.ours_prefill_tok_s,
                x.ref_prefill_tok_s,
                x.ratio_prefill,
                x.ours_decode_tok_s,
                x.ref_decode_tok_s,
                x.ratio_decode,
                x.max_abs_diff_prefill.max(x.max_abs_diff_decode)
            ),
            None => println!(
                "{:>7}  skipped: {}",
                run.threads,
                run.reference_note.as_deref().unwrap_or("")
            ),
        }
    }
    println!();
    println!(
        "{:>7} {:>11} {:>12} {:>12} {:>10} {:>16} {:>15} {:>10}",
        "threads",
        "weights",
        "plain read",
        "mmap open",
        "load",
        "RSS during load",
        "peak after load",
        "peak RSS"
    );
    for run in &r.runs {
        let l = &run.load;
        println!(
            "{:>7} {:>11} {:>9.2} ms {:>9.2} ms {:>7.2} ms {:>16} {:>15} {:>10}",
            run.threads,
            human_bytes(l.file_bytes),
            l.plain_read_ms,
            l.mmap_open_ms,
            l.load_ms,
            format!(
                "+{}",
                human_bytes(l.rss_after_kb.saturating_sub(l.rss_before_kb) * 1024)
            ),
            human_bytes(l.hwm_after_load_kb * 1024),
            human_bytes(run.peak_rss_kb * 1024)
        );
    }
}

// ---------------------------------------------------------------------------------------
// the worker (one thread count, one process)

/// This binary as a `bench model --worker` child measuring `model` with `t` threads.
pub(crate) fn worker_command(exe: &Path, model: &Path, t: usize, a: &BenchModelArgs) -> Command {
    let mut c = Command::new(exe);
    c.args(["bench", "model", "--worker", "--model"])
        .arg(model)
        .args(["--threads", &t.to_string()])
        .args(["--prompt-len", &a.prompt_len.to_string()])
        .args(["--decode-tokens", &a.decode_tokens.to_string()])
        .env("RAYON_NUM_THREADS", t.to_string())
        .env("CANDLE_NUM_THREADS", "1")
        .stderr(std::process::Stdio::inherit());
    c
}

pub(crate) fn proc_status_kb(key: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with(key)).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<u64>().ok())
            })
        })
        .unwrap_or(0)
}

pub(crate) fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "n/a".into())
}

pub(crate) fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    if s.is_empty() {
        return 0.0;
    }
    let m = s.len() / 2;
    if s.len() % 2 == 1 {
        s[m]
    } else {
        (s[m - 1] + s[m]) / 2.0
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The benchmark prompt: BOS (if any) then bytes of a fixed text, `len` tokens in all.
fn bench_prompt(cfg: &ModelConfig, len: usize) -> Vec<u32> {
    let text = b"The quick brown fox jumps over the lazy dog. 12+34=46; key k7 -> v3. ";
    let mut p: Vec<u32> = cfg.bos_token_id.into_iter().collect();
    let mut i = 0;
    while p.len() < len {
        p.push(u32::from(text[i % text.len()]) % cfg.vocab_size as u32);
        i += 1;
    }
    p.truncate(len);
    p
}

/// Something that can prefill a prompt and then decode one token at a time.
trait Runner {
    type Cache;
    fn new_cache(&self) -> Self::Cache;
    /// Logits `[vocab]` of the last of `tokens`, which start at `pos`.
    fn step(&self, tokens: &[u32], pos: usize, cache: &mut Self::Cache)
        -> anyhow::Result<Vec<f32>>;
}

struct Ours<'a> {
    model: &'a FamilialModel,
    exit: usize,
}

impl Runner for Ours<'_> {
    type Cache = SeqCache;
    fn new_cache(&self) -> SeqCache {
        self.model.new_cache()
    }
    fn step(&self, tokens: &[u32], pos: usize, cache: &mut SeqCache) -> anyhow::Result<Vec<f32>> {
        let segs = [Seg::new(pos, tokens.len())];
        let h = self.model.embed(tokens)?;
        let h = self
            .model
            .run_layers(&h, 0..self.exit, &segs, &mut [&mut *cache])?;
        let l = self
            .model
            .exit(&h, self.exit, &segs, &mut [&mut *cache], Rows::Last)?;
        Ok(l.squeeze(0)?.to_vec1()?)
    }
}

/// One timed repetition: prefill `prompt`, then decode `n` greedy tokens.
fn rep<R: Runner>(r: &R, prompt: &[u32], n: usize) -> anyhow::Result<(Duration, Duration)> {
    let mut cache = r.new_cache();
    let t0 = OsInstant::now();
    let row = r.step(prompt, 0, &mut cache)?;
    let prefill = t0.elapsed();
    let mut next = argmax(&row);
    let t1 = OsInstant::now();
    for pos in prompt.len()..prompt.len() + n {
        let row = r.step(&[next], pos, &mut cache)?;
        next = argmax(&row);
    }
    Ok((prefill, t1.elapsed()))
}

fn worker(dir: &Path, threads: usize, a: &BenchModelArgs) -> anyhow::Result<WorkerResult> {
    flow_familial::set_compute_threads(threads);
    // Load. The page cache is warmed with a streaming read through a small buffer (no
    // large heap allocation that malloc could keep and hide the load's RSS growth), then
    // the mmap open alone, then the full load, and only then a plain whole-file read of
    // the same bytes for comparison.
    let files = checkpoint_files(dir)?;
    let mut file_bytes = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    for f in &files {
        let mut r = std::fs::File::open(f).with_context(|| format!("opening {}", f.display()))?;
        loop {
            let k = r
                .read(&mut buf)
                .with_context(|| format!("reading {}", f.display()))?;
            if k == 0 {
                break;
            }
            file_bytes += k as u64;
        }
    }
    drop(buf);
    let t = OsInstant::now();
    let ck = Checkpoint::open(dir)?;
    let mmap_open_ms = ms(t.elapsed());
    drop(ck);
    let rss_before_kb = proc_status_kb("VmRSS:");
    let t = OsInstant::now();
    let model = FamilialModel::load(dir)?;
    let load_ms = ms(t.elapsed());
    let rss_after_kb = proc_status_kb("VmRSS:");
    let hwm_after_load_kb = proc_status_kb("VmHWM:");
    let t = OsInstant::now();
    for f in &files {
        let b = std::fs::read(f).with_context(|| format!("reading {}", f.display()))?;
        std::hint::black_box(&b);
    }
    let plain_read_ms = ms(t.elapsed());
    let cfg = model.config().clone();

    let prompt = bench_prompt(&cfg, a.prompt_len);
    let n = a.decode_tokens;
    let exits = cfg.exit_points();
    let ref_steps = 2 * (a.reps + 1);
    let pb = ProgressBar::new((exits.len() * (a.reps + 1) + ref_steps) as u64);
    pb.set_style(
        ProgressStyle::with_template(&format!(
            "threads {threads} [{{bar:30}}] {{pos}}/{{len}} {{msg}} ({{elapsed}})"
        ))
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut results = Vec::new();
    for &e in &exits {
        pb.set_message(format!("exit {e}"));
        let ours = Ours {
            model: &model,
            exit: e,
        };
        let mut pre = Vec::new();
        let mut dec = Vec::new();
        for i in 0..=a.reps {
            let (p, d) = rep(&ours, &prompt, n)?;
            pb.inc(1);
            if i > 0 {
                pre.push(ms(p));
                dec.push(ms(d));
            }
        }
        let spec = cfg.exits[cfg.exit_index(e)?];
        results.push(ExitResult {
            exit: e,
            blocks: spec.depth(),
            prefill_tok_s: prompt.len() as f64 / (median(&pre) / 1e3),
            decode_tok_s: n as f64 / (median(&dec) / 1e3),
            prefill_ms: pre,
            decode_ms: dec,
        });
    }

    // The reference loop at the deepest exit.
    let deepest = cfg.last_exit().point;
    let (reference, reference_note) = match RefModel::load(dir, &cfg) {
        Err(why) => (None, Some(why.to_string())),
        Ok(None) => (
            None,
            Some("the reference loop covers dense FFNs only (this family has MoE layers)".into()),
        ),
        Ok(Some(rm)) => {
            pb.set_message(format!("reference, exit {deepest}"));
            let ours = Ours {
                model: &model,
                exit: deepest,
            };
            let (dp, dd) = compare(&ours, &rm, &prompt, n.min(16))?;
            let tol = 1e-3;
            if dp > tol || dd > tol {
                bail!(
                    "the reference loop disagrees with our forward (max |Δlogit| prefill {dp:e}, \
                     decode {dd:e}); timings would not compare the same computation"
                );
            }
            let (mut op, mut od, mut rp, mut rd) = (vec![], vec![], vec![], vec![]);
            for i in 0..=a.reps {
                let (p1, d1) = rep(&ours, &prompt, n)?;
                pb.inc(1);
                let (p2, d2) = rep(&rm, &prompt, n)?;
                pb.inc(1);
                if i > 0 {
                    op.push(ms(p1));
                    od.push(ms(d1));
                    rp.push(ms(p2));
                    rd.push(ms(d2));
                }
            }
            let tps = |v: &[f64], k: usize| k as f64 / (median(v) / 1e3);
            let (ours_p, ours_d) = (tps(&op, prompt.len()), tps(&od, n));
            let (ref_p, ref_d) = (tps(&rp, prompt.len()), tps(&rd, n));
            (
                Some(ReferenceResult {
                    exit: deepest,
                    max_abs_diff_prefill: dp,
                    max_abs_diff_decode: dd,
                    ours_prefill_tok_s: ours_p,
                    ours_decode_tok_s: ours_d,
                    ref_prefill_tok_s: ref_p,
                    ref_decode_tok_s: ref_d,
                    ratio_prefill: ours_p / ref_p,
                    ratio_decode: ours_d / ref_d,
                }),
                None,
            )
        }
    };
    pb.finish_and_clear();
    Ok(WorkerResult {
        threads,
        load: LoadResult {
            file_bytes,
            plain_read_ms,
            mmap_open_ms,
            load_ms,
            rss_before_kb,
            rss_after_kb,
            hwm_after_load_kb,
        },
        exits: results,
        reference,
        reference_note,
        peak_rss_kb: proc_status_kb("VmHWM:"),
    })
}

/// Max |Δ| of the prompt's last logits, and over `steps` decode steps fed the same tokens.
fn compare<A: Runner, B: Runner>(
    a: &A,
    b: &B,
    prompt: &[u32],
    steps: usize,
) -> anyhow::Result<(f32, f32)> {
    let diff = |x: &[f32], y: &[f32]| {
        x.iter()
            .zip(y)
            .map(|(p, q)| (p - q).abs())
            .fold(0f32, f32::max)
    };
    let (mut ca, mut cb) = (a.new_cache(), b.new_cache());
    let ra = a.step(prompt, 0, &mut ca)?;
    let rb = b.step(prompt, 0, &mut cb)?;
    if ra.len() != rb.len() {
        bail!(
            "reference logits have {} entries, ours {}",
            rb.len(),
            ra.len()
        );
    }
    let dp = diff(&ra, &rb);
    let mut dd = 0f32;
    let mut next = argmax(&ra);
    for pos in prompt.len()..prompt.len() + steps {
        let ra = a.step(&[next], pos, &mut ca)?;
        let rb = b.step(&[next], pos, &mut cb)?;
        dd = dd.max(diff(&ra, &rb));
        next = argmax(&ra);
    }
    Ok((dp, dd))
}

// ---------------------------------------------------------------------------------------
// the reference loop: the deepest exit written the way candle-transformers writes Qwen2

struct RefLayer {
    in_norm: Tensor,
    post_norm: Tensor,
    q: candle_nn::Linear,
    k: candle_nn::Linear,
    v: candle_nn::Linear,
    o: candle_nn::Linear,
    gate: candle_nn::Linear,
    up: candle_nn::Linear,
    down: candle_nn::Linear,
}

struct RefModel {
    embed: candle_nn::Embedding,
    layers: Vec<RefLayer>,
    norm: Tensor,
    head: candle_nn::Linear,
    cos: Tensor,
    sin: Tensor,
    nh: usize,
    kvh: usize,
    hd: usize,
    eps: f32,
    max_pos: usize,
}

impl RefModel {
    /// `None` when the deepest path has an MoE layer.
    fn load(dir: &Path, cfg: &ModelConfig) -> anyhow::Result<Option<Self>> {
        let ck = Checkpoint::open(dir)?;
        let last = *cfg.last_exit();
        let (h, q, kv) = (cfg.hidden_size, cfg.q_dim(), cfg.kv_dim());
        let mut prefixes: Vec<(String, Ffn)> = (0..last.point)
            .map(|l| (format!("model.layers.{l}"), cfg.ffn[l].clone()))
            .collect();
        prefixes.push(match last.block {
            ExitBlock::Trunk(l) => (format!("model.layers.{l}"), cfg.ffn[l].clone()),
            ExitBlock::Own(i) => (format!("model.eelayers.{i}"), cfg.exit_block_ffn[i].clone()),
        });
        let lin = |name: &str, out: usize, inp: usize, bias: bool| -> anyhow::Result<_> {
            let w = ck.get(&format!("{name}.weight"), &[out, inp])?;
            let b = if bias {
                Some(ck.get(&format!("{name}.bias"), &[out])?)
            } else {
                None
            };
            Ok(candle_nn::Linear::new(w, b))
        };
        let mut layers = Vec::new();
        for (p, ffn) in prefixes {
            let Ffn::Dense { intermediate: i } = ffn else {
                return Ok(None);
            };
            layers.push(RefLayer {
                in_norm: ck.get(&format!("{p}.input_layernorm.weight"), &[h])?,
                post_norm: ck.get(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                q: lin(&format!("{p}.self_attn.q_proj"), q, h, cfg.qkv_bias)?,
                k: lin(&format!("{p}.self_attn.k_proj"), kv, h, cfg.qkv_bias)?,
                v: lin(&format!("{p}.self_attn.v_proj"), kv, h, cfg.qkv_bias)?,
                o: lin(&format!("{p}.self_attn.o_proj"), h, q, cfg.o_bias)?,
                gate: lin(&format!("{p}.mlp.gate_proj"), i, h, false)?,
                up: lin(&format!("{p}.mlp.up_proj"), i, h, false)?,
                down: lin(&format!("{p}.mlp.down_proj"), h, i, false)?,
            });
        }
        let embed_w = ck.get("model.embed_tokens.weight", &[cfg.vocab_size, h])?;
        let norm = ck.get(
            &match last.norm {
                NormRef::Own(i) => format!("model.norms.{i}.weight"),
                NormRef::Final => "model.norm.weight".into(),
            },
            &[h],
        )?;
        let head_w = match last.head {
            HeadRef::Own(i) => ck.get(&format!("lm_head.{i}.weight"), &[cfg.vocab_size, h])?,
            HeadRef::Shared => ck.get("lm_head.weight", &[cfg.vocab_size, h])?,
            HeadRef::TiedEmbedding => embed_w.clone(),
        };
        let hd = cfg.head_dim;
        let inv: Vec<f32> = (0..hd / 2)
            .map(|i| (1.0 / cfg.rope.theta.powf(2.0 * i as f64 / hd as f64)) as f32)
            .collect();
        let max_pos = cfg.max_position_embeddings;
        let inv = Tensor::from_vec(inv, (1, hd / 2), &Device::Cpu)?;
        let t = Tensor::arange(0u32, max_pos as u32, &Device::Cpu)?
            .to_dtype(DType::F32)?
            .reshape((max_pos, 1))?;
        let freqs = t.matmul(&inv)?;
        Ok(Some(Self {
            embed: candle_nn::Embedding::new(embed_w, h),
            layers,
            norm,
            head: candle_nn::Linear::new(head_w, None),
            cos: freqs.cos()?,
            sin: freqs.sin()?,
            nh: cfg.num_heads,
            kvh: cfg.num_kv_heads,
            hd,
            eps: cfg.rms_norm_eps as f32,
            max_pos,
        }))
    }

    fn repeat_kv(&self, x: Tensor) -> candle_core::Result<Tensor> {
        let g = self.nh / self.kvh;
        if g == 1 {
            return Ok(x);
        }
        let (b, kvh, t, d) = x.dims4()?;
        Tensor::cat(&vec![&x; g], 2)?.reshape((b, kvh * g, t, d))
    }

    fn forward(
        &self,
        tokens: &[u32],
        pos: usize,
        cache: &mut [candle_nn::kv_cache::KvCache],
    ) -> candle_core::Result<Tensor> {
        let t = tokens.len();
        let (nh, kvh, hd) = (self.nh, self.kvh, self.hd);
        let ids = Tensor::new(tokens, &Device::Cpu)?.unsqueeze(0)?;
        let mut x = self.embed.forward(&ids)?; // [1, t, h]
        let cos = self.cos.narrow(0, pos, t)?;
        let sin = self.sin.narrow(0, pos, t)?;
        let mask = if t > 1 {
            let total = pos + t;
            let m: Vec<f32> = (0..t)
                .flat_map(|i| {
                    (0..total).map(move |j| if j > pos + i { f32::NEG_INFINITY } else { 0.0 })
                })
                .collect();
            Some(Tensor::from_vec(m, (t, total), &Device::Cpu)?)
        } else {
            None
        };
        let scale = 1.0 / (hd as f64).sqrt();
        for (layer, kv) in self.layers.iter().zip(cache.iter_mut()) {
            let h = candle_nn::ops::rms_norm(&x, &layer.in_norm, self.eps)?;
            let q = layer
                .q
                .forward(&h)?
                .reshape((1, t, nh, hd))?
                .transpose(1, 2)?
                .contiguous()?;
            let k = layer
                .k
                .forward(&h)?
                .reshape((1, t, kvh, hd))?
                .transpose(1, 2)?
                .contiguous()?;
            let v = layer
                .v
                .forward(&h)?
                .reshape((1, t, kvh, hd))?
                .transpose(1, 2)?
                .contiguous()?;
            let q = candle_nn::rotary_emb::rope(&q, &cos, &sin)?;
            let k = candle_nn::rotary_emb::rope(&k, &cos, &sin)?;
            let (k, v) = kv.append(&k, &v)?;
            let k = self.repeat_kv(k)?.contiguous()?;
            let v = self.repeat_kv(v)?.contiguous()?;
            let att = (q.matmul(&k.t()?)? * scale)?;
            let att = match &mask {
                Some(m) => att.broadcast_add(m)?,
                None => att,
            };
            let att = candle_nn::ops::softmax_last_dim(&att)?;
            let o = att.matmul(&v)?.transpose(1, 2)?.reshape((1, t, nh * hd))?;
            x = (x + layer.o.forward(&o)?)?;
            let h = candle_nn::ops::rms_norm(&x, &layer.post_norm, self.eps)?;
            let f = (candle_nn::ops::silu(&layer.gate.forward(&h)?)? * layer.up.forward(&h)?)?;
            x = (x + layer.down.forward(&f)?)?;
        }
        let x = x.narrow(1, t - 1, 1)?;
        let x = candle_nn::ops::rms_norm(&x, &self.norm, self.eps)?;
        self.head.forward(&x)?.squeeze(0)?.squeeze(0)
    }
}

impl Runner for RefModel {
    type Cache = Vec<candle_nn::kv_cache::KvCache>;
    fn new_cache(&self) -> Self::Cache {
        (0..self.layers.len())
            .map(|_| candle_nn::kv_cache::KvCache::new(2, self.max_pos))
            .collect()
    }
    fn step(
        &self,
        tokens: &[u32],
        pos: usize,
        cache: &mut Self::Cache,
    ) -> anyhow::Result<Vec<f32>> {
        let l = self.forward(tokens, pos, cache)?;
        Ok(l.to_dtype(DType::F32)?.to_vec1()?)
    }
}
