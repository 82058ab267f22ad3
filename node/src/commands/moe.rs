//! `flow-node moe ...`: expert profiling for MoE serving (apps/moe).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Subcommand;
use flow_familial::tasks::{eval_set, Task};
use flow_familial::tokenizer::Tokenizer;
use flow_familial::FamilialModel;
use flow_moe::profile::{profile, TaskPattern};
use flow_moe::store::save_pattern;
use indicatif::{ProgressBar, ProgressStyle};

/// `flow-node moe ...`
#[derive(Subcommand, Debug)]
pub enum MoeCmd {
    /// Expert importance of one task (router statistics over calibration prompts), written
    /// to the pattern store that MoE serving retrieves from.
    Profile(ProfileArgs),
}

/// Arguments of `flow-node moe profile`.
#[derive(clap::Args, Debug)]
#[command(after_long_help = "\
What it computes (PreMoe's task-conditioned expected selection score):
  For every token of the calibration data, each MoE layer's router gives a softmax over its
  experts; an expert scores its router probability where top-k routing selects it, 0
  elsewhere. Averaged over tokens this is the expert's importance for the task. The stored
  pattern (STORE/<task>.json, a few hundred bytes) holds per MoE layer the scores and the
  ranking, plus a retrieval key: the first MoE layer's router logits (centred per token)
  averaged over the prompts. At serving time a request's prompt gives the same kind of vector, the
  nearest stored key picks the pattern, and only its top-k experts per layer are loaded.

Data:
  --task add|lookup|reverse      built-in synthetic prompts (held-out split --split)
  --task NAME --data FILE        one calibration text per line (whole line = prompt)

Examples:
  flow-node moe profile --task add
  flow-node moe profile --task add --examples 64 --store /tmp/patterns
  flow-node moe profile --task support --data support_prompts.txt --model DIR")]
pub struct ProfileArgs {
    /// MoE family checkpoint directory.
    #[arg(long, default_value = "models/moe-small")]
    pub model: PathBuf,
    /// Task name (a built-in synthetic task, or any name with --data).
    #[arg(long)]
    pub task: String,
    /// Calibration texts, one per line (default: the built-in task's prompts).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Synthetic calibration examples (built-in tasks).
    #[arg(long, default_value_t = 64)]
    pub examples: usize,
    /// Evaluation split the synthetic examples come from (benchmarks evaluate on split 0).
    #[arg(long, default_value_t = 1)]
    pub split: u64,
    /// Pattern store directory (default: MODEL/moe_patterns).
    #[arg(long)]
    pub store: Option<PathBuf>,
    /// Compute threads (default $RAYON_NUM_THREADS, else 1).
    #[arg(long)]
    pub threads: Option<usize>,
}

pub fn run(cmd: MoeCmd) -> anyhow::Result<()> {
    match cmd {
        MoeCmd::Profile(a) => {
            let threads = a.threads;
            super::calibrate::in_pool(threads, move || profile_cmd(a))
        }
    }
}

/// Calibration `(sequences, prompts)` of a built-in task: prompt + answer, and prompt.
pub fn synthetic_calibration(task: Task, n: usize, split: u64) -> (Vec<Vec<u32>>, Vec<Vec<u32>>) {
    let ex = eval_set(task, n, split);
    (
        ex.iter().map(|e| e.tokens()).collect(),
        ex.iter().map(|e| e.prompt.clone()).collect(),
    )
}

fn file_calibration(model: &Path, data: &Path) -> anyhow::Result<Vec<Vec<u32>>> {
    let tok = Tokenizer::from_dir(model)?;
    let text = std::fs::read_to_string(data)
        .with_context(|| format!("reading calibration data {}", data.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let ids = tok
            .encode(line)
            .with_context(|| format!("{}:{}: cannot tokenize", data.display(), i + 1))?;
        if !ids.is_empty() {
            out.push(ids);
        }
    }
    if out.is_empty() {
        bail!("{} has no non-empty lines to profile", data.display());
    }
    Ok(out)
}

/// Profile `task` on `model` and write it to `store`.
pub fn profile_into(
    model: &FamilialModel,
    task: &str,
    seqs: &[Vec<u32>],
    prompts: &[Vec<u32>],
    store: &Path,
) -> anyhow::Result<(TaskPattern, PathBuf)> {
    let p = profile(model, task, seqs, prompts)?;
    let path = save_pattern(store, &p)?;
    Ok((p, path))
}

fn profile_cmd(a: ProfileArgs) -> anyhow::Result<()> {
    let model =
        FamilialModel::load(&a.model).with_context(|| format!("loading {}", a.model.display()))?;
    let (seqs, prompts) = match &a.data {
        Some(d) => {
            let s = file_calibration(&a.model, d)?;
            (s.clone(), s)
        }
        None => {
            let task: Task = a.task.parse().map_err(|e| {
                anyhow::anyhow!("{e}; give --data FILE to profile a task of your own")
            })?;
            if task == Task::Mix {
                bail!("profile one concrete task at a time (add, lookup or reverse), not mix");
            }
            synthetic_calibration(task, a.examples.max(1), a.split)
        }
    };
    let store = a
        .store
        .clone()
        .unwrap_or_else(|| a.model.join("moe_patterns"));
    let pb = ProgressBar::new_spinner();
    pb.set_style(
        ProgressStyle::with_template("{spinner} {msg} [{elapsed_precise}]")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    pb.enable_steady_tick(std::time::Duration::from_millis(200));
    pb.set_message(format!(
        "profiling `{}` on {} sequences",
        a.task,
        seqs.len()
    ));
    let (p, path) = profile_into(&model, &a.task, &seqs, &prompts, &store)?;
    pb.finish_and_clear();
    println!(
        "task `{}`: {} sequences, {} tokens -> {}",
        p.task,
        p.prompts,
        p.tokens,
        path.display()
    );
    for l in &p.layers {
        let top: Vec<String> = l
            .ranking
            .iter()
            .take(4)
            .map(|&j| format!("{j} ({:.2})", l.scores[j]))
            .collect();
        println!("  layer {:>2}: top experts {}", l.layer, top.join(", "));
    }
    Ok(())
}
