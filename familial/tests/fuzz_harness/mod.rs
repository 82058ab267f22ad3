//! What the cargo-fuzz targets (`fuzz/fuzz_targets/{gguf_file,model_config,
//! safetensors_header,hf_tokenizer}.rs`) do with one input, shared with `tests/fuzz_corpus.rs`, which
//! replays every committed input through the same code on stable. Errors are expected; a
//! panic (including a failed assertion below) is a bug.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use flow_familial::chat::ChatMessage;
use flow_familial::gguf::{hf_name, GgufFile};
use flow_familial::weights::TensorSource;
use flow_familial::{FamilialModel, Layout, ModelConfig, ModelSource, Part};

/// Tensors above this many elements are not converted to f32 (the harness's bound, not the
/// loader's: the bytes are in the input, but the f32 copy would be big).
const MAX_ELEMS: usize = 1 << 20;
/// Models whose RoPE table (positions × head_dim floats) is bigger are not loaded: the
/// table is sized by `max_position_embeddings`, which the loader bounds only to 2^24.
const MAX_ROPE: usize = 1 << 22;

/// The fixed `config.json` beside the fuzzed `model.safetensors`.
pub const SAFETENSORS_CONFIG: &str = include_str!("../fuzz_corpus/safetensors_config.json");

/// The GGUF loader and what a node does with a file it opened: the tensor table, every
/// tensor dequantized (dense and through the quantized view), fingerprints, the tokenizer
/// and chat template from the metadata, the configuration and, for a model small enough,
/// the load and a forward of a few tokens.
pub fn gguf_file(data: &[u8]) {
    let Ok(f) = GgufFile::from_bytes(data.to_vec()) else {
        return;
    };
    let _ = f.tensor_infos();
    let names: Vec<String> = f.tensors().keys().cloned().collect();
    for name in &names {
        let e = &f.tensors()[name];
        let _ = f.stored_bytes(name);
        // The element count was checked for overflow by the loader.
        if e.dims.iter().product::<usize>() > MAX_ELEMS {
            continue;
        }
        let _ = f.dequantize(name, &e.dims);
        if let Some(hf) = hf_name(name) {
            if let Ok(Some(q)) = f.quantized(&hf, &e.dims) {
                let _ = q.dequantize();
            }
        }
    }
    let _ = f.fingerprint(names.iter().map(String::as_str));
    let src = ModelSource::Gguf(Arc::new(f));
    use_tokenizer(&src);
    if let Ok(cfg) = src.config() {
        run_model(&src, cfg);
    }
}

/// `config.json` text → the configuration, then what a node derives from it: exits, the
/// tensors of the whole model and of its first exit, the `config.json` that `model init`
/// writes back (which must parse to the same configuration), every layer an exit.
pub fn model_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(mut cfg) = ModelConfig::from_json_str(text) else {
        return;
    };
    let points = cfg.exit_points();
    assert_eq!(points.last(), Some(&cfg.last_exit().point));
    let _ = (cfg.q_dim(), cfg.kv_dim());
    FamilialModel::tensor_names(&cfg, &Part::full(&cfg)).expect("names of the whole model");
    let first = Part {
        embed: true,
        trunk: 0..points[0],
        exits: vec![points[0]],
    };
    FamilialModel::tensor_names(&cfg, &first).expect("names of the first exit");
    let back = ModelConfig::from_json(&cfg.to_hf_json()).expect("to_hf_json parses again");
    assert_eq!(back, cfg, "to_hf_json round trip");
    if cfg.layout != Layout::RuyiQwen2 {
        let every: Vec<usize> = (0..cfg.num_layers).collect();
        cfg.declare_exits(&every).expect("every layer an exit");
    }
}

/// `NAME-PID` on tmpfs when there is one (else the temporary directory): where a fuzz target
/// process writes the files it opens. (The fuzz targets use it; the corpus replay does not.)
#[allow(dead_code)]
pub fn process_dir(name: &str) -> PathBuf {
    let shm = Path::new("/dev/shm");
    let base = if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    base.join(format!("{name}-{}", std::process::id()))
}

/// A checkpoint directory under `base` holding [`SAFETENSORS_CONFIG`] as `config.json`.
pub fn checkpoint_dir(base: &Path) -> PathBuf {
    let d = base.join("checkpoint");
    std::fs::create_dir_all(&d).expect("create the checkpoint directory");
    std::fs::write(d.join("config.json"), SAFETENSORS_CONFIG).expect("write config.json");
    d
}

/// `data` as the `model.safetensors` of `dir` (from [`checkpoint_dir`]), opened as
/// `--model DIR` is; then the tensor table, every tensor read and converted, a fingerprint,
/// the model loaded and run on a few tokens.
pub fn safetensors_header(dir: &Path, data: &[u8]) {
    std::fs::write(dir.join("model.safetensors"), data).expect("write model.safetensors");
    let Ok(src) = ModelSource::open(dir) else {
        return;
    };
    let infos = src.tensor_infos();
    for (name, (_, shape)) in &infos {
        let _ = src.stored_bytes(name);
        let elems = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .unwrap_or(usize::MAX);
        if elems <= MAX_ELEMS {
            let _ = src.tensors().get(name, shape);
        }
    }
    let _ = src.fingerprint(infos.keys().map(String::as_str));
    let cfg = src.config().expect("the fixed config.json is valid");
    run_model(&src, cfg);
}

/// The fixed weights beside the fuzzed tokenizer files (the `safetensors_header` seed that
/// fits [`SAFETENSORS_CONFIG`]).
pub const TOKENIZER_WEIGHTS: &[u8] =
    include_bytes!("../fuzz_corpus/safetensors_header/valid-tiny-f32.safetensors");

/// A checkpoint directory under `base` with the fixed `config.json` and
/// `model.safetensors`, for [`hf_tokenizer`].
pub fn tokenizer_dir(base: &Path) -> PathBuf {
    let d = checkpoint_dir(base);
    std::fs::write(d.join("model.safetensors"), TOKENIZER_WEIGHTS).expect("write the weights");
    d
}

/// `data` as an HF checkpoint's tokenizer files in `dir` (from [`tokenizer_dir`]):
/// `tokenizer.json`, then, after the first NUL byte when there is one,
/// `tokenizer_config.json`. The directory is opened as `--model DIR` is; then the tokenizer
/// (encode, decode), the chat template (compile, render) and the BOS rule, as the API uses
/// them.
pub fn hf_tokenizer(dir: &Path, data: &[u8]) {
    let (tokenizer, config) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], Some(&data[i + 1..])),
        None => (data, None),
    };
    std::fs::write(dir.join("tokenizer.json"), tokenizer).expect("write tokenizer.json");
    let config_path = dir.join("tokenizer_config.json");
    match config {
        Some(c) => std::fs::write(&config_path, c).expect("write tokenizer_config.json"),
        None => {
            let _ = std::fs::remove_file(&config_path);
        }
    }
    let src = ModelSource::open(dir).expect("the fixed checkpoint opens");
    use_tokenizer(&src);
}

/// What the API does with a model's tokenizer and chat template: encode and decode (ids
/// past the vocabulary included), compile and render the template, the BOS rule.
fn use_tokenizer(src: &ModelSource) {
    if let Ok(t) = src.tokenizer() {
        if let Ok(ids) = t.encode("Hello, world! 123 <|im_start|> héllo\n") {
            let _ = t.decode(&ids);
        }
        let _ = t.decode(&[0, 1, 2, 3, 1000, u32::MAX]);
    }
    if let Ok(Some(chat)) = src.chat() {
        let msgs = [
            ChatMessage::new("system", "Be brief."),
            ChatMessage::new("user", "Hi"),
        ];
        let _ = chat.render(&msgs, true);
    }
    let _ = src.add_bos_token();
}

/// Load the whole model of `src` and run its last exit on three tokens, unless its RoPE
/// table would be big.
fn run_model(src: &ModelSource, cfg: ModelConfig) {
    let full = Part::full(&cfg);
    let _ = FamilialModel::tensor_names(&cfg, &full);
    if cfg.max_position_embeddings.saturating_mul(cfg.head_dim) > MAX_ROPE || cfg.vocab_size == 0 {
        return;
    }
    let exit = cfg.last_exit().point;
    let ids: Vec<u32> = (0..3).map(|i| (i % cfg.vocab_size) as u32).collect();
    if let Ok(m) = src.load_part(cfg, full) {
        let _ = m.forward_exit(&ids, exit, &mut m.new_cache());
    }
}
