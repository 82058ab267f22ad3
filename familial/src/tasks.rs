//! Built-in synthetic tasks for the byte-level families, and text-file data.
//!
//! Every task example is `prompt` + `answer` + `<|eos|>` in the byte-level vocabulary
//! (ids 0..=255 are bytes, [`BYTE_BOS`]/[`BYTE_EOS`] are specials). Prompts start with
//! `<|bos|>` and end with `=`, so a prompt alone says "answer now". Difficulty varies within
//! every task so that easy inputs are answerable at shallow exits and hard ones need depth:
//!
//! | task      | prompt → answer                    | difficulty (level)                  |
//! |-----------|------------------------------------|-------------------------------------|
//! | `add`     | `57+8=` → `65`                     | digits of the longer operand (1–4)  |
//! | `lookup`  | `k=37,b=05,x=91?b=` → `05`         | number of key-value pairs (1–8)     |
//! | `reverse` | `rev abc=` → `cba`                 | length of the string (1–8)          |
//! | `mix`     | one of the above, drawn per example | that task's level                   |
//!
//! Generation is deterministic given a seed ([`generate`]); the training stream
//! ([`train_example`]) and the held-out evaluation sets ([`eval_set`]) draw from disjoint
//! seed domains, so "held out" means "never generated from the same random stream".
//! Easy levels have few distinct examples (there are only 100 one-digit sums), so some
//! overlap of *contents* is unavoidable there; the harder levels are effectively unseen.

use std::path::Path;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};
use crate::tokenizer::{BYTE_BOS, BYTE_EOS};

/// A synthetic task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Task {
    /// Decimal addition of two 1–4 digit numbers, answer in the usual digit order.
    Add,
    /// A list of `key=value` pairs (single-letter keys, two-digit values), then a query key.
    Lookup,
    /// Reverse a lowercase string.
    Reverse,
    /// Each example drawn from `add` (40%), `lookup` (30%), `reverse` (30%).
    Mix,
}

impl Task {
    /// The concrete tasks (everything but `mix`).
    pub const CONCRETE: [Task; 3] = [Task::Add, Task::Lookup, Task::Reverse];

    /// Name as on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Task::Add => "add",
            Task::Lookup => "lookup",
            Task::Reverse => "reverse",
            Task::Mix => "mix",
        }
    }

    /// The difficulty levels this task draws from (inclusive). `mix` has none of its own.
    pub fn levels(self) -> std::ops::RangeInclusive<u32> {
        match self {
            Task::Add => 1..=4,
            Task::Lookup => 1..=8,
            Task::Reverse => 1..=8,
            Task::Mix => 1..=8,
        }
    }

    /// The concrete tasks an evaluation of `self` covers.
    pub fn components(self) -> Vec<Task> {
        match self {
            Task::Mix => Task::CONCRETE.to_vec(),
            t => vec![t],
        }
    }
}

impl std::fmt::Display for Task {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Task {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "add" => Task::Add,
            "lookup" => Task::Lookup,
            "reverse" => Task::Reverse,
            "mix" => Task::Mix,
            o => {
                return Err(Error::Invalid(format!(
                    "unknown task `{o}` (use add, lookup, reverse or mix)"
                )))
            }
        })
    }
}

/// One task example in byte-level token ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// The concrete task (never `Mix`).
    pub task: Task,
    /// Difficulty level (see [`Task::levels`]).
    pub level: u32,
    /// `<|bos|>` + prompt text (ends with `=`).
    pub prompt: Vec<u32>,
    /// Answer text, without the closing `<|eos|>`.
    pub answer: Vec<u32>,
}

impl Example {
    /// `prompt + answer + <|eos|>`: what the model is trained on.
    pub fn tokens(&self) -> Vec<u32> {
        let mut t = Vec::with_capacity(self.prompt.len() + self.answer.len() + 1);
        t.extend_from_slice(&self.prompt);
        t.extend_from_slice(&self.answer);
        t.push(BYTE_EOS);
        t
    }

    /// Prompt as text (the leading `<|bos|>` dropped).
    pub fn prompt_text(&self) -> String {
        bytes_text(&self.prompt)
    }

    /// Answer as text.
    pub fn answer_text(&self) -> String {
        bytes_text(&self.answer)
    }

    /// The target the model must produce after the prompt: answer + `<|eos|>`.
    pub fn target(&self) -> Vec<u32> {
        let mut t = self.answer.clone();
        t.push(BYTE_EOS);
        t
    }
}

fn bytes_text(ids: &[u32]) -> String {
    let b: Vec<u8> = ids.iter().filter(|&&i| i < 256).map(|&i| i as u8).collect();
    String::from_utf8_lossy(&b).into_owned()
}

/// Byte-level ids of `text` with a leading `<|bos|>`.
pub fn encode_prompt(text: &str) -> Vec<u32> {
    std::iter::once(BYTE_BOS)
        .chain(text.bytes().map(u32::from))
        .collect()
}

fn ids(text: &str) -> Vec<u32> {
    text.bytes().map(u32::from).collect()
}

fn number(rng: &mut StdRng, digits: u32) -> u64 {
    if digits <= 1 {
        rng.gen_range(0..10)
    } else {
        rng.gen_range(10u64.pow(digits - 1)..10u64.pow(digits))
    }
}

/// One example of concrete `task` at difficulty `level`.
pub fn example_at(task: Task, level: u32, rng: &mut StdRng) -> Example {
    let (prompt, answer) = match task {
        Task::Add => {
            let d = level.clamp(1, 4);
            let a = number(rng, d);
            let db = rng.gen_range(1..=d);
            let b = number(rng, db);
            let (a, b) = if rng.gen_bool(0.5) { (a, b) } else { (b, a) };
            (format!("{a}+{b}="), (a + b).to_string())
        }
        Task::Lookup => {
            let n = level.clamp(1, 8) as usize;
            let mut keys: Vec<u8> = (b'a'..=b'z').collect();
            // Partial Fisher-Yates: n distinct keys.
            for i in 0..n {
                let j = rng.gen_range(i..keys.len());
                keys.swap(i, j);
            }
            let pairs: Vec<(char, u32)> = keys[..n]
                .iter()
                .map(|&k| (k as char, rng.gen_range(0..100)))
                .collect();
            let q = rng.gen_range(0..n);
            let ctx: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}={v:02}")).collect();
            (
                format!("{}?{}=", ctx.join(","), pairs[q].0),
                format!("{:02}", pairs[q].1),
            )
        }
        Task::Reverse => {
            let n = level.clamp(1, 8) as usize;
            let s: String = (0..n).map(|_| rng.gen_range(b'a'..=b'z') as char).collect();
            (format!("rev {s}="), s.chars().rev().collect())
        }
        Task::Mix => {
            let t = mix_component(rng);
            let level = random_level(t, rng);
            return example_at(t, level, rng);
        }
    };
    Example {
        task,
        level,
        prompt: encode_prompt(&prompt),
        answer: ids(&answer),
    }
}

fn mix_component(rng: &mut StdRng) -> Task {
    let u: f64 = rng.gen();
    if u < 0.4 {
        Task::Add
    } else if u < 0.7 {
        Task::Lookup
    } else {
        Task::Reverse
    }
}

fn random_level(task: Task, rng: &mut StdRng) -> u32 {
    match task {
        // Shorter sums more often: they are what shallow exits can learn.
        Task::Add => {
            let u: f64 = rng.gen();
            if u < 0.25 {
                1
            } else if u < 0.55 {
                2
            } else if u < 0.8 {
                3
            } else {
                4
            }
        }
        t => rng.gen_range(t.levels()),
    }
}

/// One example of `task` at a random level (for `mix`, of a random component task).
pub fn example(task: Task, rng: &mut StdRng) -> Example {
    match task {
        Task::Mix => example_at(Task::Mix, 0, rng),
        t => {
            let level = random_level(t, rng);
            example_at(t, level, rng)
        }
    }
}

/// `n` examples of `task`, deterministic given `seed`.
pub fn generate(task: Task, n: usize, seed: u64) -> Vec<Example> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n).map(|_| example(task, &mut rng)).collect()
}

/// `n` examples of concrete `task`, all at difficulty `level`, deterministic given `seed`.
pub fn generate_level(task: Task, level: u32, n: usize, seed: u64) -> Vec<Example> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n).map(|_| example_at(task, level, &mut rng)).collect()
}

// Seed domains: training streams and evaluation sets never share a random stream.
const TRAIN_DOMAIN: u64 = 0x7472_6169_6e00_0000; // "train"
const EVAL_DOMAIN: u64 = 0x6576_616c_0000_0000; // "eval"

fn mix64(mut z: u64) -> u64 {
    // splitmix64 finaliser.
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Seed of the training stream for `(seed, step)`.
pub fn train_seed(seed: u64, step: u64) -> u64 {
    mix64(TRAIN_DOMAIN ^ mix64(seed.wrapping_add(mix64(step))))
}

/// Seed of the held-out evaluation set number `split` (0, 1, ...) of `task`.
pub fn eval_seed(task: Task, split: u64) -> u64 {
    mix64(EVAL_DOMAIN ^ mix64(split.wrapping_mul(31).wrapping_add(task as u64)))
}

/// The training examples of step `step` for run seed `seed`: `n` examples of `task`.
pub fn train_example_batch(task: Task, n: usize, seed: u64, step: u64) -> Vec<Example> {
    generate(task, n, train_seed(seed, step))
}

/// One training example (convenience over [`train_example_batch`]).
pub fn train_example(task: Task, seed: u64, step: u64) -> Example {
    generate(task, 1, train_seed(seed, step)).remove(0)
}

/// The held-out evaluation set of concrete `task`: `n` examples from the eval seed domain.
/// `split` 0 is what `model train` prints and `TRAINED.md` records.
pub fn eval_set(task: Task, n: usize, split: u64) -> Vec<Example> {
    generate(task, n, eval_seed(task, split))
}

/// A training sequence: `tokens`, with the loss taken on predicting `tokens[loss_from..]`
/// (the answer and `<|eos|>` for task examples, everything after `<|bos|>` for text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sequence {
    pub tokens: Vec<u32>,
    pub loss_from: usize,
}

impl From<&Example> for Sequence {
    fn from(e: &Example) -> Self {
        Sequence {
            tokens: e.tokens(),
            loss_from: e.prompt.len(),
        }
    }
}

impl Sequence {
    /// Number of predicted (loss) positions.
    pub fn loss_positions(&self) -> usize {
        self.tokens.len().saturating_sub(self.loss_from.max(1))
    }
}

/// A UTF-8 text file for next-byte language modelling.
#[derive(Debug, Clone)]
pub struct TextCorpus {
    bytes: Vec<u8>,
    /// Bytes per training window (the sequence is `<|bos|>` + window).
    pub window: usize,
}

impl TextCorpus {
    /// Read `path` (must be UTF-8 and longer than `window` bytes).
    pub fn from_file(path: &Path, window: usize) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        std::str::from_utf8(&bytes)
            .map_err(|e| Error::Invalid(format!("{} is not UTF-8 text: {e}", path.display())))?;
        Self::from_bytes(bytes, window)
    }

    /// Wrap text already in memory.
    pub fn from_bytes(bytes: Vec<u8>, window: usize) -> Result<Self> {
        if window < 2 {
            return Err(Error::Invalid(
                "text window must be at least 2 bytes".into(),
            ));
        }
        if bytes.len() < window {
            return Err(Error::Invalid(format!(
                "the text has {} bytes, fewer than one window of {window}",
                bytes.len()
            )));
        }
        Ok(Self { bytes, window })
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Whether the corpus is empty.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// A window starting at byte `start`: `<|bos|>` + bytes, loss on every byte.
    pub fn window_at(&self, start: usize) -> Sequence {
        let start = start.min(self.bytes.len() - self.window);
        let mut tokens = Vec::with_capacity(self.window + 1);
        tokens.push(BYTE_BOS);
        tokens.extend(
            self.bytes[start..start + self.window]
                .iter()
                .map(|&b| u32::from(b)),
        );
        Sequence {
            tokens,
            loss_from: 1,
        }
    }

    /// `n` random windows for `(seed, step)`. The last 10% of the file (at least one window)
    /// is held out for evaluation and never sampled here.
    pub fn train_batch(&self, n: usize, seed: u64, step: u64) -> Vec<Sequence> {
        let mut rng = StdRng::seed_from_u64(train_seed(seed, step));
        let limit = self.train_limit();
        (0..n)
            .map(|_| self.window_at(rng.gen_range(0..=limit)))
            .collect()
    }

    fn train_limit(&self) -> usize {
        let max_start = self.bytes.len() - self.window;
        let held = (self.bytes.len() / 10).max(self.window);
        max_start.saturating_sub(held)
    }

    /// Up to `n` non-overlapping held-out windows from the end of the file.
    pub fn eval_windows(&self, n: usize) -> Vec<Sequence> {
        let max_start = self.bytes.len() - self.window;
        let first = (self.train_limit() + self.window).min(max_start);
        (0..n)
            .map(|i| first + i * self.window)
            .take_while(|&s| s <= max_start)
            .map(|s| self.window_at(s))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn examples_are_correct_and_deterministic() {
        for task in [Task::Add, Task::Lookup, Task::Reverse, Task::Mix] {
            let a = generate(task, 200, 7);
            assert_eq!(a, generate(task, 200, 7));
            assert_ne!(a, generate(task, 200, 8));
            for e in &a {
                assert_eq!(e.prompt[0], BYTE_BOS);
                assert_eq!(*e.prompt.last().unwrap(), u32::from(b'='));
                assert!(!e.answer.is_empty());
                assert_eq!(*e.tokens().last().unwrap(), BYTE_EOS);
                assert!(task == Task::Mix || e.task == task);
                let p = e.prompt_text();
                let ans = e.answer_text();
                match e.task {
                    Task::Add => {
                        let (x, y) = p.trim_end_matches('=').split_once('+').unwrap();
                        let s: u64 = x.parse::<u64>().unwrap() + y.parse::<u64>().unwrap();
                        assert_eq!(ans, s.to_string());
                        assert_eq!(x.len().max(y.len()) as u32, e.level);
                    }
                    Task::Lookup => {
                        let (ctx, q) = p.trim_end_matches('=').split_once('?').unwrap();
                        let v = ctx
                            .split(',')
                            .find_map(|kv| kv.strip_prefix(&format!("{q}=")))
                            .unwrap();
                        assert_eq!(ans, v);
                        assert_eq!(ctx.split(',').count() as u32, e.level);
                    }
                    Task::Reverse => {
                        let s = p.strip_prefix("rev ").unwrap().trim_end_matches('=');
                        assert_eq!(ans, s.chars().rev().collect::<String>());
                    }
                    Task::Mix => unreachable!(),
                }
            }
        }
    }

    #[test]
    fn mix_covers_every_task_and_level() {
        let ex = generate(Task::Mix, 2000, 1);
        for t in Task::CONCRETE {
            for l in t.levels() {
                assert!(
                    ex.iter().any(|e| e.task == t && e.level == l),
                    "{t} level {l}"
                );
            }
        }
    }

    #[test]
    fn train_and_eval_streams_differ() {
        let ev = eval_set(Task::Add, 50, 0);
        let tr = train_example_batch(Task::Add, 50, 0, 0);
        assert_ne!(ev, tr);
        assert_ne!(train_seed(1, 0), train_seed(1, 1));
        assert_ne!(train_seed(1, 0), train_seed(2, 0));
    }

    #[test]
    fn text_windows() {
        let text: Vec<u8> = (0..1000).map(|i| b'a' + (i % 26) as u8).collect();
        let c = TextCorpus::from_bytes(text, 32).unwrap();
        let b = c.train_batch(8, 1, 0);
        assert_eq!(b.len(), 8);
        assert!(b.iter().all(|s| s.tokens.len() == 33 && s.loss_from == 1));
        assert_eq!(b, c.train_batch(8, 1, 0));
        let ev = c.eval_windows(100);
        assert!(!ev.is_empty());
        assert!(TextCorpus::from_bytes(vec![b'a'; 4], 32).is_err());
    }
}
