//! [`GgufFile`]: a parsed, validated and memory-mapped GGUF file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};
use memmap2::Mmap;

use crate::error::{Error, Result};
use crate::quant::{QBytes, QMatrix};
use crate::weights::TensorSource;

/// Where one tensor lives in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorEntry {
    /// Storage type (F32, F16, Q8_0, Q4_1, Q4_K, …).
    pub dtype: GgmlDType,
    /// Dimensions, outermost first (a 2-D weight is `[rows, cols]` = GGUF `[ne1, ne0]`).
    pub dims: Vec<usize>,
    /// Absolute byte offset of the data in the file.
    pub start: usize,
    /// Byte length of the data.
    pub len: usize,
}

/// The bytes of a [`GgufFile`]: a read-only mapping of the file ([`GgufFile::open`]) or a
/// buffer ([`GgufFile::from_bytes`]); tensors are views into them.
pub type GgufBytes = Arc<dyn AsRef<[u8]> + Send + Sync>;

/// A GGUF file: metadata, tensor table and the bytes of the whole file (mapped).
pub struct GgufFile {
    path: PathBuf,
    metadata: HashMap<String, Value>,
    tensors: HashMap<String, TensorEntry>,
    map: GgufBytes,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("tensors", &self.tensors.len())
            .field("metadata", &self.metadata.len())
            .finish()
    }
}

fn err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Gguf {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

impl GgufFile {
    /// Map `path`, parse its header, check every tensor's type, size, alignment and extent
    /// against the file. Nothing is copied.
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the mapping is read-only and private to this process; like every
        // mmap-based loader (safetensors, llama.cpp) we rely on the file not being
        // truncated while mapped.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        Self::parse(path, Arc::new(map))
    }

    /// [`GgufFile::open`] on a file already in memory (a download, a test, a fuzzer's
    /// input); errors name the path `<memory>`. The buffer is kept (copied only if its
    /// start is not 8-byte aligned, which quantized views need).
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self> {
        Self::parse(Path::new("<memory>"), crate::quant::aligned(bytes))
    }

    fn parse(path: &Path, map: GgufBytes) -> Result<Self> {
        let bytes: &[u8] = (*map).as_ref();
        let file_len = bytes.len() as u64;
        let (n_tensors, n_kv) = read_preamble(bytes, path)?;
        let refuse = |what: String| match super::walk::diagnose(bytes) {
            Some(d) => err(path, d),
            None => err(path, what),
        };
        // candle's reader bounds every count and length by the file size, but divides by
        // `general.alignment` and reads it only from some integer types: it is checked
        // first. Any other panic in the reader is still turned into an error.
        let alignment = super::walk::alignment(bytes)
            .map_err(|m| err(path, m))?
            .unwrap_or(32);
        let content = std::panic::catch_unwind(|| Content::read(&mut std::io::Cursor::new(bytes)))
            .map_err(|_| refuse("malformed header (the reader panicked)".into()))?
            .map_err(|e| refuse(format!("not a readable GGUF file: {e}")))?;
        if content.metadata.len() as u64 != n_kv {
            return Err(refuse(format!(
                "the header declares {n_kv} metadata entries but only {} distinct keys were \
                     read: a key is duplicated",
                content.metadata.len()
            )));
        }
        if content.tensor_infos.len() as u64 != n_tensors {
            return Err(refuse(format!(
                "the header declares {n_tensors} tensors but only {} distinct names were \
                     read: a tensor name is duplicated",
                content.tensor_infos.len()
            )));
        }
        if content.tensor_data_offset > file_len {
            return Err(err(
                path,
                "tensor data starts past the end of the file (truncated?)",
            ));
        }
        let mut tensors = HashMap::with_capacity(content.tensor_infos.len());
        for (name, info) in &content.tensor_infos {
            let dims = info.shape.dims().to_vec();
            let bad = |m: String| err(path, format!("tensor `{name}`: {m}"));
            let elems = dims
                .iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d))
                .ok_or_else(|| bad(format!("dims {dims:?} overflow")))?;
            let bs = info.ggml_dtype.block_size();
            let ne0 = dims.last().copied().unwrap_or(1);
            if ne0 % bs != 0 {
                return Err(bad(format!(
                    "row length {ne0} is not a multiple of the {:?} block size {bs}",
                    info.ggml_dtype
                )));
            }
            let len = (elems / bs)
                .checked_mul(info.ggml_dtype.type_size())
                .ok_or_else(|| bad("byte size overflows".into()))?;
            if info.offset % alignment != 0 {
                return Err(bad(format!(
                    "data offset {} is not aligned to {alignment}",
                    info.offset
                )));
            }
            let start = content
                .tensor_data_offset
                .checked_add(info.offset)
                .ok_or_else(|| bad("offset overflows".into()))?;
            let end = start
                .checked_add(len as u64)
                .ok_or_else(|| bad("offset overflows".into()))?;
            if end > file_len {
                return Err(bad(format!(
                    "data [{start}, {end}) lies past the end of the file ({file_len} bytes; truncated?)"
                )));
            }
            tensors.insert(
                name.clone(),
                TensorEntry {
                    dtype: info.ggml_dtype,
                    dims,
                    start: start as usize,
                    len,
                },
            );
        }
        let mut spans: Vec<(&String, &TensorEntry)> = tensors.iter().collect();
        spans.sort_by_key(|(_, e)| e.start);
        for w in spans.windows(2) {
            let ((a, ea), (b, eb)) = (w[0], w[1]);
            if ea.start + ea.len > eb.start {
                return Err(err(
                    path,
                    format!("tensors `{a}` and `{b}` overlap in the file"),
                ));
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            metadata: content.metadata,
            tensors,
            map,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// All metadata key/values.
    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.metadata
    }

    /// The tensor table (GGUF names).
    pub fn tensors(&self) -> &HashMap<String, TensorEntry> {
        &self.tensors
    }

    /// The bytes of the whole file (shared with zero-copy views).
    pub fn mapping(&self) -> &GgufBytes {
        &self.map
    }

    /// The raw bytes of tensor `name` (GGUF name).
    pub fn tensor_bytes(&self, name: &str) -> Option<&[u8]> {
        let e = self.tensors.get(name)?;
        (*self.map).as_ref().get(e.start..e.start + e.len)
    }

    /// String metadata `key`, if present and a string.
    pub fn meta_str(&self, key: &str) -> Option<&str> {
        match self.metadata.get(key)? {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// Integer metadata `key` of any integer type, if present and non-negative.
    pub fn meta_u64(&self, key: &str) -> Option<u64> {
        meta_u64(self.metadata.get(key)?)
    }

    /// Float metadata `key` (f32, f64 or an integer).
    pub fn meta_f64(&self, key: &str) -> Option<f64> {
        match self.metadata.get(key)? {
            Value::F32(x) => Some(*x as f64),
            Value::F64(x) => Some(*x),
            v => meta_u64(v).map(|x| x as f64),
        }
    }

    /// Boolean metadata `key`.
    pub fn meta_bool(&self, key: &str) -> Option<bool> {
        match self.metadata.get(key)? {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> Result<&str> {
        self.meta_str("general.architecture")
            .ok_or_else(|| err(&self.path, "metadata key `general.architecture` is missing"))
    }

    /// The model configuration the metadata describes (see [`super::config_json`]).
    pub fn config(&self) -> Result<crate::ModelConfig> {
        let v = super::config_json(self)?;
        crate::ModelConfig::from_json(&v).map_err(|e| match e {
            Error::Config { msg, .. } => err(&self.path, msg),
            other => other,
        })
    }

    /// The tensor `gguf` (GGUF name) dequantized to f32, checked to have `shape`.
    pub fn dequantize(&self, gguf: &str, shape: &[usize]) -> Result<Tensor> {
        let e = self.entry(gguf, shape)?;
        let raw = self.tensor_bytes(gguf).ok_or_else(|| {
            err(
                &self.path,
                format!("tensor `{gguf}` lies outside the mapping"),
            )
        })?;
        // candle views the bytes in place as f32s or blocks, which needs them aligned (up
        // to 4 bytes); a file with `general.alignment` 1 or 2 may place a tensor anywhere,
        // so such a tensor is copied to aligned storage first.
        let copy;
        let raw = if raw.as_ptr() as usize % 8 == 0 {
            raw
        } else {
            copy = crate::quant::aligned(raw.to_vec());
            (*copy).as_ref()
        };
        let q = candle_core::quantized::ggml_file::qtensor_from_ggml(
            e.dtype,
            raw,
            e.dims.clone(),
            &Device::Cpu,
        )
        .map_err(|x| err(&self.path, format!("tensor `{gguf}`: {x}")))?;
        Ok(q.dequantize(&Device::Cpu)?)
    }

    /// The entry of `gguf`, checked to have `shape` (HF order, outermost first).
    pub fn entry(&self, gguf: &str, shape: &[usize]) -> Result<&TensorEntry> {
        let e = self.tensors.get(gguf).ok_or_else(|| Error::MissingTensor {
            name: gguf.to_string(),
            expected: shape.to_vec(),
        })?;
        if e.dims != shape {
            return Err(Error::ShapeMismatch {
                name: gguf.to_string(),
                got: e.dims.clone(),
                expected: shape.to_vec(),
            });
        }
        Ok(e)
    }
}

/// Magic and version (ours, for messages that say what is wrong), then the two counts.
fn read_preamble(head: &[u8], path: &Path) -> Result<(u64, u64)> {
    if head.len() < 8 || &head[..4] != b"GGUF" {
        return Err(err(
            path,
            "bad magic: not a GGUF file (expected the bytes `GGUF` at offset 0)",
        ));
    }
    let version = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
    if !(2..=3).contains(&version) {
        return Err(err(
            path,
            format!("GGUF version {version} is not supported (versions 2 and 3 are)"),
        ));
    }
    if head.len() < 24 {
        return Err(err(path, "truncated header (shorter than 24 bytes)"));
    }
    let u64_at = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&head[i..i + 8]);
        u64::from_le_bytes(b)
    };
    Ok((u64_at(8), u64_at(16)))
}

fn meta_u64(v: &Value) -> Option<u64> {
    match *v {
        Value::U8(x) => Some(x as u64),
        Value::U16(x) => Some(x as u64),
        Value::U32(x) => Some(x as u64),
        Value::U64(x) => Some(x),
        Value::I8(x) => u64::try_from(x).ok(),
        Value::I16(x) => u64::try_from(x).ok(),
        Value::I32(x) => u64::try_from(x).ok(),
        Value::I64(x) => u64::try_from(x).ok(),
        _ => None,
    }
}

impl TensorSource for GgufFile {
    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let g = super::gguf_name(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
            expected: shape.to_vec(),
        })?;
        self.dequantize(&g, shape).map_err(|e| match e {
            Error::MissingTensor { expected, .. } => Error::MissingTensor {
                name: format!("{name} (GGUF `{g}`)"),
                expected,
            },
            other => other,
        })
    }

    fn contains(&self, name: &str) -> bool {
        super::gguf_name(name).is_some_and(|g| self.tensors.contains_key(&g))
    }

    fn quantized(&self, name: &str, shape: &[usize]) -> Result<Option<QMatrix>> {
        let Some(e) = super::gguf_name(name).and_then(|g| self.tensors.get(&g)) else {
            return Ok(None); // `get` reports the missing tensor
        };
        if matches!(e.dtype, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16) || shape.len() != 2
        {
            return Ok(None);
        }
        if e.dims != shape {
            return Err(Error::ShapeMismatch {
                name: name.to_string(),
                got: e.dims.clone(),
                expected: shape.to_vec(),
            });
        }
        let bytes = QBytes::new(self.map.clone(), e.start, e.len)?;
        Ok(Some(QMatrix::new(e.dtype, shape[0], shape[1], bytes)?))
    }
}
