//! A byte-level BPE tokenizer built from GGUF metadata (`tokenizer.ggml.*`), the way
//! llama.cpp builds it: entry points [`Tokenizer::from_gguf`] and [`gguf_specials`].
//!
//! candle's `TokenizerFromGguf` is not used: it needs a whole `gguf_file::Content` rather
//! than the metadata map, knows no `smollm` (it falls back to plain GPT-2 and so merges
//! digit runs SmolLM splits), does not know llama.cpp's `llama-bpe` name, reads
//! `unk_token_id`/`pad_token_id` where GGUF writes `unknown_token_id`/`padding_token_id`,
//! and marks unused tokens (type 5) special.
//!
//! Pre-tokenizers follow `llm_tokenizer_bpe` in llama.cpp's `src/llama-vocab.cpp`: each
//! regex splits every piece in turn (matches isolated), then bytes map to GPT-2's
//! printable alphabet. Control (3) and unknown (2) tokens are matched whole in encode and
//! skipped in decode; user-defined (4) tokens are matched whole and decoded as text.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use super::Tokenizer;
use crate::error::{Error, Result};

/// GPT-2's pre-tokenizer regex as llama.cpp writes it.
const RE_GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
/// Llama 3's regex, llama.cpp's case-insensitive-free rewrite.
const RE_LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's regex: Llama 3's with single digits.
const RE_QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The regex sequence of a `tokenizer.ggml.pre` value, or `None` if unsupported.
/// Returns the regexes and whether BPE ignores merges for whole-word vocabulary hits.
fn pre_regexes(pre: &str) -> Option<(Vec<&'static str>, bool)> {
    Some(match pre {
        // LLAMA_VOCAB_PRE_TYPE_DEFAULT (also an absent key).
        "" | "default" => (
            vec![
                r"[\p{P}\$\+<=>\^~\|]+",
                RE_GPT2,
                r"\p{N}+",
                "[0-9][0-9][0-9]",
            ],
            false,
        ),
        "gpt2" | "gpt-2" | "phi-2" | "mpt" | "olmo" | "jais" => (vec![RE_GPT2], false),
        "smollm" | "starcoder" | "refact" | "codeshell" | "command-r" | "exaone" => {
            (vec![r"\p{N}", RE_GPT2], false)
        }
        "qwen2" | "deepseek-r1-qwen" | "stablelm2" => (vec![RE_QWEN2], false),
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "pixtral" | "lfm2" => {
            (vec![RE_LLAMA3], true)
        }
        "smaug-bpe" | "dbrx" => (vec![RE_LLAMA3], false),
        _ => return None,
    })
}

fn bad(key: &str, msg: impl Into<String>) -> Error {
    Error::GgufMetadata {
        key: key.to_string(),
        msg: msg.into(),
    }
}

fn get<'a>(md: &'a HashMap<String, Value>, key: &str) -> Result<&'a Value> {
    md.get(key).ok_or_else(|| bad(key, "missing"))
}

/// A GGUF string value.
pub(crate) fn get_str<'a>(md: &'a HashMap<String, Value>, key: &str) -> Result<&'a str> {
    match get(md, key)? {
        Value::String(s) => Ok(s),
        v => Err(bad(
            key,
            format!("expected a string, got {:?}", v.value_type()),
        )),
    }
}

fn to_u32(v: &Value, key: &str) -> Result<u32> {
    let n: i128 = match v {
        Value::U8(x) => (*x).into(),
        Value::I8(x) => (*x).into(),
        Value::U16(x) => (*x).into(),
        Value::I16(x) => (*x).into(),
        Value::U32(x) => (*x).into(),
        Value::I32(x) => (*x).into(),
        Value::U64(x) => (*x).into(),
        Value::I64(x) => (*x).into(),
        v => {
            return Err(bad(
                key,
                format!("expected an integer, got {:?}", v.value_type()),
            ))
        }
    };
    u32::try_from(n).map_err(|_| bad(key, format!("{n} is not a valid token id or type")))
}

fn opt_u32(md: &HashMap<String, Value>, key: &str) -> Result<Option<u32>> {
    md.get(key).map(|v| to_u32(v, key)).transpose()
}

fn opt_bool(md: &HashMap<String, Value>, key: &str) -> Result<Option<bool>> {
    match md.get(key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => Err(bad(
            key,
            format!("expected a bool, got {:?}", v.value_type()),
        )),
    }
}

fn array<'a>(md: &'a HashMap<String, Value>, key: &str) -> Result<&'a [Value]> {
    match get(md, key)? {
        Value::Array(a) => Ok(a),
        v => Err(bad(
            key,
            format!("expected an array, got {:?}", v.value_type()),
        )),
    }
}

fn str_array<'a>(md: &'a HashMap<String, Value>, key: &str) -> Result<Vec<&'a str>> {
    array(md, key)?
        .iter()
        .enumerate()
        .map(|(i, v)| match v {
            Value::String(s) => Ok(s.as_str()),
            v => Err(bad(
                key,
                format!("element {i} is {:?}, not a string", v.value_type()),
            )),
        })
        .collect()
}

/// One special token of a GGUF vocabulary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecialToken {
    /// Token id.
    pub id: u32,
    /// Token text as stored in `tokenizer.ggml.tokens` (e.g. `<|im_start|>`).
    pub text: String,
}

/// The special tokens and BOS/EOS policy a GGUF declares (`tokenizer.ggml.*_token_id`,
/// `add_bos_token`, `add_eos_token`), for the model loader and [`crate::chat::ChatTemplate`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GgufSpecials {
    /// `bos_token_id`.
    pub bos: Option<SpecialToken>,
    /// `eos_token_id` (generation stops here).
    pub eos: Option<SpecialToken>,
    /// `padding_token_id`.
    pub pad: Option<SpecialToken>,
    /// `unknown_token_id`.
    pub unk: Option<SpecialToken>,
    /// Whether a BOS is prepended to prompts (`add_bos_token`, default false).
    pub add_bos: bool,
    /// Whether an EOS is appended to prompts (`add_eos_token`, default false).
    pub add_eos: bool,
}

/// Read the special tokens a GGUF declares; ids must lie inside `tokenizer.ggml.tokens`.
pub fn gguf_specials(md: &HashMap<String, Value>) -> Result<GgufSpecials> {
    let tokens = str_array(md, "tokenizer.ggml.tokens")?;
    let special = |name: &str| -> Result<Option<SpecialToken>> {
        let key = format!("tokenizer.ggml.{name}_token_id");
        let Some(id) = opt_u32(md, &key)? else {
            return Ok(None);
        };
        let text = tokens.get(id as usize).ok_or_else(|| {
            bad(
                &key,
                format!("id {id} outside the vocabulary of {}", tokens.len()),
            )
        })?;
        Ok(Some(SpecialToken {
            id,
            text: text.to_string(),
        }))
    };
    Ok(GgufSpecials {
        bos: special("bos")?,
        eos: special("eos")?,
        pad: special("padding")?,
        unk: special("unknown")?,
        add_bos: opt_bool(md, "tokenizer.ggml.add_bos_token")?.unwrap_or(false),
        add_eos: opt_bool(md, "tokenizer.ggml.add_eos_token")?.unwrap_or(false),
    })
}

fn pre_tokenizer(pre: &str) -> Result<(PreTokenizerWrapper, bool)> {
    let key = "tokenizer.ggml.pre";
    let (regexes, ignore_merges) = pre_regexes(pre).ok_or_else(|| {
        bad(key, format!("unsupported pre-tokenizer `{pre}` (supported: default, gpt2, smollm, qwen2, llama-bpe and their llama.cpp aliases)"))
    })?;
    let mut steps: Vec<PreTokenizerWrapper> = Vec::with_capacity(regexes.len() + 1);
    for re in regexes {
        let split = Split::new(
            SplitPattern::Regex(re.to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| bad(key, format!("regex {re}: {e}")))?;
        steps.push(split.into());
    }
    steps.push(ByteLevel::new(false, false, false).into());
    Ok((Sequence::new(steps).into(), ignore_merges))
}

impl Tokenizer {
    /// Build the tokenizer a GGUF file describes from its metadata map
    /// (`gguf_file::Content::metadata`). Only `tokenizer.ggml.model = gpt2` (byte-level
    /// BPE) is supported; a missing or ill-typed key is an [`Error::GgufMetadata`] naming it.
    pub fn from_gguf(md: &HashMap<String, Value>) -> Result<Tokenizer> {
        let model = get_str(md, "tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(bad(
                "tokenizer.ggml.model",
                format!("unsupported tokenizer model `{model}` (only gpt2 byte-level BPE)"),
            ));
        }
        let pre = match md.get("tokenizer.ggml.pre") {
            None => "default",
            Some(_) => get_str(md, "tokenizer.ggml.pre")?,
        };
        let tokens = str_array(md, "tokenizer.ggml.tokens")?;
        let merges_key = "tokenizer.ggml.merges";
        let merges = str_array(md, merges_key)?
            .into_iter()
            .enumerate()
            .map(|(i, m)| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| bad(merges_key, format!("merge {i} `{m}` has no space")))
            })
            .collect::<Result<Vec<_>>>()?;
        let types: Vec<u32> = match md.get("tokenizer.ggml.token_type") {
            None => vec![1; tokens.len()],
            Some(_) => array(md, "tokenizer.ggml.token_type")?
                .iter()
                .map(|v| to_u32(v, "tokenizer.ggml.token_type"))
                .collect::<Result<_>>()?,
        };
        if types.len() != tokens.len() {
            return Err(bad(
                "tokenizer.ggml.token_type",
                format!("{} entries for {} tokens", types.len(), tokens.len()),
            ));
        }
        let (pre_tok, ignore_merges) = pre_tokenizer(pre)?;
        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.to_string(), i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .ignore_merges(ignore_merges)
            .build()
            .map_err(|e| bad(merges_key, format!("cannot build BPE: {e}")))?;
        let mut t = tokenizers::Tokenizer::new(bpe);
        t.with_pre_tokenizer(Some(pre_tok));
        t.with_decoder(Some(ByteLevelDecoder::new(false, false, false)));
        // llama.cpp's special-token cache: control (3) and unknown (2) are special,
        // user-defined (4) are matched whole but decode as text.
        let mut added = Vec::new();
        for (tok, ty) in tokens.iter().zip(&types) {
            match ty {
                2 | 3 => added.push(AddedToken::from(tok.to_string(), true)),
                4 => added.push(AddedToken::from(tok.to_string(), false).normalized(false)),
                _ => {}
            }
        }
        t.add_tokens(added)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(Tokenizer::Hf(Box::new(t)))
    }
}
