//! [`ModelSource`]: what `--model` points at — an HF checkpoint directory or a GGUF file —
//! behind one interface: configuration, tokenizer, chat template, weights, fingerprints.
//!
//! Every loader in the workspace goes through this type, so a GGUF file can be split across
//! tiers, inspected, fingerprinted and served exactly like an HF directory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::family::{is_family_dir, Family};
use crate::gguf::GgufFile;
use crate::layers::Mode;
use crate::model::{FamilialModel, Part};
use crate::tokenizer::Tokenizer;
use crate::weights::{Checkpoint, TensorSource};

/// An opened model: an HF directory (`config.json` + safetensors) or a GGUF file.
#[derive(Debug, Clone)]
pub enum ModelSource {
    /// An HF checkpoint directory (mapped).
    Hf(Arc<Checkpoint>),
    /// A GGUF file (mapped).
    Gguf(Arc<GgufFile>),
    /// A family overlay over a verified base ([`crate::family`]).
    Family(Arc<Family>),
}

/// Whether `path` starts with the GGUF magic.
pub fn is_gguf(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && &magic == b"GGUF"
}

impl ModelSource {
    /// Open `path`: a directory with `family.json` is a family overlay (its base found and
    /// verified by [`Family::open`]), another directory an HF checkpoint, a file must be GGUF.
    pub fn open(path: &Path) -> Result<Self> {
        if is_family_dir(path) {
            return Ok(Self::Family(Arc::new(Family::open(path)?)));
        }
        if path.is_dir() {
            return Ok(Self::Hf(Arc::new(Checkpoint::open(path)?)));
        }
        if !path.exists() {
            return Err(Error::io(
                path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory"),
            ));
        }
        if !is_gguf(path) {
            return Err(Error::Gguf {
                path: path.to_path_buf(),
                msg: "not a GGUF file (no `GGUF` magic) and not an HF checkpoint directory".into(),
            });
        }
        Ok(Self::Gguf(Arc::new(GgufFile::open(path)?)))
    }

    /// The directory or file this source was opened from.
    pub fn path(&self) -> PathBuf {
        match self {
            Self::Hf(c) => c.dir().to_path_buf(),
            Self::Gguf(g) => g.path().to_path_buf(),
            Self::Family(f) => f.dir().to_path_buf(),
        }
    }

    /// The normalised configuration (`config.json`, or the GGUF metadata).
    pub fn config(&self) -> Result<ModelConfig> {
        match self {
            Self::Hf(c) => ModelConfig::from_file(&c.dir().join("config.json")),
            Self::Gguf(g) => g.config(),
            Self::Family(f) => Ok(f.config().clone()),
        }
    }

    /// The tensors, under HF names.
    pub fn tensors(&self) -> &dyn TensorSource {
        match self {
            Self::Hf(c) => c.as_ref(),
            Self::Gguf(g) => g.as_ref(),
            Self::Family(f) => f.as_ref(),
        }
    }

    /// Load `part` of the family with `cfg` (e.g. after declaring exits).
    pub fn load_part(&self, cfg: ModelConfig, part: Part) -> Result<FamilialModel> {
        FamilialModel::from_source(cfg, part, self.tensors(), Mode::Infer)
    }

    /// Load the whole model with its own configuration.
    pub fn load(&self) -> Result<FamilialModel> {
        let cfg = self.config()?;
        let part = Part::full(&cfg);
        self.load_part(cfg, part)
    }

    /// Name → (dtype, shape) of every tensor (HF names where the format has them).
    pub fn tensor_infos(&self) -> BTreeMap<String, (String, Vec<usize>)> {
        match self {
            Self::Hf(c) => c.tensor_infos(),
            Self::Gguf(g) => g.tensor_infos(),
            Self::Family(f) => f.tensor_infos(),
        }
    }

    /// Stored bytes of tensor `name` (HF name).
    pub fn stored_bytes(&self, name: &str) -> Option<usize> {
        match self {
            Self::Hf(c) => c.stored_bytes(name),
            Self::Gguf(g) => g.stored_bytes(name),
            Self::Family(f) => f.stored_bytes(name),
        }
    }

    /// SHA-256 over the names, dtypes, shapes and bytes of `names`.
    pub fn fingerprint<'a>(&self, names: impl IntoIterator<Item = &'a str>) -> Result<[u8; 32]> {
        match self {
            Self::Hf(c) => c.fingerprint(names),
            Self::Gguf(g) => g.fingerprint(names),
            Self::Family(f) => f.fingerprint(names),
        }
    }

    /// The chat template: `tokenizer.chat_template` (GGUF) or `chat_template` of
    /// `tokenizer_config.json` (HF); `None` when the model has none.
    pub fn chat_template(&self) -> Option<String> {
        match self {
            Self::Gguf(g) => g.meta_str("tokenizer.chat_template").map(str::to_string),
            Self::Family(f) => f.base().chat_template(),
            Self::Hf(c) => {
                let text = std::fs::read_to_string(c.dir().join("tokenizer_config.json")).ok()?;
                let v: serde_json::Value = serde_json::from_str(&text).ok()?;
                v.get("chat_template")?.as_str().map(str::to_string)
            }
        }
    }

    /// The model's chat template, ready to render: GGUF `tokenizer.chat_template` with the
    /// file's BOS/EOS texts, or HF `tokenizer_config.json`'s `chat_template` with its
    /// `bos_token`/`eos_token`; `None` when the model has no template.
    pub fn chat(&self) -> Result<Option<crate::chat::ChatTemplate>> {
        match self {
            Self::Gguf(g) => crate::chat::ChatTemplate::from_gguf(g.metadata()),
            Self::Family(f) => f.base().chat(),
            Self::Hf(c) => {
                let Some(t) = self.chat_template() else {
                    return Ok(None);
                };
                let text = std::fs::read_to_string(c.dir().join("tokenizer_config.json"))
                    .map_err(|e| Error::io(c.dir().join("tokenizer_config.json"), e))?;
                let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
                let token = |k: &str| match v.get(k) {
                    Some(serde_json::Value::String(s)) => s.clone(),
                    Some(o) => o
                        .get("content")
                        .and_then(serde_json::Value::as_str)
                        .unwrap_or_default()
                        .to_string(),
                    None => String::new(),
                };
                crate::chat::ChatTemplate::new(&t, &token("bos_token"), &token("eos_token"))
                    .map(Some)
            }
        }
    }

    /// The tokenizer: `tokenizer.json` (HF dir; bytes when absent) or the GGUF metadata
    /// (bytes when the file carries no `tokenizer.ggml.model`).
    pub fn tokenizer(&self) -> Result<Tokenizer> {
        match self {
            Self::Hf(c) => Tokenizer::from_dir(c.dir()),
            Self::Gguf(g) => match g.meta_str("tokenizer.ggml.model") {
                None | Some("none") => Ok(Tokenizer::Bytes),
                Some(_) => Tokenizer::from_gguf(g.metadata()),
            },
            Self::Family(f) => f.base().tokenizer(),
        }
    }

    /// Whether prompts start with the BOS token (when the model has one): GGUF
    /// `tokenizer.ggml.add_bos_token` (llama.cpp's default when absent: no), HF
    /// `add_bos_token` of `tokenizer_config.json` (default: yes, as for every family
    /// `flow-node model init` writes). One rule for the CLI, the API and benchmarks.
    pub fn add_bos_token(&self) -> bool {
        match self {
            Self::Gguf(g) => g.meta_bool("tokenizer.ggml.add_bos_token").unwrap_or(false),
            Self::Family(f) => f.base().add_bos_token(),
            Self::Hf(c) => std::fs::read_to_string(c.dir().join("tokenizer_config.json"))
                .ok()
                .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                .and_then(|v| v.get("add_bos_token")?.as_bool())
                .unwrap_or(true),
        }
    }
}

/// A source is its tensors (so a trainer can hold a base as `Arc<dyn TensorSource>` and
/// read it in place: quantized GGUF matrices stay quantized).
impl TensorSource for ModelSource {
    fn get(&self, name: &str, shape: &[usize]) -> Result<candle_core::Tensor> {
        self.tensors().get(name, shape)
    }

    fn contains(&self, name: &str) -> bool {
        self.tensors().contains(name)
    }

    fn row_slice(&self, name: &str) -> Option<crate::layers::RowSlice> {
        self.tensors().row_slice(name)
    }

    fn quantized(&self, name: &str, shape: &[usize]) -> Result<Option<crate::quant::QMatrix>> {
        self.tensors().quantized(name, shape)
    }
}

/// The configuration of the model at `path` (an HF directory's `config.json`, or a GGUF
/// file's metadata) without mapping its weights.
pub fn model_config(path: &Path) -> Result<ModelConfig> {
    if path.is_dir() && !is_family_dir(path) {
        ModelConfig::from_file(&path.join("config.json"))
    } else {
        ModelSource::open(path)?.config()
    }
}
