//! Delta checkpoints: only the tensors a fine-tuning run changed, for one base.
//!
//! A [`Delta`] is one safetensors file whose metadata carries the format
//! (`aiflow-delta/1`), the SHA-256 fingerprint of the base checkpoint it applies to
//! ([`base_fingerprint`]), a version (strictly increasing per base), and the scheme that
//! produced it. Tensors are whole tensors (a row-sliced matrix is stored whole), in the
//! base's dtype. [`Delta::apply`] refuses a delta for another base or with a tensor the
//! base lacks or shapes differently.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use flow_familial::weights::{Checkpoint, MemorySource, TensorSource};

use crate::error::{Error, Result};

/// Format tag in the metadata.
pub const FORMAT: &str = "aiflow-delta/1";
/// Largest delta file accepted (bytes).
pub const MAX_DELTA_BYTES: usize = 1 << 30;

/// Changed tensors plus the identity of the base they apply to.
#[derive(Debug, Clone)]
pub struct Delta {
    /// Fingerprint of the base checkpoint (every tensor, see [`base_fingerprint`]).
    pub base_fingerprint: [u8; 32],
    /// Version of this delta for that base (the base itself is version 0).
    pub version: u64,
    /// Scheme that produced it (informational).
    pub scheme: String,
    /// The new values of the changed tensors.
    pub tensors: BTreeMap<String, Tensor>,
}

/// The fingerprint of a pretrained base file (GGUF): its SHA-256, the digest family
/// overlays name their base by ([`flow_familial::family::base_digest`]).
pub fn file_fingerprint(path: &Path) -> Result<[u8; 32]> {
    let (hex_sha, _) = flow_familial::family::base_digest(path)?;
    hex::decode(&hex_sha)
        .ok()
        .and_then(|v| <[u8; 32]>::try_from(v).ok())
        .ok_or_else(|| Error::file(path, "its SHA-256 is not 32 bytes"))
}

/// The fingerprint deltas name: SHA-256 over every tensor of the checkpoint in `ck`.
pub fn base_fingerprint(ck: &Checkpoint) -> Result<[u8; 32]> {
    let infos = ck.tensor_infos();
    Ok(ck.fingerprint(infos.keys().map(String::as_str))?)
}

fn same_bits(a: &Tensor, b: &Tensor) -> Result<bool> {
    if a.dims() != b.dims() {
        return Ok(false);
    }
    let a: Vec<f32> = a.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let b: Vec<f32> = b.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    Ok(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()))
}

impl Delta {
    /// The tensors of `updated` whose value, stored in `dtype`, differs from `base`'s.
    pub fn diff(
        base: &HashMap<String, Tensor>,
        updated: &HashMap<String, Tensor>,
        dtype: DType,
        base_fingerprint: [u8; 32],
        version: u64,
        scheme: &str,
    ) -> Result<Self> {
        if version == 0 {
            return Err(Error::invalid(
                "delta version",
                "0 is the base itself; use >= 1",
            ));
        }
        let mut tensors = BTreeMap::new();
        for (n, t) in updated {
            let b = base
                .get(n)
                .ok_or_else(|| Error::invalid("delta", format!("`{n}` is not in the base")))?;
            let t = t.to_dtype(dtype)?;
            if !same_bits(&t, &b.to_dtype(dtype)?)? {
                tensors.insert(n.clone(), t);
            }
        }
        Ok(Self {
            base_fingerprint,
            version,
            scheme: scheme.to_string(),
            tensors,
        })
    }

    /// Bytes of tensor data.
    pub fn payload_bytes(&self) -> usize {
        self.tensors
            .values()
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum()
    }

    /// The safetensors bytes (with the metadata).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let meta = HashMap::from([
            ("format".to_string(), FORMAT.to_string()),
            (
                "base_fingerprint".to_string(),
                hex::encode(self.base_fingerprint),
            ),
            ("version".to_string(), self.version.to_string()),
            ("scheme".to_string(), self.scheme.clone()),
        ]);
        safetensors::serialize(self.tensors.iter(), Some(meta))
            .map_err(|e| Error::invalid("delta", format!("serialising: {e}")))
    }

    /// Parse and validate safetensors bytes written by [`Delta::to_bytes`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let bad = |m: String| Error::invalid("delta", m);
        if bytes.len() > MAX_DELTA_BYTES {
            return Err(bad(format!(
                "{} bytes exceed the {MAX_DELTA_BYTES}-byte limit",
                bytes.len()
            )));
        }
        let (_, md) = safetensors::SafeTensors::read_metadata(bytes)
            .map_err(|e| bad(format!("not a safetensors file: {e}")))?;
        let meta = md
            .metadata()
            .clone()
            .ok_or_else(|| bad("no metadata (not an aiflow delta)".into()))?;
        let field = |k: &str| {
            meta.get(k)
                .ok_or_else(|| bad(format!("metadata field `{k}` is missing")))
        };
        if field("format")? != FORMAT {
            return Err(bad(format!(
                "format `{}` (expected `{FORMAT}`)",
                field("format")?
            )));
        }
        let fp = hex::decode(field("base_fingerprint")?)
            .ok()
            .and_then(|v| <[u8; 32]>::try_from(v).ok())
            .ok_or_else(|| bad("`base_fingerprint` is not 64 hex digits".into()))?;
        let version: u64 = field("version")?
            .parse()
            .map_err(|_| bad("`version` is not an integer".into()))?;
        if version == 0 {
            return Err(bad("`version` 0 is reserved for the base".into()));
        }
        let tensors = candle_core::safetensors::load_buffer(bytes, &Device::Cpu)?
            .into_iter()
            .collect();
        Ok(Self {
            base_fingerprint: fp,
            version,
            scheme: meta.get("scheme").cloned().unwrap_or_default(),
            tensors,
        })
    }

    /// Write to `path` (atomically: temp file + rename).
    pub fn save(&self, path: &Path) -> Result<()> {
        let bytes = self.to_bytes()?;
        let tmp = path.with_extension("safetensors.tmp");
        std::fs::write(&tmp, bytes).map_err(|e| Error::file(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::file(path, e))
    }

    /// Read a delta file.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::file(path, e))?;
        Self::from_bytes(&bytes).map_err(|e| Error::file(path, e))
    }

    /// Check that this delta applies to a base with fingerprint `fp` holding `shapes`.
    pub fn check(&self, fp: &[u8; 32], shapes: &dyn Fn(&str) -> Option<Vec<usize>>) -> Result<()> {
        if &self.base_fingerprint != fp {
            return Err(Error::DeltaRefused(format!(
                "it is for base {} but this node's base is {}",
                &hex::encode(self.base_fingerprint)[..16],
                &hex::encode(fp)[..16]
            )));
        }
        for (n, t) in &self.tensors {
            match shapes(n) {
                None => {
                    return Err(Error::DeltaRefused(format!(
                        "tensor `{n}` is not in the base"
                    )))
                }
                Some(s) if s != t.dims() => {
                    return Err(Error::DeltaRefused(format!(
                        "tensor `{n}` has shape {:?}, the base {s:?}",
                        t.dims()
                    )))
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// [`Delta::diff`] against a base read in place: each updated tensor is compared with
    /// `base`'s (dequantized) value of the shape in `shapes`.
    pub fn diff_source(
        base: &dyn TensorSource,
        shapes: &HashMap<String, Vec<usize>>,
        updated: &HashMap<String, Tensor>,
        dtype: DType,
        base_fingerprint: [u8; 32],
        version: u64,
        scheme: &str,
    ) -> Result<Self> {
        let mut old = HashMap::new();
        for n in updated.keys() {
            let shape = shapes
                .get(n)
                .ok_or_else(|| Error::invalid("delta", format!("`{n}` is not in the base")))?;
            old.insert(n.clone(), base.get(n, shape)?);
        }
        Self::diff(&old, updated, dtype, base_fingerprint, version, scheme)
    }

    /// This delta's tensors as a source to stack over its base (`Stacked { top, base }`),
    /// after [`Delta::check`] against the base's fingerprint `fp` and `shapes`: a delta for
    /// another base, or naming a tensor the base lacks or shapes differently, is refused.
    pub fn over(
        &self,
        fp: &[u8; 32],
        shapes: &HashMap<String, Vec<usize>>,
    ) -> Result<MemorySource> {
        self.check(fp, &|n| shapes.get(n).cloned())?;
        Ok(MemorySource::new(
            self.tensors
                .iter()
                .map(|(n, t)| (n.clone(), t.clone()))
                .collect(),
        ))
    }

    /// `base` with this delta's tensors replaced, after [`Delta::check`] against `fp`.
    pub fn apply(
        &self,
        base: &HashMap<String, Tensor>,
        fp: &[u8; 32],
    ) -> Result<HashMap<String, Tensor>> {
        self.check(fp, &|n| base.get(n).map(|t| t.dims().to_vec()))?;
        let mut out = base.clone();
        for (n, t) in &self.tensors {
            let dtype = base.get(n).map(Tensor::dtype).unwrap_or(DType::F32);
            out.insert(n.clone(), t.to_dtype(dtype)?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> HashMap<String, Tensor> {
        HashMap::from([
            (
                "a".to_string(),
                Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &Device::Cpu).unwrap(),
            ),
            (
                "b".to_string(),
                Tensor::new(&[5f32, 6.0], &Device::Cpu).unwrap(),
            ),
        ])
    }

    #[test]
    fn only_changed_tensors_round_trip_and_apply() {
        let base = base();
        let mut up = base.clone();
        up.insert(
            "a".into(),
            Tensor::new(&[[1f32, 2.0], [3.0, 4.5]], &Device::Cpu).unwrap(),
        );
        let fp = [7u8; 32];
        let d = Delta::diff(&base, &up, DType::F16, fp, 3, "full").unwrap();
        assert_eq!(d.tensors.keys().collect::<Vec<_>>(), vec!["a"]);
        let d2 = Delta::from_bytes(&d.to_bytes().unwrap()).unwrap();
        assert_eq!(
            (d2.version, d2.base_fingerprint, d2.scheme.as_str()),
            (3, fp, "full")
        );
        let applied = d2.apply(&base, &fp).unwrap();
        let a: Vec<Vec<f32>> = applied["a"].to_vec2().unwrap();
        assert_eq!(a, vec![vec![1.0, 2.0], vec![3.0, 4.5]]);
        assert_eq!(applied["a"].dtype(), DType::F32);
        assert!(applied["b"].to_vec1::<f32>().unwrap() == vec![5.0, 6.0]);
    }

    #[test]
    fn a_delta_for_another_base_or_shape_is_refused() {
        let base = base();
        let mut up = base.clone();
        up.insert("b".into(), Tensor::new(&[5f32, 7.0], &Device::Cpu).unwrap());
        let d = Delta::diff(&base, &up, DType::F32, [1u8; 32], 1, "x").unwrap();
        let e = d.apply(&base, &[2u8; 32]).unwrap_err();
        assert!(matches!(e, Error::DeltaRefused(_)), "{e}");
        let mut other = base.clone();
        other.insert(
            "b".into(),
            Tensor::new(&[5f32, 7.0, 1.0], &Device::Cpu).unwrap(),
        );
        assert!(d.apply(&other, &[1u8; 32]).is_err());
        other.remove("b");
        assert!(d.apply(&other, &[1u8; 32]).is_err());
    }

    #[test]
    fn garbage_and_missing_metadata_are_errors() {
        assert!(Delta::from_bytes(b"not a file").is_err());
        let plain = safetensors::serialize(base().iter(), None).unwrap();
        let e = Delta::from_bytes(&plain).unwrap_err().to_string();
        assert!(e.contains("metadata"), "{e}");
    }
}
