//! `flow-node bench moe`: task accuracy and resident expert memory with only the top-k
//! experts per layer of the retrieved task pattern, against the unpruned model, one run.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Context};
use flow_familial::tasks::{eval_set, Example, Sequence, Task};
use flow_familial::train::{exit_nll_sums, greedy_batch};
use flow_familial::FamilialModel;
use flow_moe::experts::PrunedModel;
use flow_moe::profile::signature;
use flow_moe::store::PatternStore;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

/// Arguments.
#[derive(clap::Args, Debug)]
#[command(after_long_help = "\
What runs (all greedy, exact match of answer + <|eos|> at --exit; answer loss = mean
teacher-forced cross-entropy per answer token, a finer measure than exact match):
  1. profile every task (add, lookup, reverse) on --calib examples of eval split 1 into a
     fresh pattern store (or use --store DIR as is);
  2. for every held-out prompt (eval split 0, --examples per task) compute its signature
     (first MoE layer's router over the prompt) and retrieve the nearest stored pattern
     (retrieval accuracy is reported);
  3. answer every prompt with the unpruned model, then with only the retrieved pattern's
     top-k experts per MoE layer resident, for k = all, 1/2, 1/4, 1/8 of the experts;
     a control row keeps the pattern's k = 1/2 *least* important experts instead (if it
     scores like the top-k row, the model does not depend on its routed experts).
Resident expert memory = f32 bytes of the experts loaded (budget = exactly k per layer;
switching patterns evicts). Target (issue 7): at 1/2, >= 97% of unpruned accuracy at
~0.5x expert memory.

Examples:
  flow-node bench moe
  flow-node bench moe --examples 100 --json moe.json")]
pub struct BenchMoeArgs {
    /// MoE family checkpoint directory.
    #[arg(long, default_value = "models/moe-small")]
    pub model: PathBuf,
    /// Held-out prompts per task.
    #[arg(long, default_value_t = 60)]
    pub examples: usize,
    /// Calibration examples per task for profiling.
    #[arg(long, default_value_t = 48)]
    pub calib: usize,
    /// Use this pattern store instead of profiling afresh.
    #[arg(long)]
    pub store: Option<PathBuf>,
    /// Exit to answer at (default: the deepest).
    #[arg(long)]
    pub exit: Option<usize>,
    /// Compute threads (default $RAYON_NUM_THREADS, else 1).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Also write the results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
struct Row {
    kept: String,
    k: usize,
    expert_bytes: usize,
    memory_ratio: f64,
    /// task → accuracy.
    accuracy: BTreeMap<String, f64>,
    mean_accuracy: f64,
    /// Mean answer cross-entropy (teacher forced) over all tasks' answer tokens.
    answer_loss: f64,
    /// mean accuracy / unpruned mean accuracy.
    relative: f64,
    expert_loads: u64,
    expert_evictions: u64,
}

#[derive(Debug, Serialize)]
struct Report {
    model: String,
    exit: usize,
    examples_per_task: usize,
    retrieval_accuracy: BTreeMap<String, f64>,
    unpruned: BTreeMap<String, f64>,
    unpruned_mean: f64,
    unpruned_loss: f64,
    all_expert_bytes: usize,
    rows: Vec<Row>,
}

pub fn run(a: BenchMoeArgs) -> anyhow::Result<()> {
    let threads = a.threads;
    super::calibrate::in_pool(threads, move || bench(a))
}

/// (exactly right answers, summed answer cross-entropy, answer tokens) at exit `point`.
fn score(
    model: &FamilialModel,
    exs: &[&Example],
    point: usize,
) -> anyhow::Result<(usize, f64, usize)> {
    let exit = model.config().exit_index(point)?;
    let (mut nll, mut count) = (0f64, 0usize);
    for chunk in exs.chunks(32) {
        let seqs: Vec<Sequence> = chunk.iter().map(|e| Sequence::from(*e)).collect();
        count += seqs.iter().map(Sequence::loss_positions).sum::<usize>();
        let sums = exit_nll_sums(model, &seqs)?;
        nll += f64::from(
            sums.get(exit)
                .context("no loss for the exit")?
                .to_scalar::<f32>()?,
        );
    }
    Ok((correct(model, exs, point)?, nll, count))
}

fn correct(model: &FamilialModel, exs: &[&Example], point: usize) -> anyhow::Result<usize> {
    let mut n = 0;
    for chunk in exs.chunks(32) {
        let prompts: Vec<Vec<u32>> = chunk.iter().map(|e| e.prompt.clone()).collect();
        let max_new = chunk.iter().map(|e| e.answer.len() + 1).max().unwrap_or(1);
        let got = greedy_batch(model, &prompts, point, max_new)?;
        n += got
            .iter()
            .zip(chunk)
            .filter(|(g, e)| **g == e.target())
            .count();
    }
    Ok(n)
}

fn mean(m: &BTreeMap<String, f64>) -> f64 {
    m.values().sum::<f64>() / m.len().max(1) as f64
}

fn bench(a: BenchMoeArgs) -> anyhow::Result<()> {
    let cfg = flow_familial::source::model_config(&a.model)
        .with_context(|| format!("reading {}/config.json", a.model.display()))?;
    let full = FamilialModel::load(&a.model)?;
    let point = a
        .exit
        .unwrap_or(*cfg.exit_points().last().unwrap_or(&cfg.num_layers));
    cfg.exit_index(point)?;
    let tasks = Task::CONCRETE;
    let tmp = tempfile::tempdir()?;
    let store_dir = match &a.store {
        Some(d) => d.clone(),
        None => {
            let d = tmp.path().join("patterns");
            for t in tasks {
                let (seqs, prompts) = super::moe::synthetic_calibration(t, a.calib.max(1), 1);
                super::moe::profile_into(&full, t.name(), &seqs, &prompts, &d)?;
            }
            d
        }
    };
    let store = PatternStore::open(&store_dir)?;
    let evals: Vec<(Task, Vec<Example>)> = tasks
        .iter()
        .map(|&t| (t, eval_set(t, a.examples.max(1), 0)))
        .collect();

    // (label, divisor of the expert count, keep the *least* important experts instead).
    let fracs: [(&str, usize, bool); 5] = [
        ("all", 1, false),
        ("1/2", 2, false),
        ("1/4", 4, false),
        ("1/8", 8, false),
        ("1/2 least important (control)", 2, true),
    ];
    let pb = ProgressBar::new((evals.len() * (fracs.len() + 2)) as u64);
    pb.set_style(
        ProgressStyle::with_template("{spinner} {bar:40} {pos}/{len} [{elapsed_precise}] {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    // Retrieval: which stored pattern each held-out prompt gets.
    let mut retrieved: Vec<Vec<String>> = Vec::new();
    let mut retrieval_accuracy = BTreeMap::new();
    for (t, exs) in &evals {
        pb.set_message(format!("retrieval {t}"));
        let mut got = Vec::with_capacity(exs.len());
        for e in exs {
            got.push(store.retrieve(&signature(&full, &e.prompt)?)?.task.clone());
        }
        let right = got.iter().filter(|g| g.as_str() == t.name()).count();
        retrieval_accuracy.insert(t.name().to_string(), right as f64 / exs.len() as f64);
        retrieved.push(got);
        pb.inc(1);
    }
    let mut unpruned = BTreeMap::new();
    let (mut nll, mut count) = (0f64, 0usize);
    for (t, exs) in &evals {
        pb.set_message(format!("unpruned {t}"));
        let refs: Vec<&Example> = exs.iter().collect();
        let (right, l, c) = score(&full, &refs, point)?;
        unpruned.insert(t.name().to_string(), right as f64 / exs.len() as f64);
        nll += l;
        count += c;
        pb.inc(1);
    }
    let unpruned_loss = nll / count.max(1) as f64;
    drop(full);
    let unpruned_mean = mean(&unpruned);

    let num_experts = {
        let probe = PrunedModel::open(&a.model, cfg.clone(), 0)?;
        let l = probe.model().moe_layers()[0];
        probe.model().moe(l)?.spec.num_experts
    };
    let mut rows = Vec::new();
    let mut all_bytes = 0;
    for (name, div, worst) in fracs {
        let k = (num_experts / div).max(1);
        // Budget: exactly k experts per layer.
        let probe = PrunedModel::open(&a.model, cfg.clone(), usize::MAX)?;
        all_bytes = probe.all_expert_bytes()?;
        let budget = all_bytes / num_experts * k;
        drop(probe);
        let mut pruned = PrunedModel::open(&a.model, cfg.clone(), budget)?;
        let mut accuracy = BTreeMap::new();
        let mut bytes = 0;
        let (mut nll, mut count) = (0f64, 0usize);
        for ((t, exs), got) in evals.iter().zip(&retrieved) {
            pb.set_message(format!("k={k} {t}"));
            let mut right = 0;
            for task in store.tasks() {
                let group: Vec<&Example> = exs
                    .iter()
                    .zip(got)
                    .filter(|(_, g)| g.as_str() == task)
                    .map(|(e, _)| e)
                    .collect();
                if group.is_empty() {
                    continue;
                }
                let mut pattern = store
                    .get(task)
                    .with_context(|| format!("pattern `{task}` vanished"))?
                    .clone();
                if worst {
                    for l in &mut pattern.layers {
                        l.ranking.reverse();
                    }
                }
                bytes = pruned.prepare(&pattern, k)?;
                let (r, l, c) = score(pruned.model(), &group, point)?;
                right += r;
                nll += l;
                count += c;
            }
            accuracy.insert(t.name().to_string(), right as f64 / exs.len() as f64);
            pb.inc(1);
        }
        let m = mean(&accuracy);
        let s = pruned.stats();
        rows.push(Row {
            kept: format!("{name} ({k}/{num_experts})"),
            k,
            expert_bytes: bytes,
            memory_ratio: bytes as f64 / all_bytes as f64,
            accuracy,
            mean_accuracy: m,
            answer_loss: nll / count.max(1) as f64,
            relative: if unpruned_mean > 0.0 {
                m / unpruned_mean
            } else {
                f64::NAN
            },
            expert_loads: s.loads,
            expert_evictions: s.evictions,
        });
    }
    pb.finish_and_clear();
    if unpruned_mean == 0.0 {
        eprintln!("warning: the unpruned model answers nothing right; accuracy ratios are undefined (is the checkpoint trained?)");
    }
    let report = Report {
        model: a.model.display().to_string(),
        exit: point,
        examples_per_task: a.examples,
        retrieval_accuracy,
        unpruned,
        unpruned_mean,
        unpruned_loss,
        all_expert_bytes: all_bytes,
        rows,
    };
    print_report(&report);
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_string_pretty(&report)? + "\n")
            .with_context(|| format!("writing {}", p.display()))?;
    }
    if report.rows.is_empty() {
        bail!("no results");
    }
    Ok(())
}

fn print_report(r: &Report) {
    println!(
        "bench moe: {} at exit {}, {} held-out prompts per task",
        r.model, r.exit, r.examples_per_task
    );
    let retr: Vec<String> = r
        .retrieval_accuracy
        .iter()
        .map(|(t, v)| format!("{t} {:.1}%", v * 100.0))
        .collect();
    println!(
        "pattern retrieval accuracy (chance 33.3%): {}",
        retr.join(", ")
    );
    let tasks: Vec<&String> = r.unpruned.keys().collect();
    let mut head = String::from("| experts kept | expert memory |");
    for t in &tasks {
        head.push_str(&format!(" {t} |"));
    }
    head.push_str(" mean | vs unpruned | answer loss |");
    println!("{head}");
    println!("|{}", "---|".repeat(5 + tasks.len()));
    let mut line = format!("| unpruned | {} KiB (1.00x) |", r.all_expert_bytes / 1024);
    for t in &tasks {
        line.push_str(&format!(" {:.1}% |", r.unpruned[*t] * 100.0));
    }
    line.push_str(&format!(
        " {:.1}% | 1.000 | {:.4} |",
        r.unpruned_mean * 100.0,
        r.unpruned_loss
    ));
    println!("{line}");
    for row in &r.rows {
        let mut line = format!(
            "| {} | {} KiB ({:.2}x) |",
            row.kept,
            row.expert_bytes / 1024,
            row.memory_ratio
        );
        for t in &tasks {
            line.push_str(&format!(
                " {:.1}% |",
                row.accuracy.get(*t).copied().unwrap_or(0.0) * 100.0
            ));
        }
        line.push_str(&format!(
            " {:.1}% | {:.3} | {:.4} |",
            row.mean_accuracy * 100.0,
            row.relative,
            row.answer_loss
        ));
        println!("{line}");
    }
}
