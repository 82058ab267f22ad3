//! [`Tokenizer::from_gguf`], [`gguf_specials`] and [`DecodeStream`] on a tiny in-memory
//! GGUF vocabulary: every byte, three control tokens, one user-defined token, four merges.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;

use super::{bytes_to_unicode, gguf_specials, DecodeStream, Tokenizer};
use crate::error::Error;

const SPECIALS: [(&str, i32); 4] = [
    ("<|endoftext|>", 3),
    ("<|im_start|>", 3),
    ("<|im_end|>", 3),
    ("<tool>", 4),
];
const MERGED: [&str; 4] = ["hi", "Ġw", "Ġwo", "12"];
const MERGES: [&str; 4] = ["h i", "Ġ w", "Ġw o", "1 2"];

fn s(x: &str) -> Value {
    Value::String(x.to_string())
}

fn vocab() -> Vec<String> {
    let bytes = bytes_to_unicode();
    SPECIALS
        .iter()
        .map(|(t, _)| t.to_string())
        .chain(bytes.iter().map(|c| c.to_string()))
        .chain(MERGED.iter().map(|t| t.to_string()))
        .collect()
}

fn md(pre: &str) -> HashMap<String, Value> {
    let tokens = vocab();
    let types = (0..tokens.len())
        .map(|i| Value::I32(SPECIALS.get(i).map_or(1, |(_, ty)| *ty)))
        .collect();
    HashMap::from([
        ("tokenizer.ggml.model".into(), s("gpt2")),
        ("tokenizer.ggml.pre".into(), s(pre)),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(tokens.iter().map(|t| s(t)).collect()),
        ),
        ("tokenizer.ggml.token_type".into(), Value::Array(types)),
        (
            "tokenizer.ggml.merges".into(),
            Value::Array(MERGES.iter().map(|m| s(m)).collect()),
        ),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(2)),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(false)),
    ])
}

fn id(t: &Tokenizer, tok: &str) -> u32 {
    t.token_id(tok).unwrap()
}

fn err_key(m: &HashMap<String, Value>) -> String {
    match Tokenizer::from_gguf(m) {
        Err(Error::GgufMetadata { key, .. }) => key,
        other => panic!("expected a GgufMetadata error, got {other:?}"),
    }
}

#[test]
fn missing_or_ill_typed_keys_name_the_key() {
    for key in [
        "tokenizer.ggml.model",
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.merges",
    ] {
        let mut m = md("smollm");
        m.remove(key);
        assert_eq!(err_key(&m), key);
        m.insert(key.into(), Value::U32(7));
        assert_eq!(err_key(&m), key);
    }
    let mut m = md("smollm");
    m.insert("tokenizer.ggml.pre".into(), Value::Bool(true));
    assert_eq!(err_key(&m), "tokenizer.ggml.pre");
    m.insert("tokenizer.ggml.pre".into(), s("no-such-pre"));
    assert_eq!(err_key(&m), "tokenizer.ggml.pre");
    let mut m = md("smollm");
    m.insert("tokenizer.ggml.model".into(), s("llama"));
    assert_eq!(err_key(&m), "tokenizer.ggml.model");
    let mut m = md("smollm");
    m.insert(
        "tokenizer.ggml.merges".into(),
        Value::Array(vec![s("nospace")]),
    );
    assert_eq!(err_key(&m), "tokenizer.ggml.merges");
    let mut m = md("smollm");
    m.insert(
        "tokenizer.ggml.token_type".into(),
        Value::Array(vec![Value::I32(1)]),
    );
    assert_eq!(err_key(&m), "tokenizer.ggml.token_type");
    let mut m = md("smollm");
    m.insert("tokenizer.ggml.eos_token_id".into(), Value::I32(-1));
    assert!(
        matches!(gguf_specials(&m), Err(Error::GgufMetadata { key, .. }) if key == "tokenizer.ggml.eos_token_id")
    );
    m.insert("tokenizer.ggml.eos_token_id".into(), Value::U64(1 << 20));
    assert!(
        matches!(gguf_specials(&m), Err(Error::GgufMetadata { key, .. }) if key == "tokenizer.ggml.eos_token_id")
    );
}

#[test]
fn specials_are_read() {
    let sp = gguf_specials(&md("smollm")).unwrap();
    assert_eq!(sp.bos.unwrap().text, "<|im_start|>");
    assert_eq!(sp.eos.unwrap().id, 2);
    assert!(sp.pad.is_none() && sp.unk.is_none() && !sp.add_bos && !sp.add_eos);
}

#[test]
fn control_and_user_tokens_match_whole() {
    let t = Tokenizer::from_gguf(&md("smollm")).unwrap();
    let hi = id(&t, "hi");
    assert_eq!(
        t.encode("<|im_start|>hi<|im_end|>").unwrap(),
        vec![1, hi, 2]
    );
    assert_eq!(t.encode("hi<tool>hi").unwrap(), vec![hi, 3, hi]);
    // Not a special token: plain bytes.
    assert_eq!(t.encode("<|im_start |>").unwrap().len(), 13);
    // Decode skips control tokens, keeps user-defined ones as text.
    assert_eq!(t.decode(&[1, hi, 3, 2, 0]).unwrap(), "hi<tool>");
    assert_eq!(t.encode(" wo").unwrap(), vec![id(&t, "Ġwo")]);
}

#[test]
fn digits_split_per_pre_tokenizer() {
    let ones = |pre: &str, text: &str| {
        let t = Tokenizer::from_gguf(&md(pre)).unwrap();
        let ids = t.encode(text).unwrap();
        assert_eq!(t.decode(&ids).unwrap(), text, "{pre}");
        (ids, id(&t, "1"), id(&t, "2"), id(&t, "12"))
    };
    // smollm and qwen2 isolate every digit, so the `1 2` merge never applies.
    for pre in ["smollm", "qwen2"] {
        let (ids, one, two, _) = ones(pre, "12");
        assert_eq!(ids, vec![one, two], "{pre}");
    }
    // gpt2 keeps digit runs, llama-bpe groups of three: the merge applies.
    for pre in ["gpt2", "llama-bpe", "default"] {
        let (ids, _, _, twelve) = ones(pre, "12");
        assert_eq!(ids, vec![twelve], "{pre}");
    }
    // Inside text too: one token per byte under smollm, `12` merged once under gpt2.
    let text = "a 3.14, 2026-12-06\n\n  x";
    assert_eq!(ones("smollm", text).0.len(), text.len());
    assert_eq!(ones("gpt2", text).0.len(), text.len() - 1);
}

#[test]
fn stream_holds_split_characters_back() {
    let t = Tokenizer::from_gguf(&md("smollm")).unwrap();
    let text = "中文 🙂é<|im_end|>👍🏽!";
    let ids = t.encode(text).unwrap();
    // Byte tokens only: every multi-byte character is split across tokens.
    assert_eq!(ids.len(), text.len() - "<|im_end|>".len() + 1);
    let mut st = DecodeStream::new();
    let mut chunks = Vec::new();
    for &i in &ids {
        if let Some(c) = st.step(&t, i).unwrap() {
            assert!(!c.contains(char::REPLACEMENT_CHARACTER), "{c:?}");
            chunks.push(c);
        }
    }
    assert_eq!(st.finish(&t).unwrap(), None);
    assert_eq!(chunks, ["中", "文", " ", "🙂", "é", "👍", "🏽", "!"]);
    assert_eq!(chunks.concat(), t.decode(&ids).unwrap());

    // An incomplete character at the end comes out of finish(), as decode writes it.
    let cut = &ids[..ids.len() - 2];
    let mut st = DecodeStream::new();
    let mut out = String::new();
    for &i in cut {
        out.extend(st.step(&t, i).unwrap());
    }
    assert!(!out.ends_with(char::REPLACEMENT_CHARACTER));
    out.extend(st.finish(&t).unwrap());
    assert_eq!(out, t.decode(cut).unwrap());
    assert!(out.ends_with(char::REPLACEMENT_CHARACTER));
}

#[test]
fn chat_template_comes_from_gguf_or_is_none() {
    use crate::chat::ChatTemplate;
    let key = "tokenizer.chat_template";
    let mut m = md("smollm");
    assert!(ChatTemplate::from_gguf(&m).unwrap().is_none());
    m.insert(key.into(), s("{{ bos_token }}|{{ eos_token }}"));
    let t = ChatTemplate::from_gguf(&m).unwrap().unwrap();
    assert_eq!(t.render(&[], true).unwrap(), "<|im_start|>|<|im_end|>");
    m.insert(key.into(), Value::U32(1));
    assert!(
        matches!(ChatTemplate::from_gguf(&m), Err(Error::GgufMetadata { key: k, .. }) if k == key)
    );
}
