//! Checkpoint access: memory-mapped safetensors (single file or sharded with
//! `model.safetensors.index.json`), shape and dtype checks, fingerprints.
//!
//! Weights are read straight from the mapping; only the tensors a model part hosts are ever
//! touched, so a device that hosts the first layers of a 7B family pages in only those.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::layers::RowSlice;

/// Anything that hands out named tensors of a known shape.
pub trait TensorSource {
    /// The tensor `name`, checked to have `shape`, converted to the compute dtype (f32).
    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor>;
    /// Whether the source holds `name`.
    fn contains(&self, name: &str) -> bool;
    /// Trainable rows of the matrix `name` (sparse fine-tuning): a linear layer loaded from
    /// this source uses these rows in place of the ones `get` returns, through a sliced
    /// matmul whose backward pass computes the gradient of these rows only. `None` (the
    /// default): the matrix is exactly what `get` returns.
    fn row_slice(&self, _name: &str) -> Option<RowSlice> {
        None
    }
    /// The matrix `name` (`shape`) in its stored quantized form, read in place, when the
    /// source stores it quantized (GGUF); `None` (the default): use [`TensorSource::get`].
    fn quantized(&self, _name: &str, _shape: &[usize]) -> Result<Option<crate::quant::QMatrix>> {
        Ok(None)
    }
}

/// A memory-mapped HF checkpoint directory.
pub struct Checkpoint {
    dir: PathBuf,
    files: Vec<PathBuf>,
    st: MmapedSafetensors,
    device: Device,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("dir", &self.dir)
            .field("files", &self.files)
            .finish()
    }
}

/// The safetensors files of a checkpoint directory: the shards named by
/// `model.safetensors.index.json` if present, else `model.safetensors`.
pub fn checkpoint_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Checkpoint {
            path: index.clone(),
            msg: format!("not JSON: {e}"),
        })?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::Checkpoint {
                path: index.clone(),
                msg: "missing object `weight_map`".into(),
            })?;
        let mut files: Vec<PathBuf> = Vec::new();
        for (tensor, file) in map {
            let file = file.as_str().ok_or_else(|| Error::Checkpoint {
                path: index.clone(),
                msg: format!("weight_map entry for `{tensor}` is not a file name"),
            })?;
            if file.contains('/') || file.contains("..") {
                return Err(Error::Checkpoint {
                    path: index.clone(),
                    msg: format!("shard name `{file}` must be a plain file name"),
                });
            }
            let p = dir.join(file);
            if !files.contains(&p) {
                if !p.exists() {
                    return Err(Error::Checkpoint {
                        path: p,
                        msg: format!("shard named in the index for `{tensor}` does not exist"),
                    });
                }
                files.push(p);
            }
        }
        files.sort();
        return Ok(files);
    }
    let single = dir.join("model.safetensors");
    if !single.exists() {
        return Err(Error::Checkpoint {
            path: dir.to_path_buf(),
            msg: "neither model.safetensors nor model.safetensors.index.json found".into(),
        });
    }
    Ok(vec![single])
}

impl Checkpoint {
    /// Map every safetensors file of `dir`. Nothing is copied yet.
    pub fn open(dir: &Path) -> Result<Self> {
        let files = checkpoint_files(dir)?;
        // Open each file on its own first so a corrupt shard is named precisely.
        for f in &files {
            // SAFETY: the mapping is read-only; checkpoint files must not be modified while
            // a node runs (the same contract as every mmap-based loader).
            unsafe { MmapedSafetensors::new(f) }.map_err(|e| Error::Checkpoint {
                path: f.clone(),
                msg: format!("not a valid safetensors file (truncated or corrupt?): {e}"),
            })?;
        }
        // SAFETY: as above.
        let st = unsafe { MmapedSafetensors::multi(&files) }.map_err(|e| Error::Checkpoint {
            path: dir.to_path_buf(),
            msg: e.to_string(),
        })?;
        Ok(Self {
            dir: dir.to_path_buf(),
            files,
            st,
            device: Device::Cpu,
        })
    }

    /// The directory this checkpoint was opened from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The safetensors files, in order.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// Name → (dtype, shape) of every tensor, sorted by name.
    pub fn tensor_infos(&self) -> BTreeMap<String, (String, Vec<usize>)> {
        self.st
            .tensors()
            .into_iter()
            .map(|(n, v)| (n, (format!("{:?}", v.dtype()), v.shape().to_vec())))
            .collect()
    }

    /// Stored bytes of `name`.
    pub fn stored_bytes(&self, name: &str) -> Option<usize> {
        self.st.get(name).ok().map(|v| v.data().len())
    }

    /// SHA-256 over the names, dtypes, shapes and bytes of `names` (sorted), read from the
    /// mapping without copying. Two nodes that agree on this agree on those weights.
    pub fn fingerprint<'a>(&self, names: impl IntoIterator<Item = &'a str>) -> Result<[u8; 32]> {
        fingerprint_tensors(names, |n| {
            let v = self.st.get(n).ok()?;
            Some((format!("{:?}{:?}", v.dtype(), v.shape()), v.data()))
        })
    }
}

impl TensorSource for Checkpoint {
    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let view = self.st.get(name).map_err(|_| Error::MissingTensor {
            name: name.to_string(),
            expected: shape.to_vec(),
        })?;
        use safetensors::Dtype as D;
        match view.dtype() {
            D::F32 | D::F16 | D::BF16 => {}
            other => {
                return Err(Error::BadDtype {
                    name: name.to_string(),
                    got: format!("{other:?}"),
                })
            }
        }
        if view.shape() != shape {
            return Err(Error::ShapeMismatch {
                name: name.to_string(),
                got: view.shape().to_vec(),
                expected: shape.to_vec(),
            });
        }
        let t = self
            .st
            .load(name, &self.device)
            .map_err(|e| Error::Checkpoint {
                path: self.dir.clone(),
                msg: format!("loading `{name}`: {e}"),
            })?;
        Ok(if t.dtype() == DType::F32 {
            t
        } else {
            t.to_dtype(DType::F32)?
        })
    }

    fn contains(&self, name: &str) -> bool {
        self.st.get(name).is_ok()
    }
}

/// SHA-256 over the sorted, deduplicated `names`, each hashed as its length, the name, the
/// `(type and shape, bytes)` that `tensor` looks up for it. The one fingerprint rule of
/// every checkpoint format (safetensors here, GGUF in [`crate::gguf`]).
pub(crate) fn fingerprint_tensors<'a, 'b>(
    names: impl IntoIterator<Item = &'a str>,
    tensor: impl Fn(&str) -> Option<(String, &'b [u8])>,
) -> Result<[u8; 32]> {
    let mut names: Vec<&str> = names.into_iter().collect();
    names.sort_unstable();
    names.dedup();
    let mut h = Sha256::new();
    for n in names {
        let (kind, bytes) = tensor(n).ok_or_else(|| Error::MissingTensor {
            name: n.to_string(),
            expected: vec![],
        })?;
        h.update((n.len() as u64).to_le_bytes());
        h.update(n.as_bytes());
        h.update(kind.as_bytes());
        h.update(bytes);
    }
    Ok(h.finalize().into())
}

/// Tensors held in memory (training, tests, freshly initialised checkpoints).
#[derive(Debug, Default, Clone)]
pub struct MemorySource {
    pub tensors: HashMap<String, Tensor>,
    /// Row slices by matrix name (see [`TensorSource::row_slice`]).
    pub row_slices: HashMap<String, RowSlice>,
}

impl MemorySource {
    /// Wrap a map of tensors.
    pub fn new(tensors: HashMap<String, Tensor>) -> Self {
        Self {
            tensors,
            row_slices: HashMap::new(),
        }
    }

    /// Replace rows of matrix `name` with `slice` (see [`TensorSource::row_slice`]).
    pub fn with_row_slice(mut self, name: impl Into<String>, slice: RowSlice) -> Self {
        self.row_slices.insert(name.into(), slice);
        self
    }
}

impl TensorSource for MemorySource {
    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.tensors.get(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
            expected: shape.to_vec(),
        })?;
        if t.dims() != shape {
            return Err(Error::ShapeMismatch {
                name: name.to_string(),
                got: t.dims().to_vec(),
                expected: shape.to_vec(),
            });
        }
        Ok(if t.dtype() == DType::F32 {
            t.clone()
        } else {
            t.to_dtype(DType::F32)?
        })
    }

    fn row_slice(&self, name: &str) -> Option<RowSlice> {
        self.row_slices.get(name).cloned()
    }

    fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}

/// Write `tensors` as one safetensors file, converting to `dtype`.
pub fn save_safetensors(
    tensors: &HashMap<String, Tensor>,
    dtype: DType,
    path: &Path,
) -> Result<()> {
    let converted: Result<HashMap<String, Tensor>> = tensors
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.to_dtype(dtype)?)))
        .collect();
    let tmp = path.with_extension("safetensors.tmp");
    candle_core::safetensors::save(&converted?, &tmp).map_err(|e| Error::Checkpoint {
        path: tmp.clone(),
        msg: e.to_string(),
    })?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// Two sources as one: `top` first, then `base` (a family overlay over its base; trainable
/// exit tensors over a frozen trunk).
pub struct Stacked<'a> {
    pub top: &'a dyn TensorSource,
    pub base: &'a dyn TensorSource,
}

impl TensorSource for Stacked<'_> {
    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        if self.top.contains(name) {
            self.top.get(name, shape)
        } else {
            self.base.get(name, shape)
        }
    }

    fn contains(&self, name: &str) -> bool {
        self.top.contains(name) || self.base.contains(name)
    }

    fn row_slice(&self, name: &str) -> Option<RowSlice> {
        if self.top.contains(name) {
            self.top.row_slice(name)
        } else {
            self.base.row_slice(name)
        }
    }

    fn quantized(&self, name: &str, shape: &[usize]) -> Result<Option<crate::quant::QMatrix>> {
        if self.top.contains(name) {
            self.top.quantized(name, shape)
        } else {
            self.base.quantized(name, shape)
        }
    }
}
