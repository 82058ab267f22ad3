//! Self-distillation data: chat prompts rendered with the model's own template, answered
//! greedily by the full model (what cloud-only serving returns), kept as token sequences
//! whose loss rows are the answer.

use serde::{Deserialize, Serialize};

use crate::chat::{ChatMessage, ChatTemplate};
use crate::error::{Error, Result};
use crate::model::FamilialModel;
use crate::source::ModelSource;
use crate::tasks::Sequence;
use crate::tokenizer::Tokenizer;
use crate::train::greedy_batch;

/// Turns a user message into prompt token ids exactly as the HTTP chat API does: the
/// model's chat template with a generation prompt, then the model's BOS rule.
#[derive(Debug)]
pub struct ChatEncoder {
    template: ChatTemplate,
    tokenizer: Tokenizer,
    bos: Option<u32>,
}

impl ChatEncoder {
    /// The encoder of `source` (which must carry a chat template).
    pub fn new(source: &ModelSource) -> Result<Self> {
        let template = source.chat()?.ok_or_else(|| {
            Error::Invalid(format!(
                "{} has no chat template; chat prompts need one",
                source.path().display()
            ))
        })?;
        let bos = if source.add_bos_token() {
            source.config()?.bos_token_id
        } else {
            None
        };
        Ok(Self {
            template,
            tokenizer: source.tokenizer()?,
            bos,
        })
    }

    /// Prompt ids of one user turn.
    pub fn encode(&self, user: &str) -> Result<Vec<u32>> {
        let text = self
            .template
            .render(&[ChatMessage::new("user", user)], true)?;
        let mut ids: Vec<u32> = self.bos.into_iter().collect();
        ids.extend(self.tokenizer.encode(&text)?);
        Ok(ids)
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }
}

/// One prompt and the full model's greedy answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatSample {
    /// The user message.
    pub prompt: String,
    /// Prompt ids (template + BOS rule applied).
    pub prompt_ids: Vec<u32>,
    /// Greedy answer ids of the deepest exit, EOS included when it was produced.
    pub answer_ids: Vec<u32>,
}

impl ChatSample {
    /// The sequence to distil on: prompt + answer, loss on the answer.
    pub fn sequence(&self) -> Sequence {
        let mut tokens = self.prompt_ids.clone();
        tokens.extend_from_slice(&self.answer_ids);
        Sequence {
            tokens,
            loss_from: self.prompt_ids.len(),
        }
    }
}

/// Answer `prompts` greedily with `model`'s deepest exit, `batch` prompts at a time (each
/// with its own KV cache), at most `max_new` tokens each; `progress(done)` after every
/// batch.
pub fn generate(
    model: &FamilialModel,
    encoder: &ChatEncoder,
    prompts: &[String],
    max_new: usize,
    batch: usize,
    mut progress: impl FnMut(usize),
) -> Result<Vec<ChatSample>> {
    let point = model.config().last_exit().point;
    let mut out = Vec::with_capacity(prompts.len());
    for chunk in prompts.chunks(batch.max(1)) {
        let ids: Vec<Vec<u32>> = chunk
            .iter()
            .map(|p| encoder.encode(p))
            .collect::<Result<_>>()?;
        let answers = greedy_batch(model, &ids, point, max_new)?;
        for ((p, prompt_ids), answer_ids) in chunk.iter().zip(ids).zip(answers) {
            out.push(ChatSample {
                prompt: p.clone(),
                prompt_ids,
                answer_ids,
            });
        }
        progress(out.len());
    }
    Ok(out)
}
