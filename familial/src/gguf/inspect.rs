//! Tensor listings and fingerprints of a [`GgufFile`] under HF names, so the tools that
//! inspect and fingerprint HF checkpoints work on GGUF files unchanged.

use std::collections::BTreeMap;

use super::{gguf_name, hf_name, GgufFile};
use crate::error::Result;

impl GgufFile {
    /// HF name → (GGUF type, shape) of every tensor with an HF name, sorted by name;
    /// tensors without one (e.g. `rope_freqs.weight`) keep their GGUF name.
    pub fn tensor_infos(&self) -> BTreeMap<String, (String, Vec<usize>)> {
        self.tensors()
            .iter()
            .map(|(g, e)| {
                let name = hf_name(g).unwrap_or_else(|| g.clone());
                (name, (format!("{:?}", e.dtype), e.dims.clone()))
            })
            .collect()
    }

    /// Stored bytes of the tensor with HF name `name`.
    pub fn stored_bytes(&self, name: &str) -> Option<usize> {
        let g = gguf_name(name).unwrap_or_else(|| name.to_string());
        self.tensors().get(&g).map(|e| e.len)
    }

    /// SHA-256 over the names (HF), types, shapes and bytes of `names` (sorted), read from
    /// the mapping without copying; the GGUF counterpart of
    /// [`Checkpoint::fingerprint`](crate::weights::Checkpoint::fingerprint).
    pub fn fingerprint<'a>(&self, names: impl IntoIterator<Item = &'a str>) -> Result<[u8; 32]> {
        crate::weights::fingerprint_tensors(names, |n| {
            let g = gguf_name(n).unwrap_or_else(|| n.to_string());
            let e = self.tensors().get(&g)?;
            Some((format!("{:?}{:?}", e.dtype, e.dims), self.tensor_bytes(&g)?))
        })
    }
}
