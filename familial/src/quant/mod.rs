//! Quantized weights on the CPU: GGUF block formats read in place (mmap, no copy) and
//! multiplied at llama.cpp's speed.
//!
//! A [`QMatrix`] is a row-major `[rows, cols]` weight of one [`GgmlDType`] over
//! [`QBytes`] (a range of an mmap'd GGUF file, or an owned buffer), possibly several row
//! segments joined without copying ([`QMatrix::concat_rows`]: fused q/k/v, gate/up).
//!
//! Entry points:
//! - [`QMatrix::matmul_t`] — `y = x · Wᵀ`, the hot path of every quantized linear layer.
//!   Like llama.cpp, `x` is quantized once per call to 8-bit blocks and Q4_0 / Q4_1 /
//!   Q8_0 weights meet it in integer dot products (AVX-512 VNNI, AVX-VNNI or AVX2, with
//!   FMA and F16C, detected at run time; a portable loop otherwise), two weight rows ×
//!   two activation rows per register tile, output rows split over the installed
//!   [`Team`] (spinning workers) or else the rayon pool.
//! - [`QMatrix::dequantize_row_into`] (embedding lookup) and [`QMatrix::dequantize`],
//!   bit-exact with ggml / gguf-py.
//!
//! Supported dtypes: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4K, Q5K, Q6K; others
//! are [`crate::Error::UnsupportedQuant`]. Q5_x and the K-quants multiply through candle's
//! scalar `vec_dot` (correct, not fast).
//!
//! Accuracy: activation quantization (8 bits per 32-block, f32 scales) puts `matmul_t`
//! within about 1e-3 (tests allow 1e-2) of `‖w_j‖·‖x_i‖` from the exact f32 product of
//! the dequantized weight; the SIMD and portable loops do the same integer math and agree
//! to 1e-6 of that scale (the three SIMD builds bit for bit).

mod act;
pub(crate) mod blocks;
mod dot;
#[cfg(target_arch = "x86_64")]
mod dot_avx2;
mod matmul;
mod storage;
pub(crate) mod team;
#[cfg(test)]
mod tests;

pub use candle_core::quantized::GgmlDType;
pub(crate) use storage::aligned;
pub use storage::{QBytes, QMatrix};
pub use team::{Team, DEFAULT_SPIN};
