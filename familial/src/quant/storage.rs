//! Where a quantized matrix's bytes live ([`QBytes`]: an mmap'd GGUF file or an owned
//! buffer, never copied) and the matrix itself ([`QMatrix`]: one or more row segments of
//! one dtype and width), with its checks and dequantization.

use std::sync::Arc;

use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};

use super::blocks;
use crate::{Error, Result};

/// Bytes a [`QMatrix`] reads from: the mmap of a GGUF file (zero-copy) or an owned buffer.
#[derive(Clone)]
pub struct QBytes {
    owner: Arc<dyn AsRef<[u8]> + Send + Sync>,
    offset: usize,
    len: usize,
}

/// An owned buffer whose start is 8-byte aligned (what any block dtype needs).
struct Aligned {
    words: Vec<u64>,
    len: usize,
}

impl AsRef<[u8]> for Aligned {
    fn as_ref(&self) -> &[u8] {
        &bytemuck::cast_slice::<u64, u8>(&self.words)[..self.len]
    }
}

/// `v` as a shareable buffer whose start is 8-byte aligned: kept as is when it already is
/// (as the allocator gives in practice), copied into aligned storage otherwise.
pub(crate) fn aligned(v: Vec<u8>) -> Arc<dyn AsRef<[u8]> + Send + Sync> {
    if v.as_ptr() as usize % 8 == 0 {
        return Arc::new(v);
    }
    let len = v.len();
    let mut words = vec![0u64; len.div_ceil(8)];
    bytemuck::cast_slice_mut::<u64, u8>(&mut words)[..len].copy_from_slice(&v);
    Arc::new(Aligned { words, len })
}

impl QBytes {
    /// `len` bytes of `owner` from `offset`; an error if the range runs past its end.
    pub fn new(
        owner: Arc<dyn AsRef<[u8]> + Send + Sync>,
        offset: usize,
        len: usize,
    ) -> Result<Self> {
        let total = (*owner).as_ref().len();
        match offset.checked_add(len) {
            Some(end) if end <= total => Ok(QBytes { owner, offset, len }),
            _ => Err(Error::Quant(format!(
                "byte range {offset}+{len} runs past the end of its {total}-byte buffer"
            ))),
        }
    }

    /// An owned buffer. Kept as is when its start is 8-byte aligned (as the allocator
    /// gives in practice), copied into aligned storage otherwise.
    pub fn from_vec(v: Vec<u8>) -> Self {
        let len = v.len();
        QBytes {
            owner: aligned(v),
            offset: 0,
            len,
        }
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // In range: checked by `new`, and the owner's contents do not change.
        (*self.owner)
            .as_ref()
            .get(self.offset..self.offset + self.len)
            .unwrap_or(&[])
    }

    /// Number of bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A run of consecutive rows of a [`QMatrix`] stored in one [`QBytes`].
#[derive(Clone)]
pub(crate) struct Segment {
    pub(crate) bytes: QBytes,
    pub(crate) rows: usize,
}

/// A row-major quantized matrix `[rows, cols]` (GGUF: ne0 = cols, ne1 = rows): each row is
/// `cols / block_size` blocks. May consist of several row segments of the same dtype and
/// cols (fused q/k/v, gate/up) without copying.
#[derive(Clone)]
pub struct QMatrix {
    pub(crate) dtype: GgmlDType,
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    /// Bytes per row.
    pub(crate) row_bytes: usize,
    pub(crate) segs: Arc<[Segment]>,
}

impl QMatrix {
    /// A matrix over `bytes`: checks that `dtype` is supported, `cols` is a multiple of its
    /// block size, `bytes` holds exactly `rows × cols` values and starts aligned for the
    /// dtype's blocks.
    pub fn new(dtype: GgmlDType, rows: usize, cols: usize, bytes: QBytes) -> Result<Self> {
        let align = blocks::align_of(dtype)?;
        let bs = dtype.block_size();
        if cols % bs != 0 {
            return Err(Error::Quant(format!(
                "{cols} columns are not a multiple of the {dtype:?} block size {bs}"
            )));
        }
        let row_bytes = cols / bs * dtype.type_size();
        let want = rows.checked_mul(row_bytes).ok_or_else(|| {
            Error::Quant(format!(
                "{rows} × {cols} {dtype:?} overflows the address space"
            ))
        })?;
        if bytes.len() != want {
            return Err(Error::Quant(format!(
                "a [{rows}, {cols}] {dtype:?} matrix needs {want} bytes, got {}",
                bytes.len()
            )));
        }
        if bytes.as_slice().as_ptr() as usize % align != 0 {
            return Err(Error::Quant(format!(
                "{dtype:?} data at byte offset {} is not aligned to {align} bytes",
                bytes.offset
            )));
        }
        Ok(QMatrix {
            dtype,
            rows,
            cols,
            row_bytes,
            segs: Arc::from(vec![Segment { bytes, rows }]),
        })
    }

    /// The rows of `parts` one after the other (fused q/k/v, gate/up), without copying;
    /// all parts must have the same dtype and cols.
    pub fn concat_rows(parts: &[QMatrix]) -> Result<QMatrix> {
        let first = parts
            .first()
            .ok_or_else(|| Error::Quant("concat_rows of no matrices".into()))?;
        let mut segs = Vec::new();
        for p in parts {
            if p.dtype != first.dtype || p.cols != first.cols {
                return Err(Error::Quant(format!(
                    "concat_rows: a [{}, {}] {:?} part does not match [_, {}] {:?}",
                    p.rows, p.cols, p.dtype, first.cols, first.dtype
                )));
            }
            segs.extend(p.segs.iter().filter(|s| s.rows > 0).cloned());
        }
        Ok(QMatrix {
            dtype: first.dtype,
            rows: parts.iter().map(|p| p.rows).sum(),
            cols: first.cols,
            row_bytes: first.row_bytes,
            segs: Arc::from(segs),
        })
    }

    /// The storage dtype.
    pub fn dtype(&self) -> GgmlDType {
        self.dtype
    }

    /// Number of rows (outputs of [`QMatrix::matmul_t`]).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Number of columns (inputs of [`QMatrix::matmul_t`]).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes of weight data (what a matmul reads).
    pub fn nbytes(&self) -> usize {
        self.rows * self.row_bytes
    }

    /// The bytes of rows `start..` of the segment holding `start`, with the number of rows
    /// of it at or after `start`; `None` past the last row.
    pub(crate) fn rows_from(&self, start: usize) -> Option<(&[u8], usize)> {
        let mut first = 0;
        for s in self.segs.iter() {
            if start < first + s.rows {
                let skip = start - first;
                let bytes = s.bytes.as_slice().get(skip * self.row_bytes..)?;
                return Some((bytes, s.rows - skip));
            }
            first += s.rows;
        }
        None
    }

    /// Call `f(j, bytes of row j)` for every row `j` in `range`, in order.
    pub(crate) fn for_rows(&self, range: std::ops::Range<usize>, mut f: impl FnMut(usize, &[u8])) {
        let mut j = range.start;
        while j < range.end {
            let Some((bytes, n)) = self.rows_from(j) else {
                return;
            };
            let take = n.min(range.end - j);
            for (r, row) in bytes.chunks_exact(self.row_bytes).take(take).enumerate() {
                f(j + r, row);
            }
            j += take;
        }
    }

    /// Dequantize row `row` into `out` (`cols` values), bit-exact with ggml: an embedding
    /// lookup.
    pub fn dequantize_row_into(&self, row: usize, out: &mut [f32]) -> Result<()> {
        if out.len() != self.cols {
            return Err(Error::Quant(format!(
                "dequantize_row_into: out holds {} values, a row has {}",
                out.len(),
                self.cols
            )));
        }
        let bytes = self
            .rows_from(row)
            .and_then(|(b, _)| b.get(..self.row_bytes))
            .ok_or_else(|| {
                Error::Quant(format!("row {row} is past the last of {} rows", self.rows))
            })?;
        blocks::dequantize(self.dtype, bytes, out)
    }

    /// The whole matrix as an f32 tensor `[rows, cols]` (training and tests).
    pub fn dequantize(&self) -> Result<Tensor> {
        let mut out = vec![0f32; self.rows * self.cols];
        if self.cols > 0 {
            for (j, o) in out.chunks_exact_mut(self.cols).enumerate() {
                self.dequantize_row_into(j, o)?;
            }
        }
        Ok(Tensor::from_vec(out, (self.rows, self.cols), &Device::Cpu)?)
    }
}
