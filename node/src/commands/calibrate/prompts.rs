//! What the calibrator decodes: the built-in tasks' examples for the project's own families,
//! chat prompts for families over a pretrained model.

use anyhow::bail;
use flow_familial::family::data::ChatEncoder;
use flow_familial::family::prompts::{chat_prompts, Split};
use flow_familial::tasks::Example;
use flow_familial::ModelSource;

use super::{validation_set, CalibrateArgs};

/// A validation prompt: its tokens and the most tokens to decode after it.
#[derive(Debug, Clone)]
pub struct Prompt {
    pub tokens: Vec<u32>,
    pub max_new: usize,
}

impl From<&Example> for Prompt {
    /// Room for the answer, its end-of-sequence and one token of slack.
    fn from(e: &Example) -> Self {
        Self {
            tokens: e.prompt.clone(),
            max_new: e.answer.len() + 2,
        }
    }
}

/// The prompts of `examples`.
pub fn prompts_of(examples: &[Example]) -> Vec<Prompt> {
    examples.iter().map(Prompt::from).collect()
}

/// What the records are decoded on: the built-in task's examples for the project's own
/// families, chat prompts (rendered with the model's template) for a family over a
/// pretrained model — `Calibrate` split to calibrate, `Test` split (unseen topics) for
/// `--check`.
pub(super) struct Validation {
    pub prompts: Vec<Prompt>,
    /// `task` of the file: the task's name, or `chat/<split>`.
    pub task: String,
}

pub(super) fn validation(
    a: &CalibrateArgs,
    src: &ModelSource,
    held_out: bool,
) -> anyhow::Result<Validation> {
    if !matches!(src, ModelSource::Family(_)) {
        let ex = validation_set(a.task, a.examples, a.split_seed);
        return Ok(Validation {
            prompts: prompts_of(&ex),
            task: a.task.name().into(),
        });
    }
    let split = if held_out {
        Split::Test
    } else {
        Split::Calibrate
    };
    let texts = chat_prompts(split, a.examples, a.split_seed);
    if texts.len() < a.examples {
        bail!(
            "only {} distinct {split:?} chat prompts exist (--examples {})",
            texts.len(),
            a.examples
        );
    }
    let enc = ChatEncoder::new(src)?;
    let prompts = texts
        .iter()
        .map(|t| {
            Ok(Prompt {
                tokens: enc.encode(t)?,
                max_new: a.max_new,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(Validation {
        prompts,
        task: format!("chat/{}", if held_out { "test" } else { "calibrate" }),
    })
}
