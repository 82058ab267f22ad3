//! Fine-tuning data: the built-in tasks, a text file, or the domain-shift task of the
//! benchmark.
//!
//! `add-long` is the shifted distribution `flow-node bench finetune` uses: sums whose longer
//! operand has 3 or 4 digits (levels 3–4 of `add`), the part of the `mix` distribution the
//! committed `models/small` device exit (exit 1) gets mostly wrong (40% / 28% exact). It is
//! what a node whose local traffic is all long sums would fine-tune its device member on.
//!
//! `add-5` shifts further, out of the training distribution altogether: one operand has 5
//! digits (training never went past 4), the other 1-5. It is the shift for deeper members
//! (exit 3 of `models/small` already gets `add-long` right), where the question is whether
//! the member can be taught a longer carry chain than it has seen.

use flow_familial::tasks::{
    encode_prompt, eval_seed, example_at, train_seed, Example, Sequence, Task, TextCorpus,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};
use crate::words::{Split, WordTask};

/// Name of the [`FtData::Words`] task.
pub const WORD_TASK: &str = "word-category";

/// Where fine-tuning batches come from.
#[derive(Debug, Clone)]
pub enum FtData {
    /// A built-in task of `flow_familial::tasks`.
    Task(Task),
    /// `add` at levels 3–4 only (the benchmark's shifted domain).
    AddLong,
    /// Sums with a 5-digit operand (beyond the `mix` training distribution).
    Add5,
    /// Next-byte language modelling on a text file.
    Text(TextCorpus),
    /// Word categories in a fixed answer format, for a pretrained chat model
    /// ([`crate::words`]; built with its tokenizer, so not by [`FtData::task`]).
    Words(std::sync::Arc<WordTask>),
}

impl FtData {
    /// Parse a task name: the familial tasks plus `add-long`.
    pub fn task(name: &str) -> Result<Self> {
        if name == "add-long" {
            return Ok(FtData::AddLong);
        }
        if name == "add-5" {
            return Ok(FtData::Add5);
        }
        if name == WORD_TASK {
            return Err(Error::invalid(
                "task",
                format!(
                    "`{name}` needs a pretrained model's tokenizer (e.g. smollm2-135m-instruct)"
                ),
            ));
        }
        name.parse::<Task>().map(FtData::Task).map_err(|_| {
            Error::invalid(
                "task",
                format!("`{name}` (use add, lookup, reverse, mix, add-long or add-5)"),
            )
        })
    }

    /// Name for reports.
    pub fn name(&self) -> String {
        match self {
            FtData::Task(t) => t.name().to_string(),
            FtData::AddLong => "add-long".into(),
            FtData::Add5 => "add-5".into(),
            FtData::Text(_) => "text".into(),
            FtData::Words(_) => WORD_TASK.into(),
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
            FtData::Add5 => add_5(n, train_seed(seed ^ 0xadd5, step))
                .iter()
                .map(Sequence::from)
                .collect(),
            FtData::Text(c) => c.train_batch(n, seed, step),
            FtData::Words(w) => w.train_batch(n, seed, step),
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
            FtData::Add5 => add_5(n, eval_seed(Task::Add, 5000 + split)),
            FtData::Text(_) | FtData::Words(_) => Vec::new(),
        }
    }

    /// Held-out sequences of split `split` for loss evaluation (validation).
    pub fn eval_sequences(&self, n: usize, split: u64) -> Vec<Sequence> {
        match self {
            FtData::Text(c) => c.eval_windows(n),
            // split 0 is the test words, any other split the validation words
            FtData::Words(w) if split == 0 => w.sequences(Split::Test, n),
            FtData::Words(w) => w.sequences(Split::Validation, n),
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

/// `n` sums with one 5-digit operand and one of 1-5 digits (either order), from `seed`.
pub fn add_5(n: usize, seed: u64) -> Vec<Example> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let a: u64 = rng.gen_range(10_000..100_000);
            let digits: u32 = rng.gen_range(1..=5);
            let b: u64 = if digits == 1 {
                rng.gen_range(0..10)
            } else {
                rng.gen_range(10u64.pow(digits - 1)..10u64.pow(digits))
            };
            let (a, b) = if rng.gen_bool(0.5) { (a, b) } else { (b, a) };
            Example {
                task: Task::Add,
                level: 5,
                prompt: encode_prompt(&format!("{a}+{b}=")),
                answer: (a + b).to_string().bytes().map(u32::from).collect(),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_5_has_a_five_digit_operand_and_correct_answers() {
        let d = FtData::task("add-5").unwrap();
        for e in d.eval_examples(50, 0) {
            let text: String = e.prompt[1..].iter().map(|&c| c as u8 as char).collect();
            let (a, b) = text.trim_end_matches('=').split_once('+').unwrap();
            assert!(a.len() == 5 || b.len() == 5, "{text}");
            let sum: u64 = a.parse::<u64>().unwrap() + b.parse::<u64>().unwrap();
            let ans: String = e.answer.iter().map(|&c| c as u8 as char).collect();
            assert_eq!(ans, sum.to_string());
        }
        assert_ne!(
            d.train_batch(4, 0, 0)[0].tokens,
            d.train_batch(4, 0, 1)[0].tokens
        );
    }

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
