//! Block formats: which GGML dtypes this module reads, their byte alignment, and the
//! bit-exact dequantization of a run of blocks (candle's `GgmlType::to_float`, which
//! follows ggml's `dequantize_row_*`).

use candle_core::quantized::k_quants::{
    BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ5_1, BlockQ6K, BlockQ8_0, GgmlType,
};
use candle_core::quantized::GgmlDType;
use half::{bf16, f16};

use crate::{Error, Result};

/// candle types whose every bit pattern is a valid value (`#[repr(C)]` structs of
/// integers, `f16` and `f32`, or those scalars themselves), so a byte slice of the right
/// length and alignment may be viewed as a slice of them.
///
/// # Safety
/// Implement only for such plain-old-data types.
pub(crate) unsafe trait Plain: GgmlType {}
// SAFETY: each is `#[repr(C)]` of `f16`, `u8`/`i8` arrays (candle's k_quants.rs), or a scalar.
unsafe impl Plain for BlockQ4_0 {}
// SAFETY: as above.
unsafe impl Plain for BlockQ4_1 {}
// SAFETY: as above.
unsafe impl Plain for BlockQ5_0 {}
// SAFETY: as above.
unsafe impl Plain for BlockQ5_1 {}
// SAFETY: as above.
unsafe impl Plain for BlockQ8_0 {}
// SAFETY: as above.
unsafe impl Plain for BlockQ4K {}
// SAFETY: as above.
unsafe impl Plain for BlockQ5K {}
// SAFETY: as above.
unsafe impl Plain for BlockQ6K {}
// SAFETY: plain scalars.
unsafe impl Plain for f32 {}
// SAFETY: as above.
unsafe impl Plain for f16 {}
// SAFETY: as above.
unsafe impl Plain for bf16 {}

/// Runs `$body` with `$t` bound to the block type of `$dtype`; unsupported dtypes return
/// [`Error::UnsupportedQuant`] from the enclosing function.
macro_rules! with_block {
    ($dtype:expr, $t:ident => $body:expr) => {{
        use candle_core::quantized::k_quants::*;
        match $dtype {
            GgmlDType::F32 => {
                type $t = f32;
                $body
            }
            GgmlDType::F16 => {
                type $t = half::f16;
                $body
            }
            GgmlDType::BF16 => {
                type $t = half::bf16;
                $body
            }
            GgmlDType::Q4_0 => {
                type $t = BlockQ4_0;
                $body
            }
            GgmlDType::Q4_1 => {
                type $t = BlockQ4_1;
                $body
            }
            GgmlDType::Q5_0 => {
                type $t = BlockQ5_0;
                $body
            }
            GgmlDType::Q5_1 => {
                type $t = BlockQ5_1;
                $body
            }
            GgmlDType::Q8_0 => {
                type $t = BlockQ8_0;
                $body
            }
            GgmlDType::Q4K => {
                type $t = BlockQ4K;
                $body
            }
            GgmlDType::Q5K => {
                type $t = BlockQ5K;
                $body
            }
            GgmlDType::Q6K => {
                type $t = BlockQ6K;
                $body
            }
            other => return Err($crate::quant::blocks::unsupported(other)),
        }
    }};
}
pub(crate) use with_block;

/// The error for a dtype this module does not implement.
pub(crate) fn unsupported(dtype: GgmlDType) -> Error {
    Error::UnsupportedQuant(format!("{dtype:?}"))
}

/// Alignment in bytes a dtype's data must start at (that of its block struct).
pub(crate) fn align_of(dtype: GgmlDType) -> Result<usize> {
    Ok(with_block!(dtype, T => std::mem::align_of::<T>()))
}

/// `bytes` viewed as blocks of `T`: an error (never a panic) if the length is not a whole
/// number of blocks or the start is not aligned for `T`.
pub(crate) fn cast<T: Plain>(bytes: &[u8]) -> Result<&[T]> {
    let size = std::mem::size_of::<T>();
    if bytes.len() % size != 0 {
        return Err(Error::Quant(format!(
            "{} bytes are not a whole number of {:?} blocks of {size} bytes",
            bytes.len(),
            T::DTYPE
        )));
    }
    if (bytes.as_ptr() as usize) % std::mem::align_of::<T>() != 0 {
        return Err(Error::Quant(format!(
            "{:?} data at address {:p} is not aligned to {} bytes",
            T::DTYPE,
            bytes.as_ptr(),
            std::mem::align_of::<T>()
        )));
    }
    // SAFETY: the pointer is aligned for T and the length is a whole number of `T`s, all
    // within `bytes`' lifetime; `T: Plain`, so every bit pattern is a valid `T`.
    Ok(unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<T>(), bytes.len() / size) })
}

/// Dequantize the whole blocks in `bytes` (of `dtype`) into `out`, whose length must be
/// the number of values they hold.
pub(crate) fn dequantize(dtype: GgmlDType, bytes: &[u8], out: &mut [f32]) -> Result<()> {
    with_block!(dtype, T => {
        let blocks = cast::<T>(bytes)?;
        if blocks.len() * T::BLCK_SIZE != out.len() {
            return Err(Error::Quant(format!(
                "{} {dtype:?} blocks hold {} values, not {}",
                blocks.len(),
                blocks.len() * T::BLCK_SIZE,
                out.len()
            )));
        }
        T::to_float(blocks, out);
    });
    Ok(())
}
