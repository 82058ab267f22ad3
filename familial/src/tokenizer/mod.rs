//! Tokenizers: any HF `tokenizer.json` through the `tokenizers` crate, the byte-level BPE
//! of a GGUF file, and the byte-level tokenizer of the built-in families (256 byte tokens +
//! a few specials), which is itself written as a standard `tokenizer.json` so every HF tool
//! reads it too.
//!
//! Entry points: [`Tokenizer::from_dir`], [`Tokenizer::from_file`], [`Tokenizer::from_gguf`]
//! (with [`gguf_specials`] for BOS/EOS), then [`Tokenizer::encode`], [`Tokenizer::decode`]
//! and, for streaming output, [`DecodeStream`].

use std::path::Path;

use crate::error::{Error, Result};

mod gguf;
mod stream;

pub use gguf::{gguf_specials, GgufSpecials, SpecialToken};
pub use stream::DecodeStream;

/// Special tokens of the built-in byte-level families, ids 256.. in this order.
pub const BYTE_SPECIALS: [&str; 16] = [
    "<|bos|>", "<|eos|>", "<|pad|>", "<|sep|>", "<|q|>", "<|a|>", "<|s6|>", "<|s7|>", "<|s8|>",
    "<|s9|>", "<|s10|>", "<|s11|>", "<|s12|>", "<|s13|>", "<|s14|>", "<|s15|>",
];

/// Vocabulary size of the built-in byte-level tokenizer.
pub const BYTE_VOCAB: usize = 256 + BYTE_SPECIALS.len();
/// `<|bos|>` id.
pub const BYTE_BOS: u32 = 256;
/// `<|eos|>` id.
pub const BYTE_EOS: u32 = 257;

/// GPT-2's reversible byte → printable-unicode map used by byte-level BPE.
fn bytes_to_unicode() -> Vec<char> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut map = vec!['\0'; 256];
    for (b, c) in bs.iter().zip(cs) {
        map[*b as usize] = char::from_u32(c).unwrap_or('?');
    }
    map
}

/// The `tokenizer.json` of the byte-level tokenizer: a ByteLevel BPE with no merges, so
/// token id = byte value, plus [`BYTE_SPECIALS`] as added tokens.
pub fn byte_level_tokenizer_json() -> String {
    let map = bytes_to_unicode();
    let vocab: serde_json::Map<String, serde_json::Value> = (0..256)
        .map(|b| (map[b].to_string(), serde_json::Value::from(b as u64)))
        .collect();
    let added: Vec<serde_json::Value> = BYTE_SPECIALS
        .iter()
        .enumerate()
        .map(|(i, s)| {
            serde_json::json!({"id": 256 + i, "content": s, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let j = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": false, "vocab": vocab, "merges": []}
    });
    serde_json::to_string_pretty(&j).unwrap_or_default()
}

/// A loaded tokenizer.
pub enum Tokenizer {
    /// An HF `tokenizer.json`.
    Hf(Box<tokenizers::Tokenizer>),
    /// Raw bytes (no `tokenizer.json` present).
    Bytes,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Tokenizer::Hf(_) => f.write_str("Tokenizer::Hf"),
            Tokenizer::Bytes => f.write_str("Tokenizer::Bytes"),
        }
    }
}

impl Tokenizer {
    /// `dir/tokenizer.json` if present, else the byte-level fallback.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let p = dir.join("tokenizer.json");
        if p.exists() {
            Self::from_file(&p)
        } else {
            Ok(Tokenizer::Bytes)
        }
    }

    /// Load an HF `tokenizer.json`.
    ///
    /// The text is parsed as JSON first and the `tokenizers` crate reads the parsed value:
    /// given the text, its decoder deserializer (0.23) *panics* on a syntax error inside
    /// the `decoder` object (`expect("Helper")`, found by the `hf_tokenizer` fuzz target);
    /// given a value there is no syntax left to fail on.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        let value: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::Tokenizer(format!("{}: not valid JSON: {e}", path.display())))?;
        let t: tokenizers::Tokenizer = serde_json::from_value(value)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        Ok(Tokenizer::Hf(Box::new(t)))
    }

    /// Text → token ids (special tokens written literally are recognised).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match self {
            Tokenizer::Hf(t) => Ok(t
                .encode(text, false)
                .map_err(|e| Error::Tokenizer(e.to_string()))?
                .get_ids()
                .to_vec()),
            Tokenizer::Bytes => Ok(text.bytes().map(u32::from).collect()),
        }
    }

    /// A prompt's token ids under the model's BOS rule: `bos` (the model's BOS id when it
    /// asks for one, `add_bos_token`) goes first unless the text already starts with it — a
    /// chat template that writes `{{ bos_token }}` itself, or a user who typed it — so a
    /// prompt never begins with two (llama.cpp and HF's `apply_chat_template` behave alike).
    pub fn encode_prompt(&self, text: &str, bos: Option<u32>) -> Result<Vec<u32>> {
        let ids = self.encode(text)?;
        Ok(match bos {
            Some(b) if ids.first() != Some(&b) => std::iter::once(b).chain(ids).collect(),
            _ => ids,
        })
    }

    /// Token ids → text (special tokens skipped; invalid UTF-8 replaced).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        match self {
            Tokenizer::Hf(t) => t
                .decode(ids, true)
                .map_err(|e| Error::Tokenizer(e.to_string())),
            Tokenizer::Bytes => {
                let bytes: Vec<u8> = ids.iter().filter(|&&i| i < 256).map(|&i| i as u8).collect();
                Ok(String::from_utf8_lossy(&bytes).into_owned())
            }
        }
    }

    /// The bytes token `id` stands for (OpenAI's `bytes` of a log-probability entry):
    /// special tokens as written, a byte-level BPE piece as its raw bytes even when they are
    /// only part of a UTF-8 character, `<0xNN>` byte-fallback pieces as that byte. Empty for
    /// an id outside the vocabulary.
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        match self {
            Tokenizer::Bytes => match id {
                0..=255 => vec![id as u8],
                _ => BYTE_SPECIALS
                    .get(id as usize - 256)
                    .map(|s| s.as_bytes().to_vec())
                    .unwrap_or_default(),
            },
            Tokenizer::Hf(t) => {
                let Some(piece) = t.id_to_token(id) else {
                    return Vec::new();
                };
                if let Ok(text) = t.decode(&[id], false) {
                    if !text.contains(char::REPLACEMENT_CHARACTER) {
                        return text.into_bytes();
                    }
                }
                if let Some(b) = piece
                    .strip_prefix("<0x")
                    .and_then(|h| h.strip_suffix('>'))
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    return vec![b];
                }
                let table = byte_level_inverse();
                piece
                    .chars()
                    .map(|c| table.get(&c).copied())
                    .collect::<Option<Vec<u8>>>()
                    .unwrap_or_else(|| piece.into_bytes())
            }
        }
    }

    /// Id of a token string, if it is in the vocabulary.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        match self {
            Tokenizer::Hf(t) => t.token_to_id(token),
            Tokenizer::Bytes => BYTE_SPECIALS
                .iter()
                .position(|s| *s == token)
                .map(|i| 256 + i as u32),
        }
    }
}

/// GPT-2's byte-level alphabet reversed: the printable character each byte is written as
/// in a byte-level BPE vocabulary → that byte.
fn byte_level_inverse() -> std::collections::HashMap<char, u8> {
    let mut printable: Vec<u32> = (u32::from(b'!')..=u32::from(b'~')).collect();
    printable.extend(0xA1..=0xAC);
    printable.extend(0xAE..=0xFF);
    let mut map = std::collections::HashMap::with_capacity(256);
    let mut next = 256u32;
    for b in 0..=255u32 {
        let c = if printable.contains(&b) {
            b
        } else {
            next += 1;
            next - 1
        };
        if let Some(c) = char::from_u32(c) {
            map.insert(c, b as u8);
        }
    }
    map
}

#[cfg(test)]
mod gguf_tests;

#[cfg(test)]
mod tests {
    use super::*;

    /// `byte_level_tokenizer_json()` loaded through the `tokenizers` crate.
    fn byte_level_hf() -> Tokenizer {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("tokenizer.json"),
            byte_level_tokenizer_json(),
        )
        .unwrap();
        Tokenizer::from_dir(dir.path()).unwrap()
    }

    #[test]
    fn byte_level_json_round_trips_any_text() {
        let t = byte_level_hf();
        assert!(matches!(t, Tokenizer::Hf(_)));
        for s in ["12+34=46", "héllo, wörld ✓ \n\t", ""] {
            let ids = t.encode(s).unwrap();
            assert_eq!(ids, s.bytes().map(u32::from).collect::<Vec<_>>(), "{s}");
            assert_eq!(t.decode(&ids).unwrap(), s);
        }
        let ids = t.encode("a<|eos|>").unwrap();
        assert_eq!(ids, vec![97, BYTE_EOS]);
        assert_eq!(t.token_id("<|bos|>"), Some(BYTE_BOS));
        assert_eq!(t.decode(&[104, 105, BYTE_EOS]).unwrap(), "hi");
    }

    #[test]
    fn a_syntax_error_inside_the_decoder_is_an_error_not_a_panic() {
        // the `tokenizers` crate panics on this when it parses the text itself
        let mut json = byte_level_tokenizer_json();
        let decoder = json.find("\"decoder\"").expect("a decoder section");
        let open = decoder + json[decoder..].find('{').expect("its object");
        json.insert(open + 1, '\u{1a}');
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tokenizer.json"), json).unwrap();
        let e = Tokenizer::from_dir(dir.path()).unwrap_err().to_string();
        assert!(e.contains("tokenizer.json: not valid JSON"), "{e}");
        assert!(e.contains("line 1"), "names where: {e}");
    }

    #[test]
    fn a_prompt_gets_one_bos_whether_or_not_its_text_writes_it() {
        let t = byte_level_hf();
        let bos = Some(BYTE_BOS);
        assert_eq!(
            t.encode_prompt("hi", bos).unwrap(),
            vec![BYTE_BOS, 104, 105]
        );
        // a chat template that renders `{{ bos_token }}` first: no second BOS
        assert_eq!(
            t.encode_prompt("<|bos|>hi", bos).unwrap(),
            vec![BYTE_BOS, 104, 105]
        );
        // BOS later in the text is the text's; the rule only looks at the start
        assert_eq!(
            t.encode_prompt("h<|bos|>", bos).unwrap(),
            vec![BYTE_BOS, 104, BYTE_BOS]
        );
        assert_eq!(t.encode_prompt("hi", None).unwrap(), vec![104, 105]);
        assert_eq!(t.encode_prompt("", bos).unwrap(), vec![BYTE_BOS]);
    }
}

#[cfg(test)]
mod byte_level_tests {
    use super::*;

    #[test]
    fn byte_level_alphabet_inverts_gpt2s() {
        let m = byte_level_inverse();
        assert_eq!(m.len(), 256);
        assert_eq!(m[&'Ġ'], b' ', "GPT-2 writes a space as Ġ");
        assert_eq!(m[&'Ċ'], b'\n');
        assert_eq!(m[&'Ā'], 0);
        assert_eq!(m[&'!'], b'!');
        assert_eq!(m[&'ÿ'], 0xFF);
    }

    #[test]
    fn byte_tokenizer_bytes() {
        let t = Tokenizer::Bytes;
        assert_eq!(t.token_bytes(0xC3), vec![0xC3]);
        assert_eq!(t.token_bytes(256), BYTE_SPECIALS[0].as_bytes());
        assert!(t.token_bytes(100_000).is_empty());
    }
}
