//! `flow-node model train`: joint training of every exit of a family.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::DType;
use flow_familial::config::Layout;
use flow_familial::init::{init_weights, preset_config, Preset};
use flow_familial::tasks::{Task, TextCorpus};
use flow_familial::train::{
    evaluate_loss, evaluate_task, Data, StepStats, TaskReport, TrainOptions, Trainer, STATE_JSON,
};
use indicatif::{ProgressBar, ProgressStyle};

use super::OsInstant;

const LONG_ABOUT: &str = "\
Train every exit of a familial model jointly.

A family is one transformer trunk with several exits. Exit e reads the hidden state after
trunk layers [0, e), runs its own block, norm and head, and predicts the next token: a
shallow exit is a small, fast member; the last exit is the full model. Training runs the
trunk once per batch and adds the cross-entropy of every exit:

    loss = sum over exits of  w_e * CE_e        (--exit-weights, default all 1)

so the shared trunk learns features every member can use. CE is taken only where there
is something to predict: the answer and <|eos|> of a task example (the prompt is context),
or every byte of a text window.

DATA
  --task add       1-4 digit sums              \"57+8=\" -> \"65\"
  --task lookup    key=value pairs, then a key \"k=37,b=05?b=\" -> \"05\"
  --task reverse   reverse a string            \"rev abc=\" -> \"cba\"
  --task mix       all three (40/30/30)
  --task text --data FILE   next-byte language modelling on a UTF-8 file
Difficulty varies inside every task (digits, pairs, length), so easy inputs are
answerable by shallow exits and hard ones need depth. Step s always trains on the same
examples for a given --seed; evaluation uses a held-out seed domain.

WHAT A GOOD RUN LOOKS LIKE
  Every exit's loss starts near ln(272) = 5.6 and falls fast to ~1 as the exits learn the
  answer format, then slowly as they learn the tasks; deeper exits end lower. The periodic
  eval prints, per task, each exit's exact-match accuracy (greedy decoding with the KV
  cache) and answer loss; accuracy should rise with depth, with easy items (1-2 digit
  sums, 1-2 pairs) right even at the shallowest exit. The committed models/small (the
  command below, ~29 min on 2 busy cores) ends at per-exit losses 0.28/0.11/0.11/0.11 and
  held-out `add` exact 77/94/97/97% (exits 1/3/5/7); `reverse` is solved by every exit and
  `lookup` only partly (30-40%). If the loss goes up or turns NaN, lower --lr; if it
  plateaus early, train longer. tok/s counts all input tokens (prompt included).

CHECKPOINTS
  --out DIR receives an HF-layout checkpoint (config.json, model.safetensors in
  --save-dtype, tokenizer.json) every --save-every steps and at the end, plus
  train_state.safetensors/.json (f32 master weights, AdamW moments, step, options) so
  `--resume` continues the run exactly. Final per-exit scores go to DIR/eval.json.
  `--eval-only --model DIR` scores an existing checkpoint without training.

SPEED
  --threads T runs T data-parallel workers, each with single-threaded matmuls, and sums
  their gradients: on 2 cores that is ~1.9x faster than one worker with 2 matmul threads
  (small family: ~4k vs ~2.1k tokens/s measured on an idle-ish machine).

EXAMPLE (how models/small was trained; see models/small/TRAINED.md)
  RAYON_NUM_THREADS=1 flow-node model train --init-preset small --init-seed 1 --task mix \\
      --steps 8000 --batch 32 --lr 2e-3 --warmup 200 --seed 1 --threads 2 \\
      --eval-every 1000 --save-every 1000 --save-dtype f16 --out /tmp/small-run";

/// Arguments of `flow-node model train`.
#[derive(clap::Args, Debug)]
#[command(before_long_help = LONG_ABOUT)]
pub struct TrainArgs {
    /// Checkpoint directory to start from (e.g. written by `model init`).
    #[arg(long, required_unless_present_any = ["init_preset", "resume"])]
    pub model: Option<PathBuf>,
    /// Start from fresh seeded weights of this preset instead of --model (tiny, small, moe-small).
    #[arg(long, conflicts_with = "model")]
    pub init_preset: Option<String>,
    /// Layout for --init-preset (ruyi_qwen2, qwen2, llama, mixtral, qwen2_moe; default
    /// ruyi_qwen2, or qwen2_moe for moe-small).
    #[arg(long)]
    pub init_layout: Option<String>,
    /// Seed of the initial weights for --init-preset.
    #[arg(long, default_value_t = 0)]
    pub init_seed: u64,
    /// Training data: add, lookup, reverse, mix, or text (with --data).
    #[arg(long, default_value = "mix")]
    pub task: String,
    /// UTF-8 text file for --task text (implies it).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Bytes per text training window.
    #[arg(long, default_value_t = 64)]
    pub window: usize,
    /// Total optimiser steps (on --resume: the run's new total).
    #[arg(long, default_value_t = 1000)]
    pub steps: u64,
    /// Sequences per step (split over --threads workers).
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Peak learning rate (AdamW).
    #[arg(long, default_value_t = 2e-3)]
    pub lr: f64,
    /// Linear warm-up steps before cosine decay.
    #[arg(long, default_value_t = 100)]
    pub warmup: u64,
    /// Final learning rate as a fraction of --lr.
    #[arg(long, default_value_t = 0.1)]
    pub min_lr_ratio: f64,
    /// Decoupled weight decay of matrices (norms and biases are never decayed).
    #[arg(long, default_value_t = 0.05)]
    pub weight_decay: f64,
    /// Clip the global gradient norm (0 = off).
    #[arg(long, default_value_t = 1.0)]
    pub clip: f64,
    /// Seed of the training data stream.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Loss weight per exit, shallowest first, e.g. 1,1,1,1 (default: all 1).
    #[arg(long, value_delimiter = ',')]
    pub exit_weights: Vec<f64>,
    /// MoE only: weight of the Switch-style router load-balancing loss (0 = off; 0.01 is
    /// usual). Keeps routers from collapsing onto a few experts.
    #[arg(long, default_value_t = 0.0)]
    pub router_balance: f64,
    /// MoE only: weight of the ST-MoE router z-loss (0 = off; 1e-3 is usual).
    #[arg(long, default_value_t = 0.0)]
    pub router_z: f64,
    /// Evaluate every K steps (0 = only at the end).
    #[arg(long, default_value_t = 500)]
    pub eval_every: u64,
    /// Held-out examples per task (or text windows) per evaluation.
    #[arg(long, default_value_t = 100)]
    pub eval_examples: usize,
    /// Save a checkpoint every K steps (0 = only at the end).
    #[arg(long, default_value_t = 500)]
    pub save_every: u64,
    /// Output directory (checkpoint + training state).
    #[arg(long, required_unless_present = "eval_only")]
    pub out: Option<PathBuf>,
    /// Continue the run saved in --out.
    #[arg(long)]
    pub resume: bool,
    /// Data-parallel worker threads (default: available cores, at most 2).
    #[arg(long)]
    pub threads: Option<usize>,
    /// dtype of the saved model.safetensors: f32, f16 or bf16 (training state stays f32).
    #[arg(long, default_value = "f32")]
    pub save_dtype: String,
    /// Print a plain log line every K steps when stderr is not a terminal.
    #[arg(long, default_value_t = 50)]
    pub log_every: u64,
    /// Only evaluate --model on the held-out set of --task (per exit) and print JSON to
    /// stdout; nothing is trained or written.
    #[arg(long, requires = "model")]
    pub eval_only: bool,
}

/// Raise glibc's mmap threshold so the large temporaries of every step are reused from the
/// heap instead of being mapped and unmapped each time (25-30% of training time otherwise).
/// A progress bar over `n` training steps (hidden when stderr is not a terminal).
pub(crate) fn step_progress(n: u64) -> anyhow::Result<ProgressBar> {
    let pb = if std::io::stderr().is_terminal() {
        ProgressBar::new(n)
    } else {
        ProgressBar::hidden()
    };
    pb.set_style(
        ProgressStyle::with_template(
            "{bar:30.cyan/blue} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
        )?
        .progress_chars("=> "),
    );
    Ok(pb)
}

pub(crate) fn tune_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn mallopt(param: i32, value: i32) -> i32;
        }
        const M_TRIM_THRESHOLD: i32 = -1;
        const M_MMAP_THRESHOLD: i32 = -3;
        // SAFETY: mallopt only changes allocator tuning parameters; it is called before any
        // worker thread starts.
        unsafe {
            mallopt(M_MMAP_THRESHOLD, 256 << 20);
            mallopt(M_TRIM_THRESHOLD, 512 << 20);
        }
    }
}

fn parse_dtype(s: &str) -> anyhow::Result<DType> {
    Ok(match s {
        "f32" | "float32" => DType::F32,
        "f16" | "float16" => DType::F16,
        "bf16" | "bfloat16" => DType::BF16,
        o => bail!("unknown --save-dtype `{o}` (use f32, f16 or bf16)"),
    })
}

fn data_of(args: &TrainArgs) -> anyhow::Result<(Data, String)> {
    if let Some(p) = &args.data {
        if args.task != "text" && args.task != "mix" {
            bail!(
                "--data trains on a text file; it cannot be combined with --task {}",
                args.task
            );
        }
        let c = TextCorpus::from_file(p, args.window)?;
        return Ok((Data::Text(c), format!("text:{}", p.display())));
    }
    if args.task == "text" {
        bail!("--task text needs --data FILE");
    }
    let t: Task = args.task.parse()?;
    Ok((Data::Task(t), t.name().to_string()))
}

fn options(args: &TrainArgs, workers: usize) -> TrainOptions {
    TrainOptions {
        steps: args.steps,
        batch: args.batch,
        lr: args.lr,
        min_lr_ratio: args.min_lr_ratio,
        warmup: args.warmup,
        weight_decay: args.weight_decay,
        clip_norm: args.clip,
        exit_weights: args.exit_weights.clone(),
        workers,
        seed: args.seed,
        router_balance: args.router_balance,
        router_z: args.router_z,
        ..TrainOptions::default()
    }
}

fn fmt_losses(points: &[usize], l: &[f64]) -> String {
    points
        .iter()
        .zip(l)
        .map(|(p, v)| format!("e{p} {v:.3}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn fmt_rate(r: f64) -> String {
    if r >= 1000.0 {
        format!("{:.1}k", r / 1000.0)
    } else {
        format!("{r:.0}")
    }
}

struct Eval {
    text: String,
    json: serde_json::Value,
}

fn evaluate(trainer: &Trainer, data: &Data, n: usize) -> anyhow::Result<Eval> {
    let model = trainer.infer_model()?;
    let points = trainer.config().exit_points();
    match data {
        Data::Task(t) => {
            let reps: Vec<TaskReport> = evaluate_task(&model, *t, n, 0)?;
            let mut text = String::new();
            for r in &reps {
                let acc: Vec<String> = r
                    .exits
                    .iter()
                    .map(|e| format!("e{} {:>5.1}%", e.point, 100.0 * e.exact))
                    .collect();
                let loss: Vec<f64> = r.exits.iter().map(|e| e.loss).collect();
                text.push_str(&format!(
                    "  {:<8} exact: {} | loss: {}\n",
                    r.task,
                    acc.join("  "),
                    fmt_losses(&points, &loss)
                ));
            }
            Ok(Eval {
                text,
                json: serde_json::to_value(&reps)?,
            })
        }
        Data::Text(c) => {
            let ev = c.eval_windows(n);
            let loss = evaluate_loss(&model, &ev)?;
            let bpb: Vec<f64> = loss.iter().map(|l| l / std::f64::consts::LN_2).collect();
            Ok(Eval {
                text: format!(
                    "  text ({} held-out windows) loss: {} | bits/byte: {}\n",
                    ev.len(),
                    fmt_losses(&points, &loss),
                    fmt_losses(&points, &bpb)
                ),
                json: serde_json::json!({"windows": ev.len(), "points": points, "loss": loss}),
            })
        }
    }
}

pub fn run(args: TrainArgs) -> anyhow::Result<()> {
    tune_malloc();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let workers = args.threads.unwrap_or(cores.min(2)).max(1);
    if workers > 1 || std::env::var_os("RAYON_NUM_THREADS").is_none() {
        // Data-parallel workers each run single-threaded matmuls.
        flow_familial::set_compute_threads(if workers > 1 { 1 } else { cores });
    }
    let save_dtype = parse_dtype(&args.save_dtype)?;
    let (data, data_name) = data_of(&args)?;
    let opts = options(&args, workers);
    if args.eval_only {
        let m = args.model.as_ref().context("--eval-only needs --model")?;
        let t = Trainer::from_checkpoint(m, opts)
            .with_context(|| format!("loading {}", m.display()))?;
        let ev = evaluate(&t, &data, args.eval_examples)?;
        eprintln!(
            "eval of {} on {data_name} ({} held-out per task):\n{}",
            m.display(),
            args.eval_examples,
            ev.text.trim_end()
        );
        println!("{}", serde_json::to_string_pretty(&ev.json)?);
        return Ok(());
    }
    let out = args.out.clone().context("--out DIR is required")?;

    let mut extra = serde_json::json!({ "data": data_name });
    let mut trainer = if args.resume {
        if !out.join(STATE_JSON).exists() {
            bail!(
                "--resume: no {} in {} (start a run with --model or --init-preset first)",
                STATE_JSON,
                out.display()
            );
        }
        let (mut t, state) = Trainer::resume(&out, None)
            .with_context(|| format!("resuming from {}", out.display()))?;
        if state.extra.get("data").and_then(|v| v.as_str()) != Some(data_name.as_str()) {
            bail!(
                "--resume: the run in {} trained on `{}`, not `{data_name}`",
                out.display(),
                state
                    .extra
                    .get("data")
                    .and_then(|v| v.as_str())
                    .unwrap_or("?")
            );
        }
        let mut o = state.options.clone();
        if o.steps != opts.steps {
            eprintln!(
                "note: --steps {} replaces the saved total of {} (the rest of the schedule stretches)",
                opts.steps, o.steps
            );
        }
        o.steps = opts.steps;
        o.workers = workers;
        if o != opts {
            eprintln!("note: resuming with the saved hyper-parameters; command-line values other than --steps/--threads are ignored");
        }
        t.set_options(o)?;
        extra = state.extra;
        t
    } else if let Some(p) = &args.init_preset {
        let preset: Preset = p.parse().map_err(anyhow::Error::msg)?;
        let layout_name = args.init_layout.clone().unwrap_or_else(|| {
            match preset {
                Preset::MoeSmall => "qwen2_moe",
                _ => "ruyi_qwen2",
            }
            .to_string()
        });
        let layout = Layout::from_model_type(&layout_name)?;
        let cfg = preset_config(preset, layout)?;
        let w = init_weights(&cfg, args.init_seed)?;
        extra["init"] =
            serde_json::json!({"preset": p, "layout": layout_name, "seed": args.init_seed});
        Trainer::new(cfg, &w, opts)?
    } else {
        let m = args
            .model
            .as_ref()
            .context("--model DIR or --init-preset is required")?;
        extra["init"] = serde_json::json!({"model": m.display().to_string()});
        Trainer::from_checkpoint(m, opts).with_context(|| format!("loading {}", m.display()))?
    };

    let points = trainer.config().exit_points();
    let o = trainer.options().clone();
    eprintln!(
        "training {} parameters ({} layers, exits {:?}) on {data_name}: steps {}..{}, batch {}, lr {}, {} worker(s), seed {}",
        trainer.num_parameters(),
        trainer.config().num_layers,
        points,
        trainer.step_count(),
        o.steps,
        o.batch,
        o.lr,
        o.workers,
        o.seed
    );
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;

    let tty = std::io::stderr().is_terminal();
    let pb = step_progress(o.steps)?;
    pb.set_position(trainer.step_count());

    let prior_wall = extra.get("wall_s").and_then(|v| v.as_f64()).unwrap_or(0.0);
    let mut tokens_seen = extra.get("tokens").and_then(|v| v.as_u64()).unwrap_or(0);
    let start = OsInstant::now();
    let mut run_tokens = 0u64;
    let mut window: Vec<StepStats> = Vec::new();
    let save = |t: &Trainer, extra: &serde_json::Value, dir: &Path| -> anyhow::Result<()> {
        t.save(dir, save_dtype, extra.clone())
            .with_context(|| format!("saving to {}", dir.display()))
    };
    let mut last_eval = None;
    while trainer.step_count() < o.steps {
        let step = trainer.step_count();
        let batch = data.batch(o.batch, o.seed, step);
        let st = trainer.train_step(&batch)?;
        run_tokens += st.tokens as u64;
        tokens_seen += st.tokens as u64;
        let rate = run_tokens as f64 / start.elapsed().as_secs_f64().max(1e-9);
        window.push(st.clone());
        pb.set_position(st.step);
        pb.set_message(format!(
            "loss {:.3} [{}] {} tok/s",
            st.loss,
            fmt_losses(&points, &st.exit_losses),
            fmt_rate(rate)
        ));
        let log_now = !tty && args.log_every > 0 && st.step % args.log_every == 0;
        if log_now || st.step == o.steps {
            let n = window.len() as f64;
            let mean: Vec<f64> = (0..points.len())
                .map(|i| window.iter().map(|s| s.exit_losses[i]).sum::<f64>() / n)
                .collect();
            let router = if st.router == Default::default() {
                String::new()
            } else {
                format!(
                    " router balance {:.3} z {:.3}",
                    window.iter().map(|s| s.router.balance).sum::<f64>() / n,
                    window.iter().map(|s| s.router.z).sum::<f64>() / n
                )
            };
            let msg = format!(
                "step {}/{} loss {:.4} [{}]{router} lr {:.2e} |g| {:.2} {} tok/s ({:.0}s)",
                st.step,
                o.steps,
                window.iter().map(|s| s.loss).sum::<f64>() / n,
                fmt_losses(&points, &mean),
                st.lr,
                st.grad_norm,
                fmt_rate(rate),
                prior_wall + start.elapsed().as_secs_f64()
            );
            if tty {
                pb.println(msg);
            } else {
                eprintln!("{msg}");
            }
            window.clear();
        }
        extra["tokens"] = tokens_seen.into();
        extra["wall_s"] = (prior_wall + start.elapsed().as_secs_f64()).into();
        extra["tokens_per_s"] = rate.into();
        if args.eval_every > 0 && st.step % args.eval_every == 0 && st.step != o.steps {
            let ev = evaluate(&trainer, &data, args.eval_examples)?;
            let msg = format!("eval @ step {}:\n{}", st.step, ev.text.trim_end());
            if tty {
                pb.println(msg);
            } else {
                eprintln!("{msg}");
            }
            last_eval = Some(ev.json);
        }
        if args.save_every > 0 && st.step % args.save_every == 0 && st.step != o.steps {
            if let Some(e) = &last_eval {
                extra["eval"] = e.clone();
            }
            save(&trainer, &extra, &out)?;
        }
    }
    pb.finish_and_clear();
    let ev = evaluate(&trainer, &data, args.eval_examples)?;
    eprintln!(
        "final eval @ step {} ({} held-out per task):\n{}",
        trainer.step_count(),
        args.eval_examples,
        ev.text.trim_end()
    );
    extra["eval"] = ev.json.clone();
    save(&trainer, &extra, &out)?;
    let report = serde_json::json!({
        "step": trainer.step_count(),
        "data": data_name,
        "eval_examples": args.eval_examples,
        "eval": ev.json,
        "tokens": tokens_seen,
        "wall_s": extra["wall_s"],
        "tokens_per_s_this_session": extra["tokens_per_s"],
    });
    let p = out.join("eval.json");
    std::fs::write(&p, serde_json::to_string_pretty(&report)? + "\n")
        .with_context(|| format!("writing {}", p.display()))?;
    eprintln!(
        "saved {} ({} steps, {:.0}s, {} tokens)",
        out.display(),
        trainer.step_count(),
        extra["wall_s"].as_f64().unwrap_or(0.0),
        tokens_seen
    );
    Ok(())
}
