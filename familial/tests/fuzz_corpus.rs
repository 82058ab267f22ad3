//! Replays every committed input of the cargo-fuzz targets (`fuzz/`, docs/fuzzing.md)
//! through the code the targets run (`fuzz_harness/mod.rs`), on stable and without a
//! fuzzer: the seeds and every crash the fuzzer found (`tests/fuzz_corpus/<target>/`), and
//! for `gguf_file` also the malformed GGUF corpus (`tests/fixtures/gguf/bad/`). None may
//! panic.
//!
//! Regenerate the generated seeds with
//! `cargo test -p flow-familial --test fuzz_corpus -- --ignored`.

mod fuzz_harness;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use flow_familial::gguf::GgufFile;

fn tests_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests")
}

fn corpus(target: &str) -> PathBuf {
    tests_dir().join("fuzz_corpus").join(target)
}

/// The files of `dir`, sorted, with their names.
fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .filter(|e| e.path().is_file())
        .map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            (name, std::fs::read(e.path()).unwrap())
        })
        .collect();
    v.sort();
    v
}

/// Run `f` on every input of `dirs`, naming the input that panicked.
fn replay(dirs: &[PathBuf], min: usize, f: impl Fn(&Path, &[u8])) {
    let mut n = 0;
    for dir in dirs {
        for (name, data) in files(dir) {
            let path = dir.join(&name);
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&path, &data)));
            assert!(r.is_ok(), "{} panicked", path.display());
            n += 1;
        }
    }
    assert!(
        n >= min,
        "expected at least {min} inputs in {dirs:?}, found {n}"
    );
}

#[test]
fn gguf_file_corpus() {
    let dirs = [corpus("gguf_file"), tests_dir().join("fixtures/gguf/bad")];
    replay(&dirs, 30, |path, data| {
        fuzz_harness::gguf_file(data);
        // The mapped file and the buffer are parsed by the same code.
        let mapped = GgufFile::open(path).map(|_| ()).map_err(|e| e.to_string());
        let buffer = GgufFile::from_bytes(data.to_vec()).map(|_| ());
        let buffer = buffer.map_err(|e| {
            e.to_string()
                .replace("<memory>", &path.display().to_string())
        });
        assert_eq!(mapped, buffer, "{}", path.display());
    });
}

#[test]
fn model_config_corpus() {
    replay(&[corpus("model_config")], 5, |_, data| {
        fuzz_harness::model_config(data)
    });
}

#[test]
fn safetensors_header_corpus() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = fuzz_harness::checkpoint_dir(tmp.path());
    replay(&[corpus("safetensors_header")], 2, |_, data| {
        fuzz_harness::safetensors_header(&dir, data)
    });
}

#[test]
fn hf_tokenizer_corpus() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = fuzz_harness::tokenizer_dir(tmp.path());
    replay(&[corpus("hf_tokenizer")], 8, |_, data| {
        fuzz_harness::hf_tokenizer(&dir, data)
    });
}

/// The hand-written tokenizer seeds that are meant to load do, with every model type the
/// `tokenizers` crate reads, so the fuzzer starts from inputs past the parser.
#[test]
fn valid_tokenizer_seeds_load() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = fuzz_harness::tokenizer_dir(tmp.path());
    for (name, data) in files(&corpus("hf_tokenizer")) {
        if !name.starts_with("valid-") {
            continue;
        }
        let end = data.iter().position(|&b| b == 0).unwrap_or(data.len());
        std::fs::write(dir.join("tokenizer.json"), &data[..end]).unwrap();
        let t = flow_familial::tokenizer::Tokenizer::from_dir(&dir)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let ids = t
            .encode("hello, world")
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(!ids.is_empty(), "{name}");
    }
}

/// The valid seeds load: the fixed config and the generated checkpoints fit together, and
/// the GGUF seeds carry what they are meant to exercise; bad alignments are named.
#[test]
fn valid_seeds_load() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = fuzz_harness::checkpoint_dir(tmp.path());
    for name in ["valid-tiny-f32.safetensors", "valid-tiny-mixed.safetensors"] {
        let data = std::fs::read(corpus("safetensors_header").join(name)).unwrap();
        std::fs::write(dir.join("model.safetensors"), data).unwrap();
        let src = flow_familial::ModelSource::open(&dir).unwrap();
        src.load().unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    let chat = corpus("gguf_file").join("valid-mini-llama-chat.gguf");
    let src = flow_familial::ModelSource::open(&chat).unwrap();
    src.load().unwrap();
    let tok = src.tokenizer().unwrap();
    assert_eq!(tok.encode("Hi!").unwrap(), vec![4, 6]);
    let rendered = src.chat().unwrap().expect("a chat template");
    let msgs = [flow_familial::chat::ChatMessage::new("user", "Hi")];
    assert!(rendered
        .render(&msgs, true)
        .unwrap()
        .ends_with("assistant\n"));
    let quant = corpus("gguf_file").join("valid-mini-llama-quant.gguf");
    let src = flow_familial::ModelSource::open(&quant).unwrap();
    src.load().unwrap();
    for (name, data) in files(&corpus("gguf_file")) {
        if name.starts_with("bad-alignment") {
            let e = GgufFile::from_bytes(data).unwrap_err().to_string();
            assert!(e.contains("general.alignment"), "{name}: {e}");
        }
    }
}

const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

fn s(x: &str) -> Value {
    Value::String(x.to_string())
}

/// Deterministic weight-like values in (-0.3, 0.3), so regenerated seeds do not change.
fn weights(shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|i| 0.3 * (i as f32 * 0.618).sin()).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// A 1-block llama like `fixtures/gguf/bad/ok_mini_llama.gguf` (vocab 8) with width `e`
/// and FFN `f`, its 2-D weights in `dtype(name)`, plus `extra` metadata.
fn mini_llama(
    e: usize,
    f: usize,
    dtype: impl Fn(&str) -> GgmlDType,
    extra: Vec<(&str, Value)>,
) -> Vec<u8> {
    let (v, heads, kv_heads) = (8usize, 2usize, 1usize);
    let kvd = kv_heads * e / heads;
    let mut md: Vec<(&str, Value)> = vec![
        ("general.architecture", s("llama")),
        ("llama.block_count", Value::U32(1)),
        ("llama.context_length", Value::U32(64)),
        ("llama.embedding_length", Value::U32(e as u32)),
        ("llama.feed_forward_length", Value::U32(f as u32)),
        ("llama.attention.head_count", Value::U32(heads as u32)),
        ("llama.attention.head_count_kv", Value::U32(kv_heads as u32)),
        ("llama.rope.freq_base", Value::F32(10000.0)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("llama.vocab_size", Value::U32(v as u32)),
    ];
    md.extend(extra);
    let shapes: [(&str, Vec<usize>); 12] = [
        ("token_embd.weight", vec![v, e]),
        ("blk.0.attn_norm.weight", vec![e]),
        ("blk.0.attn_q.weight", vec![e, e]),
        ("blk.0.attn_k.weight", vec![kvd, e]),
        ("blk.0.attn_v.weight", vec![kvd, e]),
        ("blk.0.attn_output.weight", vec![e, e]),
        ("blk.0.ffn_norm.weight", vec![e]),
        ("blk.0.ffn_gate.weight", vec![f, e]),
        ("blk.0.ffn_up.weight", vec![f, e]),
        ("blk.0.ffn_down.weight", vec![e, f]),
        ("output_norm.weight", vec![e]),
        ("output.weight", vec![v, e]),
    ];
    let tensors: Vec<(&str, QTensor)> = shapes
        .iter()
        .map(|(name, shape)| {
            let t = weights(shape);
            let (t, dt) = match shape.len() {
                1 => ((t + 1.0).unwrap(), GgmlDType::F32),
                _ => (t, dtype(name)),
            };
            (*name, QTensor::quantize(&t, dt).unwrap())
        })
        .collect();
    write_gguf(&md, &tensors)
}

fn write_gguf(md: &[(&str, Value)], tensors: &[(&str, QTensor)]) -> Vec<u8> {
    let md: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (*k, v)).collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (*k, t)).collect();
    let mut out = std::io::Cursor::new(Vec::new());
    gguf_file::write(&mut out, &md, &tensors).unwrap();
    out.into_inner()
}

/// One `[2, 256]` tensor of every type candle can quantize to, named `t.<type>`.
fn quant_types() -> Vec<u8> {
    use GgmlDType as G;
    let types = [
        G::F32,
        G::F16,
        G::BF16,
        G::Q4_0,
        G::Q4_1,
        G::Q5_0,
        G::Q5_1,
        G::Q8_0,
        G::Q2K,
        G::Q3K,
        G::Q4K,
        G::Q5K,
        G::Q6K,
    ];
    let names: Vec<String> = types
        .iter()
        .map(|t| format!("t.{t:?}").to_lowercase())
        .collect();
    let tensors: Vec<(&str, QTensor)> = types
        .iter()
        .zip(&names)
        .map(|(&dt, name)| {
            let t = (weights(&[2, 256]) * 3.0).unwrap();
            (name.as_str(), QTensor::quantize(&t, dt).unwrap())
        })
        .collect();
    write_gguf(&[("general.architecture", s("test"))], &tensors)
}

/// A safetensors checkpoint of the fixed config's model, tensors in `dtype(name)`.
fn tiny_checkpoint(dtype: impl Fn(&str) -> DType) -> Vec<u8> {
    let cfg = flow_familial::ModelConfig::from_json_str(fuzz_harness::SAFETENSORS_CONFIG).unwrap();
    let (v, h, i, kvd) = (cfg.vocab_size, cfg.hidden_size, 16, cfg.kv_dim());
    let mut shapes: Vec<(String, Vec<usize>)> = vec![
        ("model.embed_tokens.weight".into(), vec![v, h]),
        ("model.norm.weight".into(), vec![h]),
    ];
    for l in 0..cfg.num_layers {
        let p = format!("model.layers.{l}");
        shapes.extend([
            (format!("{p}.input_layernorm.weight"), vec![h]),
            (format!("{p}.post_attention_layernorm.weight"), vec![h]),
            (format!("{p}.self_attn.q_proj.weight"), vec![cfg.q_dim(), h]),
            (format!("{p}.self_attn.k_proj.weight"), vec![kvd, h]),
            (format!("{p}.self_attn.v_proj.weight"), vec![kvd, h]),
            (format!("{p}.self_attn.o_proj.weight"), vec![h, cfg.q_dim()]),
            (format!("{p}.mlp.gate_proj.weight"), vec![i, h]),
            (format!("{p}.mlp.up_proj.weight"), vec![i, h]),
            (format!("{p}.mlp.down_proj.weight"), vec![h, i]),
        ]);
    }
    let tensors: HashMap<String, Tensor> = shapes
        .into_iter()
        .map(|(n, shape)| {
            let t = weights(&shape).to_dtype(dtype(&n)).unwrap();
            (n, t)
        })
        .collect();
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("m.safetensors");
    candle_core::safetensors::save(&tensors, &p).unwrap();
    std::fs::read(p).unwrap()
}

/// Write the generated seeds.
#[test]
#[ignore = "regenerates the committed seeds"]
fn regenerate_seeds() {
    // 8 tokens: two control tokens, byte-level letters, one merge; ChatML.
    let tokens = ["<|im_start|>", "<|im_end|>", "H", "i", "Hi", "Ġ", "!", "1"];
    let chat = mini_llama(
        8,
        16,
        |_| GgmlDType::F32,
        vec![
            ("tokenizer.ggml.model", s("gpt2")),
            ("tokenizer.ggml.pre", s("smollm")),
            (
                "tokenizer.ggml.tokens",
                Value::Array(tokens.iter().map(|t| s(t)).collect()),
            ),
            (
                "tokenizer.ggml.token_type",
                Value::Array(
                    [3, 3, 1, 1, 1, 1, 1, 1]
                        .iter()
                        .map(|&t| Value::I32(t))
                        .collect(),
                ),
            ),
            ("tokenizer.ggml.merges", Value::Array(vec![s("H i")])),
            ("tokenizer.ggml.bos_token_id", Value::U32(0)),
            ("tokenizer.ggml.eos_token_id", Value::U32(1)),
            ("tokenizer.ggml.add_bos_token", Value::Bool(false)),
            ("tokenizer.chat_template", s(CHATML)),
        ],
    );
    let g = corpus("gguf_file");
    std::fs::write(g.join("valid-mini-llama-chat.gguf"), chat).unwrap();
    // Width 32 so every 2-D weight can be quantized to a 32-block type.
    // The same model stating the (default) alignment, as some writers do.
    let aligned = mini_llama(
        8,
        16,
        |_| GgmlDType::F32,
        vec![("general.alignment", Value::U32(32))],
    );
    std::fs::write(g.join("valid-mini-llama-aligned.gguf"), aligned).unwrap();
    // Alignments candle's reader would divide by zero with or silently replace by 32; the
    // zero follows an array nested deeper than the diagnostic walk once read.
    let mut nested = Value::Array(vec![]);
    for _ in 0..12 {
        nested = Value::Array(vec![nested]);
    }
    let bad = [
        (
            "bad-alignment-0-after-nested-array.gguf",
            nested,
            Value::U32(0),
        ),
        ("bad-alignment-u64.gguf", Value::U8(0), Value::U64(64)),
    ];
    for (file, before, alignment) in bad {
        let extra = vec![("test.before", before), ("general.alignment", alignment)];
        std::fs::write(g.join(file), mini_llama(8, 16, |_| GgmlDType::F32, extra)).unwrap();
    }
    let quant = mini_llama(
        32,
        32,
        |name| match name {
            "blk.0.attn_q.weight" => GgmlDType::Q4_0,
            "blk.0.attn_k.weight" => GgmlDType::Q4_1,
            "blk.0.attn_v.weight" => GgmlDType::Q5_0,
            "blk.0.attn_output.weight" => GgmlDType::Q5_1,
            "blk.0.ffn_up.weight" => GgmlDType::F16,
            "blk.0.ffn_down.weight" => GgmlDType::BF16,
            _ => GgmlDType::Q8_0,
        },
        vec![],
    );
    std::fs::write(g.join("valid-mini-llama-quant.gguf"), quant).unwrap();
    std::fs::write(g.join("valid-quant-types.gguf"), quant_types()).unwrap();
    let st = corpus("safetensors_header");
    std::fs::write(
        st.join("valid-tiny-f32.safetensors"),
        tiny_checkpoint(|_| DType::F32),
    )
    .unwrap();
    std::fs::write(
        st.join("valid-tiny-mixed.safetensors"),
        tiny_checkpoint(|n| {
            if n.contains("mlp") {
                DType::BF16
            } else if n.contains("attn") {
                DType::F16
            } else {
                DType::F32
            }
        }),
    )
    .unwrap();
}
