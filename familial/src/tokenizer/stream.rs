//! Incremental, UTF-8-safe decoding of generated tokens: [`DecodeStream`].

use super::Tokenizer;
use crate::error::Result;

/// Decodes token ids one at a time and yields only complete UTF-8 text: a character whose
/// bytes are split across tokens is held back until its last byte arrives. The chunks from
/// [`DecodeStream::step`] followed by [`DecodeStream::finish`] concatenate to
/// `tokenizer.decode(all ids)`.
///
/// Each step decodes a small window (the tokens of the last emitted chunk plus those not yet
/// emitted) twice and returns the difference, so decoders that look at neighbouring tokens
/// stay right and the cost per token does not grow with the sequence. The stream holds no
/// reference to the tokenizer; pass the same one to every call.
#[derive(Debug, Clone, Default)]
pub struct DecodeStream {
    /// Tokens of the last emitted chunk, then tokens not yet emitted.
    ids: Vec<u32>,
    /// How many of `ids` belong to the last emitted chunk.
    read: usize,
}

impl DecodeStream {
    /// An empty stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// Add one token; returns the text it completes, if any.
    pub fn step(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        self.emit(tokenizer, false)
    }

    /// End of the stream: returns whatever is held back (an incomplete character decodes as
    /// U+FFFD, as in [`Tokenizer::decode`]) and resets the stream.
    pub fn finish(&mut self, tokenizer: &Tokenizer) -> Result<Option<String>> {
        let out = self.emit(tokenizer, true);
        self.ids.clear();
        self.read = 0;
        out
    }

    fn emit(&mut self, tokenizer: &Tokenizer, last: bool) -> Result<Option<String>> {
        if self.ids.len() == self.read {
            return Ok(None);
        }
        let prefix = tokenizer.decode(&self.ids[..self.read])?;
        let text = tokenizer.decode(&self.ids)?;
        let complete = last || !text.ends_with(char::REPLACEMENT_CHARACTER);
        let new = match text.strip_prefix(prefix.as_str()) {
            Some(new) if complete && !new.is_empty() => new.to_string(),
            Some("") if complete => {
                // Tokens that decode to nothing (skipped specials): nothing to hold back.
                self.read = self.ids.len();
                return Ok(None);
            }
            _ if last => text
                .get(prefix.len().min(text.len())..)
                .unwrap_or("")
                .to_string(),
            _ => return Ok(None),
        };
        self.ids.drain(..self.read);
        self.read = self.ids.len();
        Ok(Some(new))
    }
}
