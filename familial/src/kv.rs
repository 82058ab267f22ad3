//! Per-sequence KV caches.
//!
//! A [`SeqCache`] holds one [`LayerKv`] per trunk layer and one per exit block (exit blocks
//! keep caches of their own, so tokens of one sequence may exit at different depths; see
//! DESIGN.md §3). Every cache is contiguous from position 0: a layer that is asked to
//! process positions starting at `p` must already hold exactly `p` positions, otherwise the
//! call fails with [`Error::Kv`] and the caller must backfill first. That rule makes a
//! missed backfill an error instead of a silently wrong answer.

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// Keys and values of one attention layer for one sequence: `[kv_heads, len, head_dim]`.
#[derive(Debug, Default)]
pub struct LayerKv {
    k: Option<Tensor>,
    v: Option<Tensor>,
    len: usize,
    cap: usize,
}

impl LayerKv {
    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no position is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes reserved (capacity, not length).
    pub fn bytes(&self) -> usize {
        self.k
            .as_ref()
            .map(|k| 2 * k.elem_count() * k.dtype().size_in_bytes())
            .unwrap_or(0)
    }

    /// A deep copy (buffers are shared by `Tensor` clones, so a shallow copy would alias).
    pub fn fork(&self) -> Result<Self> {
        let copy = |t: &Option<Tensor>| -> Result<Option<Tensor>> {
            Ok(match t {
                Some(t) => Some(t.copy()?),
                None => None,
            })
        };
        Ok(Self {
            k: copy(&self.k)?,
            v: copy(&self.v)?,
            len: self.len,
            cap: self.cap,
        })
    }

    /// Forget positions `len..`.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Append `k`, `v` (`[kv_heads, n, head_dim]`) at position `start` and return views of all
    /// keys and values so far. `differentiable` appends with `cat` (autograd-safe) instead of
    /// writing into a preallocated buffer.
    pub(crate) fn append(
        &mut self,
        start: usize,
        k: &Tensor,
        v: &Tensor,
        differentiable: bool,
        what: &dyn Fn() -> String,
    ) -> Result<(Tensor, Tensor)> {
        if start != self.len {
            return Err(Error::Kv(format!(
                "{} holds positions 0..{} but the call starts at position {start}; {}",
                what(),
                self.len,
                if start > self.len {
                    "backfill the missing positions first"
                } else {
                    "truncate the cache before recomputing positions"
                }
            )));
        }
        let (kvh, n, hd) = k.dims3()?;
        if differentiable {
            let (k_all, v_all) = match (&self.k, &self.v) {
                (Some(pk), Some(pv)) if self.len > 0 => (
                    Tensor::cat(&[&pk.narrow(1, 0, self.len)?, k], 1)?,
                    Tensor::cat(&[&pv.narrow(1, 0, self.len)?, v], 1)?,
                ),
                _ => (k.clone(), v.clone()),
            };
            self.len += n;
            self.cap = self.len;
            self.k = Some(k_all.clone());
            self.v = Some(v_all.clone());
            return Ok((k_all, v_all));
        }
        let need = self.len + n;
        if need > self.cap || self.k.is_none() {
            let new_cap = need.max(self.cap * 2).max(16);
            let nk = Tensor::zeros((kvh, new_cap, hd), DType::F32, &Device::Cpu)?;
            let nv = Tensor::zeros((kvh, new_cap, hd), DType::F32, &Device::Cpu)?;
            if let (Some(pk), Some(pv)) = (&self.k, &self.v) {
                if self.len > 0 {
                    nk.slice_set(&pk.narrow(1, 0, self.len)?.contiguous()?, 1, 0)?;
                    nv.slice_set(&pv.narrow(1, 0, self.len)?.contiguous()?, 1, 0)?;
                }
            }
            self.k = Some(nk);
            self.v = Some(nv);
            self.cap = new_cap;
        }
        let (bk, bv) = match (&self.k, &self.v) {
            (Some(a), Some(b)) => (a, b),
            _ => return Err(Error::Kv("cache buffer missing".into())),
        };
        bk.slice_set(&k.contiguous()?, 1, self.len)?;
        bv.slice_set(&v.contiguous()?, 1, self.len)?;
        self.len = need;
        Ok((bk.narrow(1, 0, need)?, bv.narrow(1, 0, need)?))
    }
}

/// All KV state of one sequence on one node: trunk layers and exit blocks.
#[derive(Debug)]
pub struct SeqCache {
    pub(crate) trunk: Vec<LayerKv>,
    pub(crate) exits: Vec<LayerKv>,
}

impl SeqCache {
    /// An empty cache for a model with `num_layers` trunk layers and `num_exits` exits.
    pub fn new(num_layers: usize, num_exits: usize) -> Self {
        Self {
            trunk: (0..num_layers).map(|_| LayerKv::default()).collect(),
            exits: (0..num_exits).map(|_| LayerKv::default()).collect(),
        }
    }

    /// Positions held by trunk layer `layer` (0 if out of range).
    pub fn trunk_len(&self, layer: usize) -> usize {
        self.trunk.get(layer).map(LayerKv::len).unwrap_or(0)
    }

    /// Positions held by the block of exit number `exit_idx` (0 if out of range).
    pub fn exit_len(&self, exit_idx: usize) -> usize {
        self.exits.get(exit_idx).map(LayerKv::len).unwrap_or(0)
    }

    /// A deep copy of every layer (see [`LayerKv::fork`]).
    pub fn fork(&self) -> Result<Self> {
        Ok(Self {
            trunk: self
                .trunk
                .iter()
                .map(LayerKv::fork)
                .collect::<Result<_>>()?,
            exits: self
                .exits
                .iter()
                .map(LayerKv::fork)
                .collect::<Result<_>>()?,
        })
    }

    /// Forget every position `len..` in every layer (speculative rollback, retries).
    pub fn truncate(&mut self, len: usize) {
        for l in self.trunk.iter_mut().chain(self.exits.iter_mut()) {
            l.truncate(len);
        }
    }

    /// Bytes reserved by all layers.
    pub fn bytes(&self) -> usize {
        self.trunk
            .iter()
            .chain(self.exits.iter())
            .map(LayerKv::bytes)
            .sum()
    }
}
