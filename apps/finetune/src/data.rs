//! Fine-tuning data: the built-in tasks, a text file, or the domain-shift task of the
//! benchmark.
//!
//! `add-long` is the shifted distribution `flow-node bench finetune` uses: sums whose longer
//! operand has 3 or 4 digits (levels 3–4 of `add`), the part of the `mix` distribution the
//! committed `models/small` device exit (exit 1) gets mostly wrong (40% / 28% exact). It is
//! what a node whose local traffic is all long sums would fine-tune its device member on.

use flow_familial::tasks::{
    eval_seed, example_at, train_seed, Example, Sequence, Task, TextCorpus,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};

/// Where fine-tuning batches come from.
#[derive(Debug, Clone)]
pub enum FtData {
    /// A built-in task of `flow_familial::tasks`.
    Task(Task),
    /// `add` at levels 3–4 only (the benchmark's shifted domain).
    AddLong,
    /// Next-byte language modelling on a text file.
    Text(TextCorpus),
}

impl FtData {
    /// Parse a task name: the familial tasks plus `add-long`.
    pub fn task(name: &str) -> Result<Self> {
        if name == "add-long" {
            return Ok(FtData::AddLong);
        }
        name.parse::<Task>().map(FtData::Task).map_err(|_| {
            Error::invalid(
                "task",
                format!("`{name}` (use add, lookup, reverse, mix or add-long)"),
            )
        })
    }

    /// Name for reports.
    pub fn name(&self) -> String {
        match self {
            FtData::Task(t) => t.name().to_string(),
            FtData::AddLong => "add-long".into(),
            FtData::Text(_) => "text".into(),
        }
    }

    /// Training sequences of step `step` (deterministic in `(seed, step)`).
    pub fn train_batch(&self, n: usize, seed: u64, step: u64) -> Vec<Sequence> {
        match self {
            FtData::Task(t) => flow_familial::tasks::train_example_batch(*t, n, seed, step)
                .iter()
                .map(Sequence::from)
                .collect(),
            FtData::AddLong => add_long(n, train_seed(seed ^ 0xadd1, step))
                .iter()
                .map(Sequence::from)
                .collect(),
            FtData::Text(c) => c.train_batch(n, seed, step),
        }
    }

    /// Held-out examples of split `split` (none for text data).
    pub fn eval_examples(&self, n: usize, split: u64) -> Vec<Example> {
        match self {
            FtData::Task(Task::Mix) => {
                let per = n.div_ceil(3);
                Task::CONCRETE
                    .iter()
                    .flat_map(|t| flow_familial::tasks::eval_set(*t, per, split))
                    .take(n)
                    .collect()
            }
            FtData::Task(t) => flow_familial::tasks::eval_set(*t, n, split),
            FtData::AddLong => add_long(n, eval_seed(Task::Add, 1000 + split)),
            FtData::Text(_) => Vec::new(),
        }
    }

    /// Held-out sequences of split `split` for loss evaluation (validation).
    pub fn eval_sequences(&self, n: usize, split: u64) -> Vec<Sequence> {
        match self {
            FtData::Text(c) => c.eval_windows(n),
            other => other
                .eval_examples(n, split)
                .iter()
                .map(Sequence::from)
                .collect(),
        }
    }
}

/// `n` sums with a 3- or 4-digit longer operand.
pub fn add_long(n: usize, seed: u64) -> Vec<Example> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let level = rng.gen_range(3..=4);
            example_at(Task::Add, level, &mut rng)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_long_is_long_and_train_differs_from_eval() {
        let d = FtData::task("add-long").unwrap();
        let ev = d.eval_examples(50, 0);
        assert!(ev.iter().all(|e| e.level >= 3 && e.task == Task::Add));
        let tr = d.train_batch(50, 0, 0);
        let evs: Vec<Sequence> = ev.iter().map(Sequence::from).collect();
        assert_ne!(tr, evs);
        assert_eq!(d.train_batch(5, 1, 7), d.train_batch(5, 1, 7));
        assert!(FtData::task("sub").is_err());
    }
}
