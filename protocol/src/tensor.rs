//! Tensor encodings: f32, f16, bf16 and int8 with per-row scales.
//!
//! A [`WireTensor`] is a shape, an [`Encoding`] and the encoded little-endian bytes. It has
//! no candle dependency: encode from `&[f32]` plus a shape, decode to a `Vec<f32>` or into a
//! caller's buffer. Conversions work on whole slices (`half`'s slice helpers, a tight int8
//! loop); tensor bytes never pass through serde.
//!
//! Byte layouts (all little-endian):
//! - `F32`: `4 × elements` bytes.
//! - `F16` / `Bf16`: `2 × elements` bytes (IEEE half / bfloat16, round-to-nearest-even).
//! - `Int8`: `rows` f32 scales followed by `elements` i8 values, where a row is the last
//!   dimension (`rows = elements / last_dim`). Symmetric quantisation:
//!   `scale = absmax(row) / 127`, `q = round(x / scale)`, decoded `x' = q × scale`, so
//!   `|x − x'| ≤ scale / 2`.

use bytes::Bytes;
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::limits::Limits;

/// How a tensor's elements are laid out on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Encoding {
    /// IEEE f32, lossless.
    F32,
    /// IEEE half precision.
    F16,
    /// bfloat16 (f32 exponent range, 8-bit mantissa).
    Bf16,
    /// int8 with one f32 scale per row (last dimension).
    Int8,
}

impl Encoding {
    /// All encodings, for benchmarks and tests.
    pub const ALL: [Encoding; 4] = [Encoding::F32, Encoding::F16, Encoding::Bf16, Encoding::Int8];

    /// Short lowercase name (`f32`, `f16`, `bf16`, `int8`).
    pub fn name(self) -> &'static str {
        match self {
            Encoding::F32 => "f32",
            Encoding::F16 => "f16",
            Encoding::Bf16 => "bf16",
            Encoding::Int8 => "int8",
        }
    }

    /// Whether decoding reproduces the f32 input exactly.
    pub fn is_lossless(self) -> bool {
        matches!(self, Encoding::F32)
    }

    /// Encoded byte length of a tensor of `shape` (saturating; compare with limits first).
    pub fn byte_len(self, shape: &[u32]) -> u64 {
        let elements = shape
            .iter()
            .fold(1u64, |a, &d| a.saturating_mul(u64::from(d)));
        match self {
            Encoding::F32 => elements.saturating_mul(4),
            Encoding::F16 | Encoding::Bf16 => elements.saturating_mul(2),
            Encoding::Int8 => rows_of(shape).saturating_mul(4).saturating_add(elements),
        }
    }
}

impl std::fmt::Display for Encoding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Encoding {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" => Ok(Encoding::F32),
            "f16" => Ok(Encoding::F16),
            "bf16" => Ok(Encoding::Bf16),
            "int8" | "i8" => Ok(Encoding::Int8),
            other => Err(Error::invalid(
                "encoding",
                format!("unknown encoding {other:?} (f32|f16|bf16|int8)"),
            )),
        }
    }
}

/// Rows for int8 scales: product of all dimensions but the last (1 for rank 0).
fn rows_of(shape: &[u32]) -> u64 {
    match shape.split_last() {
        None => 1,
        Some((_, init)) => init
            .iter()
            .fold(1u64, |a, &d| a.saturating_mul(u64::from(d))),
    }
}

/// A tensor ready for the wire: shape, encoding and encoded bytes (see the module docs for
/// layouts). Construct with [`WireTensor::encode`] or [`WireTensor::from_parts`]; both check
/// that the byte length matches shape × encoding.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(into = "TensorDesc", from = "TensorDesc")]
pub struct WireTensor {
    shape: Vec<u32>,
    encoding: Encoding,
    bytes: Bytes,
}

/// What the postcard header carries for a tensor; the bytes travel in the frame payload.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct TensorDesc {
    shape: Vec<u32>,
    encoding: Encoding,
}

impl From<WireTensor> for TensorDesc {
    fn from(t: WireTensor) -> Self {
        TensorDesc {
            shape: t.shape,
            encoding: t.encoding,
        }
    }
}

impl From<TensorDesc> for WireTensor {
    fn from(d: TensorDesc) -> Self {
        // Bytes are attached by the frame decoder after validation.
        WireTensor {
            shape: d.shape,
            encoding: d.encoding,
            bytes: Bytes::new(),
        }
    }
}

const CHUNK: usize = 512;

impl WireTensor {
    /// Encode `data` (row-major, `shape`) with `encoding`.
    ///
    /// Errors if `data.len()` is not the product of `shape`, a dimension exceeds `u32`, or
    /// (int8 only) a value is not finite — a NaN or infinity would poison its row's scale.
    pub fn encode(data: &[f32], shape: &[usize], encoding: Encoding) -> Result<Self> {
        let shape32: Vec<u32> = shape
            .iter()
            .map(|&d| {
                u32::try_from(d)
                    .map_err(|_| Error::invalid("shape", format!("dimension {d} exceeds u32")))
            })
            .collect::<Result<_>>()?;
        let elements: usize = shape.iter().product();
        if elements != data.len() {
            return Err(Error::invalid(
                "data",
                format!(
                    "shape {shape:?} has {elements} elements but data has {}",
                    data.len()
                ),
            ));
        }
        let bytes = match encoding {
            Encoding::F32 => encode_f32(data),
            Encoding::F16 => encode_half::<f16>(data),
            Encoding::Bf16 => encode_half::<bf16>(data),
            Encoding::Int8 => {
                let cols = shape.last().copied().unwrap_or(1);
                let rows = shape
                    .split_last()
                    .map_or(1, |(_, init)| init.iter().product());
                encode_int8(data, rows, cols)?
            }
        };
        Ok(WireTensor {
            shape: shape32,
            encoding,
            bytes: Bytes::from(bytes),
        })
    }

    /// Wrap already-encoded bytes, checking the length against shape × encoding.
    pub fn from_parts(shape: Vec<u32>, encoding: Encoding, bytes: Bytes) -> Result<Self> {
        let expected = encoding.byte_len(&shape);
        if expected != bytes.len() as u64 {
            return Err(Error::LengthMismatch {
                field: "tensor.bytes",
                expected,
                got: bytes.len() as u64,
            });
        }
        Ok(WireTensor {
            shape,
            encoding,
            bytes,
        })
    }

    /// The shape.
    pub fn shape(&self) -> &[u32] {
        &self.shape
    }

    /// The shape as `usize`s (what candle wants).
    pub fn dims(&self) -> Vec<usize> {
        self.shape.iter().map(|&d| d as usize).collect()
    }

    /// The encoding.
    pub fn encoding(&self) -> Encoding {
        self.encoding
    }

    /// The encoded bytes (layout in the module docs).
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    /// Number of elements (product of the shape).
    pub fn elements(&self) -> usize {
        self.shape
            .iter()
            .fold(1usize, |a, &d| a.saturating_mul(d as usize))
    }

    /// Check shape against `limits` and the byte length against shape × encoding.
    pub fn validate(&self, limits: &Limits) -> Result<()> {
        limits.check_shape(&self.shape)?;
        let expected = self.encoding.byte_len(&self.shape);
        if expected != self.bytes.len() as u64 {
            return Err(Error::LengthMismatch {
                field: "tensor.bytes",
                expected,
                got: self.bytes.len() as u64,
            });
        }
        Ok(())
    }

    /// Decode to a new `Vec<f32>`.
    pub fn decode(&self) -> Result<Vec<f32>> {
        let mut out = vec![0f32; self.elements()];
        self.decode_into(&mut out)?;
        Ok(out)
    }

    /// Decode into `out`, which must hold exactly [`elements`](Self::elements) values.
    pub fn decode_into(&self, out: &mut [f32]) -> Result<()> {
        let n = self.elements();
        if out.len() != n {
            return Err(Error::invalid(
                "out",
                format!("buffer holds {} values, tensor has {n}", out.len()),
            ));
        }
        let expected = self.encoding.byte_len(&self.shape);
        if expected != self.bytes.len() as u64 {
            return Err(Error::LengthMismatch {
                field: "tensor.bytes",
                expected,
                got: self.bytes.len() as u64,
            });
        }
        match self.encoding {
            Encoding::F32 => decode_f32(&self.bytes, out),
            Encoding::F16 => decode_half::<f16>(&self.bytes, out),
            Encoding::Bf16 => decode_half::<bf16>(&self.bytes, out),
            Encoding::Int8 => {
                let cols = self.shape.last().map(|&d| d as usize).unwrap_or(1);
                decode_int8(&self.bytes, rows_of(&self.shape) as usize, cols, out);
            }
        }
        Ok(())
    }

    /// Error with the index of the first NaN/infinity (int8: checks the scales).
    pub fn check_finite(&self, field: &'static str) -> Result<()> {
        let bad = match self.encoding {
            Encoding::F32 => self
                .bytes
                .chunks_exact(4)
                .position(|c| !f32::from_le_bytes([c[0], c[1], c[2], c[3]]).is_finite()),
            Encoding::F16 => self
                .bytes
                .chunks_exact(2)
                .position(|c| !f16::from_le_bytes([c[0], c[1]]).is_finite()),
            Encoding::Bf16 => self
                .bytes
                .chunks_exact(2)
                .position(|c| !bf16::from_le_bytes([c[0], c[1]]).is_finite()),
            Encoding::Int8 => {
                let rows = rows_of(&self.shape) as usize;
                let cols = self.shape.last().map(|&d| d as usize).unwrap_or(1);
                self.bytes[..rows * 4]
                    .chunks_exact(4)
                    .position(|c| !f32::from_le_bytes([c[0], c[1], c[2], c[3]]).is_finite())
                    .map(|row| row * cols)
            }
        };
        match bad {
            Some(index) => Err(Error::NonFinite { field, index }),
            None => Ok(()),
        }
    }

    /// Build without checking; callers guarantee `bytes.len() == encoding.byte_len(shape)`.
    pub(crate) fn new_unchecked(shape: Vec<u32>, encoding: Encoding, bytes: Bytes) -> Self {
        WireTensor {
            shape,
            encoding,
            bytes,
        }
    }

    /// Attach payload bytes to a tensor whose descriptor came from a header.
    pub(crate) fn set_bytes(&mut self, bytes: Bytes) {
        self.bytes = bytes;
    }
}

fn encode_f32(data: &[f32]) -> Vec<u8> {
    #[cfg(target_endian = "little")]
    {
        bytemuck::cast_slice::<f32, u8>(data).to_vec()
    }
    #[cfg(not(target_endian = "little"))]
    {
        data.iter().flat_map(|x| x.to_le_bytes()).collect()
    }
}

fn decode_f32(bytes: &[u8], out: &mut [f32]) {
    #[cfg(target_endian = "little")]
    {
        bytemuck::cast_slice_mut::<f32, u8>(out).copy_from_slice(bytes);
    }
    #[cfg(not(target_endian = "little"))]
    {
        for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
            *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        }
    }
}

/// Half-width floats converted in stack-sized chunks with `half`'s slice helpers (SIMD where
/// the CPU has it), so the output needs no alignment.
trait Half: Copy + Default + bytemuck::Pod
where
    [Self]: HalfFloatSliceExt,
{
}
impl Half for f16 {}
impl Half for bf16 {}

fn encode_half<H: Half>(data: &[f32]) -> Vec<u8>
where
    [H]: HalfFloatSliceExt,
{
    let mut out = vec![0u8; data.len() * 2];
    let mut buf = [H::default(); CHUNK];
    for (src, dst) in data.chunks(CHUNK).zip(out.chunks_mut(CHUNK * 2)) {
        let b = &mut buf[..src.len()];
        b.convert_from_f32_slice(src);
        if cfg!(target_endian = "little") {
            dst.copy_from_slice(bytemuck::cast_slice(b));
        } else {
            for (d, h) in dst.chunks_exact_mut(2).zip(b.iter()) {
                let v: u16 = bytemuck::cast(*h);
                d.copy_from_slice(&v.to_le_bytes());
            }
        }
    }
    out
}

fn decode_half<H: Half>(bytes: &[u8], out: &mut [f32])
where
    [H]: HalfFloatSliceExt,
{
    let mut buf = [H::default(); CHUNK];
    for (src, dst) in bytes.chunks(CHUNK * 2).zip(out.chunks_mut(CHUNK)) {
        let b = &mut buf[..dst.len()];
        if cfg!(target_endian = "little") {
            bytemuck::cast_slice_mut::<H, u8>(b).copy_from_slice(src);
        } else {
            for (h, s) in b.iter_mut().zip(src.chunks_exact(2)) {
                *h = bytemuck::cast(u16::from_le_bytes([s[0], s[1]]));
            }
        }
        b.convert_to_f32_slice(dst);
    }
}

const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer (ties to even)

fn encode_int8(data: &[f32], rows: usize, cols: usize) -> Result<Vec<u8>> {
    let mut out = vec![0u8; rows * 4 + data.len()];
    let (scales, qs) = out.split_at_mut(rows * 4);
    if cols == 0 {
        return Ok(out);
    }
    for (r, (row, qrow)) in data
        .chunks_exact(cols)
        .zip(qs.chunks_exact_mut(cols))
        .enumerate()
    {
        // |x| as bits orders like |x| for finite values; inf/NaN are >= 0x7f80_0000.
        // Integer max vectorises; f32::max with its NaN rules does not.
        let max_bits = row
            .iter()
            .fold(0u32, |m, x| m.max(x.to_bits() & 0x7fff_ffff));
        if max_bits >= 0x7f80_0000 {
            let index = row.iter().position(|x| !x.is_finite()).unwrap_or(0);
            return Err(Error::NonFinite {
                field: "int8 input",
                index: r * cols + index,
            });
        }
        let absmax = f32::from_bits(max_bits);
        let scale = absmax / 127.0;
        let inv = if absmax > 0.0 { 127.0 / absmax } else { 0.0 };
        scales[r * 4..r * 4 + 4].copy_from_slice(&scale.to_le_bytes());
        for (q, &x) in qrow.iter_mut().zip(row) {
            // After adding MAGIC the low mantissa bits hold round(y) in two's complement,
            // so the low byte is round(y) as i8 — no float→int conversion in the loop.
            let y = (x * inv).clamp(-127.0, 127.0);
            *q = (y + MAGIC).to_bits() as u8;
        }
    }
    Ok(out)
}

fn decode_int8(bytes: &[u8], rows: usize, cols: usize, out: &mut [f32]) {
    if cols == 0 {
        return;
    }
    let (scales, qs) = bytes.split_at(rows * 4);
    for ((s, qrow), orow) in scales
        .chunks_exact(4)
        .zip(qs.chunks_exact(cols))
        .zip(out.chunks_exact_mut(cols))
    {
        let scale = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
        for (o, &q) in orow.iter_mut().zip(qrow) {
            *o = f32::from(q as i8) * scale;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_lengths() {
        assert_eq!(Encoding::F32.byte_len(&[2, 3]), 24);
        assert_eq!(Encoding::F16.byte_len(&[2, 3]), 12);
        assert_eq!(Encoding::Int8.byte_len(&[2, 3]), 2 * 4 + 6);
        assert_eq!(Encoding::Int8.byte_len(&[]), 4 + 1);
        assert_eq!(Encoding::Int8.byte_len(&[4, 0]), 16);
    }

    #[test]
    fn int8_is_at_least_3_9x_smaller_for_hidden_states() {
        let shape = [1u32, 896];
        let ratio = Encoding::F32.byte_len(&shape) as f64 / Encoding::Int8.byte_len(&shape) as f64;
        assert!(ratio >= 3.9, "{ratio}");
    }

    #[test]
    fn int8_rejects_nan() {
        let err = WireTensor::encode(&[1.0, f32::NAN], &[1, 2], Encoding::Int8).unwrap_err();
        assert!(matches!(err, Error::NonFinite { index: 1, .. }), "{err}");
    }

    #[test]
    fn shape_mismatch_is_an_error() {
        assert!(WireTensor::encode(&[1.0; 5], &[2, 3], Encoding::F32).is_err());
    }

    #[test]
    fn zero_rows_and_empty_tensors() {
        for enc in Encoding::ALL {
            let t = WireTensor::encode(&[], &[3, 0], enc).unwrap();
            assert_eq!(t.decode().unwrap(), Vec::<f32>::new());
            let t = WireTensor::encode(&[0.0; 4], &[2, 2], enc).unwrap();
            assert_eq!(t.decode().unwrap(), vec![0.0; 4]);
        }
    }
}
