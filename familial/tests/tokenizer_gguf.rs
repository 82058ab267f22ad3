//! The GGUF tokenizer and chat template of SmolLM2-135M-Instruct against references made by
//! others: llama.cpp's token ids (llama-cpp-python) and transformers-style jinja2 renders,
//! written by `fixtures/tokenizer/make_tokenizer_fixtures.py`.
//!
//! The model file: `$AIFLOW_SMOLLM2_GGUF`, else `$AIFLOW_HOME/smollm2-135m-instruct/model.gguf`,
//! else `~/.cache/aiflow/models/smollm2-135m-instruct/model.gguf`. Absent: skipped, except
//! under `CI=true`, where it fails.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use flow_familial::chat::{ChatMessage, ChatTemplate};
use flow_familial::tokenizer::{gguf_specials, DecodeStream, Tokenizer};

fn gguf_path() -> PathBuf {
    if let Ok(p) = std::env::var("AIFLOW_SMOLLM2_GGUF") {
        return PathBuf::from(p);
    }
    let rel = "smollm2-135m-instruct/model.gguf";
    if let Ok(home) = std::env::var("AIFLOW_HOME") {
        return Path::new(&home).join(rel);
    }
    let home = std::env::var("HOME").unwrap_or_default();
    Path::new(&home).join(".cache/aiflow/models").join(rel)
}

/// The GGUF metadata, or `None` (after a skip line) when the model is not on this machine.
fn metadata() -> Option<HashMap<String, Value>> {
    let path = gguf_path();
    if !path.exists() {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!(
                "{} is missing: CI must pull the model first (or set AIFLOW_SMOLLM2_GGUF to it)",
                path.display()
            );
        }
        eprintln!("skip: {} not found", path.display());
        return None;
    }
    let mut f = std::fs::File::open(&path).unwrap();
    Some(Content::read(&mut f).unwrap().metadata)
}

fn fixture(name: &str) -> serde_json::Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tokenizer")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn ids_of(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Token texts of control tokens (type 3), which decode skips.
fn control_tokens(md: &HashMap<String, Value>) -> Vec<String> {
    let Value::Array(tokens) = &md["tokenizer.ggml.tokens"] else {
        panic!()
    };
    let Value::Array(types) = &md["tokenizer.ggml.token_type"] else {
        panic!()
    };
    tokens
        .iter()
        .zip(types)
        .filter(|(_, ty)| matches!(ty, Value::I32(3)))
        .map(|(t, _)| t.to_string().unwrap().clone())
        .collect()
}

#[test]
fn ids_match_llama_cpp_and_decode_round_trips() {
    let Some(md) = metadata() else { return };
    let tok = Tokenizer::from_gguf(&md).unwrap();
    let controls = control_tokens(&md);
    assert_eq!(controls.len(), 17);
    let fx = fixture("smollm2_ids.json");
    let cases = fx["cases"].as_array().unwrap();
    assert!(cases.len() >= 40);
    let mut bad = Vec::new();
    for c in cases {
        let text = c["text"].as_str().unwrap();
        let want = ids_of(&c["ids"]);
        let got = tok.encode(text).unwrap();
        if got != want {
            bad.push(format!(
                "{text:?}\n  llama.cpp {want:?}\n  ours      {got:?}"
            ));
        }
        let mut plain = text.to_string();
        for t in &controls {
            plain = plain.replace(t.as_str(), "");
        }
        assert_eq!(tok.decode(&want).unwrap(), plain, "decode of {text:?}");
    }
    assert!(
        bad.is_empty(),
        "{} mismatches:\n{}",
        bad.len(),
        bad.join("\n")
    );
}

#[test]
fn chat_template_renders_like_transformers() {
    let Some(md) = metadata() else { return };
    let tmpl = ChatTemplate::from_gguf(&md)
        .unwrap()
        .expect("SmolLM2 has a template");
    let tok = Tokenizer::from_gguf(&md).unwrap();
    let fx = fixture("smollm2_chat.json");
    let sp = gguf_specials(&md).unwrap();
    assert_eq!(sp.bos.unwrap().text, fx["bos_token"].as_str().unwrap());
    assert_eq!(
        sp.eos.as_ref().unwrap().text,
        fx["eos_token"].as_str().unwrap()
    );
    assert_eq!(sp.eos.unwrap().id, 2);
    assert!(!sp.add_bos);
    let chats = fx["chats"].as_array().unwrap();
    assert!(chats.len() >= 4);
    for c in chats {
        let msgs: Vec<ChatMessage> = serde_json::from_value(c["messages"].clone()).unwrap();
        let gen = c["add_generation_prompt"].as_bool().unwrap();
        let prompt = tmpl.render(&msgs, gen).unwrap();
        assert_eq!(prompt, c["prompt"].as_str().unwrap(), "{msgs:?}");
        assert_eq!(
            tok.encode(&prompt).unwrap(),
            ids_of(&c["ids"]),
            "{prompt:?}"
        );
    }
}

#[test]
fn streaming_decode_equals_decode_on_the_real_vocab() {
    let Some(md) = metadata() else { return };
    let tok = Tokenizer::from_gguf(&md).unwrap();
    let text = "<|im_start|>assistant\n中文 🙂👍🏽 café ½ — done<|im_end|>";
    let ids = tok.encode(text).unwrap();
    let mut stream = DecodeStream::new();
    let mut out = String::new();
    for &id in &ids {
        if let Some(s) = stream.step(&tok, id).unwrap() {
            assert!(!s.contains(char::REPLACEMENT_CHARACTER), "{s:?}");
            out.push_str(&s);
        }
    }
    out.extend(stream.finish(&tok).unwrap());
    assert_eq!(out, tok.decode(&ids).unwrap());
    assert_eq!(out, "assistant\n中文 🙂👍🏽 café ½ — done");
    // Every fixture string, token by token.
    for c in fixture("smollm2_ids.json")["cases"].as_array().unwrap() {
        let ids = ids_of(&c["ids"]);
        let mut out = String::new();
        for &id in &ids {
            out.extend(stream.step(&tok, id).unwrap());
        }
        out.extend(stream.finish(&tok).unwrap());
        assert_eq!(out, tok.decode(&ids).unwrap(), "{}", c["text"]);
    }
}
