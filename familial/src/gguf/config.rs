//! GGUF metadata → an HF-style `config.json` value, normalised by
//! [`ModelConfig::from_json`](crate::ModelConfig::from_json) like any HF checkpoint.
//!
//! Keys read (for `general.architecture = A`, `A` ∈ {`llama`, `qwen2`}):
//! `A.block_count`, `A.embedding_length`, `A.feed_forward_length`,
//! `A.attention.head_count`, `A.attention.head_count_kv`, `A.attention.key_length`,
//! `A.attention.layer_norm_rms_epsilon`, `A.rope.freq_base`, `A.rope.dimension_count`,
//! `A.rope.scaling.type`, `A.context_length`, `A.vocab_size` (else the tokenizer's token
//! count, else the embedding's rows), `tokenizer.ggml.{bos,eos,eot}_token_id`.
//!
//! llama.cpp's converter permutes the rows of `attn_q`/`attn_k` of `llama` models so that
//! RoPE rotates adjacent pairs (GPT-J style); such models are marked
//! `aiflow_rope_interleaved` and rotated that way here. `qwen2` keeps HF's rotate-half.

use serde_json::{json, Map, Value};

use super::GgufFile;
use crate::error::{Error, Result};

fn missing(f: &GgufFile, key: &str) -> Error {
    Error::Gguf {
        path: f.path().to_path_buf(),
        msg: format!("metadata key `{key}` is missing or not an integer"),
    }
}

/// The HF-style configuration of `f` (see the module docs for the keys read).
pub fn config_json(f: &GgufFile) -> Result<Value> {
    let arch = f.architecture()?.to_string();
    let path = f.path().to_path_buf();
    let interleaved = match arch.as_str() {
        "llama" => true,
        "qwen2" => false,
        other => {
            return Err(Error::Gguf {
                path,
                msg: format!(
                    "general.architecture `{other}` is not supported: supported are llama, qwen2"
                ),
            })
        }
    };
    let key = |k: &str| format!("{arch}.{k}");
    let need = |k: &str| -> Result<u64> { f.meta_u64(&key(k)).ok_or_else(|| missing(f, &key(k))) };
    let layers = need("block_count")?;
    let hidden = need("embedding_length")?;
    let inter = need("feed_forward_length")?;
    let heads = need("attention.head_count")?;
    let kv_heads = f.meta_u64(&key("attention.head_count_kv")).unwrap_or(heads);
    let eps = f
        .meta_f64(&key("attention.layer_norm_rms_epsilon"))
        .ok_or_else(|| missing(f, &key("attention.layer_norm_rms_epsilon")))?;
    let vocab = f
        .meta_u64(&key("vocab_size"))
        .or_else(|| match f.metadata().get("tokenizer.ggml.tokens") {
            Some(candle_core::quantized::gguf_file::Value::Array(a)) => Some(a.len() as u64),
            _ => None,
        })
        .or_else(|| {
            f.tensors()
                .get("token_embd.weight")
                .and_then(|e| e.dims.first())
                .map(|&d| d as u64)
        })
        .ok_or_else(|| missing(f, &key("vocab_size")))?;
    let mut v = Map::new();
    v.insert("model_type".into(), json!(arch));
    v.insert("num_hidden_layers".into(), json!(layers));
    v.insert("hidden_size".into(), json!(hidden));
    v.insert("intermediate_size".into(), json!(inter));
    v.insert("num_attention_heads".into(), json!(heads));
    v.insert("num_key_value_heads".into(), json!(kv_heads));
    v.insert("rms_norm_eps".into(), json!(eps));
    v.insert("vocab_size".into(), json!(vocab));
    if let Some(hd) = f.meta_u64(&key("attention.key_length")) {
        v.insert("head_dim".into(), json!(hd));
    }
    let head_dim = f
        .meta_u64(&key("attention.key_length"))
        .unwrap_or(hidden.checked_div(heads).unwrap_or(0));
    if let Some(rot) = f.meta_u64(&key("rope.dimension_count")) {
        if rot != head_dim {
            return Err(Error::Gguf {
                path,
                msg: format!(
                    "{} = {rot} but head_dim is {head_dim}: partial rotary embeddings are not supported",
                    key("rope.dimension_count")
                ),
            });
        }
    }
    if let Some(kind) = f.meta_str(&key("rope.scaling.type")) {
        v.insert("rope_scaling".into(), json!({ "rope_type": kind }));
    }
    v.insert(
        "rope_theta".into(),
        json!(f.meta_f64(&key("rope.freq_base")).unwrap_or(10_000.0)),
    );
    if let Some(ctx) = f.meta_u64(&key("context_length")) {
        v.insert("max_position_embeddings".into(), json!(ctx));
    }
    v.insert(
        "tie_word_embeddings".into(),
        json!(!f.tensors().contains_key("output.weight")),
    );
    if arch == "llama" {
        v.insert(
            "attention_bias".into(),
            json!(f.tensors().contains_key("blk.0.attn_q.bias")),
        );
    }
    v.insert("aiflow_rope_interleaved".into(), json!(interleaved));
    if let Some(b) = f.meta_u64("tokenizer.ggml.bos_token_id") {
        v.insert("bos_token_id".into(), json!(b));
    }
    let mut eos: Vec<u64> = Vec::new();
    for k in ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"] {
        if let Some(id) = f.meta_u64(k) {
            if !eos.contains(&id) {
                eos.push(id);
            }
        }
    }
    v.insert("eos_token_id".into(), json!(eos));
    if let Some(e) = f.tensors().get("blk.0.attn_q.weight") {
        v.insert("torch_dtype".into(), json!(format!("gguf {:?}", e.dtype)));
    }
    Ok(Value::Object(v))
}
