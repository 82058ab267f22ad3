//! `y = x · Wᵀ` for a [`QMatrix`] `W`: the hot path of every quantized linear layer.
//!
//! `x` is quantized once per call (`act.rs`, into a thread-local buffer), then output rows
//! are split into contiguous chunks (of an even number of rows) claimed by the threads of
//! the installed [`super::Team`] (`team.rs`), or else two per rayon thread; each
//! thread walks its weight rows in file order, two at a time, and takes the pair's dot
//! products with two activation rows at once while the pair is in L1 (`dot.rs`;
//! AVX2 / AVX-VNNI / AVX-512 VNNI in `dot_avx2.rs`). Q4_0, Q4_1 and Q8_0 run this
//! module's integer kernels; Q5_0, Q5_1 and the K-quants candle's `GgmlType::vec_dot` on
//! candle's activation blocks (scalar, correct, slower); F32, F16 and BF16 weights a
//! dequantize-a-row-then-f32-dot loop.
//!
//! Entry point: [`QMatrix::matmul_t`].

use std::cell::RefCell;
use std::ops::Range;

use candle_core::quantized::{GgmlDType, GgmlType};
use candle_core::{DType, Device, Storage, Tensor};
use rayon::prelude::*;

use super::act::{Q8Act, Q8Row};
use super::blocks::{self, with_block, Plain};
use super::dot::{tile, Isa, Kind};
use super::QMatrix;
use crate::{Error, Result};

/// Below this many multiply-adds a call stays on the calling thread (rayon's hand-off
/// costs a few µs).
const PAR_MIN_WORK: usize = 1 << 16;

/// The best kernel build this CPU runs, detected once: AVX-512 VNNI (with VL), else
/// AVX-VNNI, else AVX2 (all three with FMA and F16C), else the portable loop.
/// (On the Sapphire Rapids VM this was tuned on, which has both, the VEX `vpdpbusd` of
/// AVX-VNNI ran decode-shaped products ~1.5× slower than the EVEX one or plain AVX2.)
/// `AIFLOW_QUANT_ISA` (`portable`, `avx2`, `avxvnni`, `avx512vnni`) picks a lower one
/// (benchmarks, bisecting numerical differences); one the CPU lacks is ignored.
pub(crate) fn isa() -> Isa {
    static BEST: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
    *BEST.get_or_init(|| {
        let forced = match std::env::var("AIFLOW_QUANT_ISA").as_deref() {
            Ok("portable") => Some(Isa::Portable),
            Ok("avx2") => Some(Isa::Avx2),
            Ok("avxvnni") => Some(Isa::AvxVnni),
            Ok("avx512vnni") => Some(Isa::Avx512Vnni),
            _ => None,
        };
        forced.filter(|&i| available(i)).unwrap_or_else(|| {
            [Isa::Avx512Vnni, Isa::AvxVnni, Isa::Avx2]
                .into_iter()
                .find(|&i| available(i))
                .unwrap_or(Isa::Portable)
        })
    })
}

/// AVX-VNNI (CPUID leaf 7 sub-leaf 1, EAX bit 4), read directly: its
/// `is_x86_feature_detected!` name needs Rust 1.89. Its VEX instructions need the OS to
/// keep AVX state, which the AVX2 check covers.
#[cfg(target_arch = "x86_64")]
// `__cpuid_count` is an `unsafe fn` before Rust 1.87 (MSRV 1.85), safe after.
#[allow(unused_unsafe)]
fn avx_vnni() -> bool {
    // SAFETY: CPUID exists on every x86_64 CPU; leaf 7 is valid where the max leaf ≥ 7.
    unsafe {
        use std::arch::x86_64::__cpuid_count;
        __cpuid_count(0, 0).eax >= 7 && __cpuid_count(7, 1).eax & (1 << 4) != 0
    }
}

/// Whether this CPU runs the kernels of `isa`.
pub(crate) fn available(isa: Isa) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let avx2 = is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c");
        match isa {
            Isa::Portable => true,
            Isa::Avx2 => avx2,
            Isa::AvxVnni => avx2 && avx_vnni(),
            Isa::Avx512Vnni => {
                avx2 && is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512vl")
                    && is_x86_feature_detected!("avx512vnni")
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        isa == Isa::Portable
    }
}

thread_local! {
    /// Quantized activations, reused across calls on this thread.
    static ACT: RefCell<Q8Act> = RefCell::new(Q8Act::default());
}

impl QMatrix {
    /// `y = x · Wᵀ` for `x` `[.., cols]` f32 on the CPU: the result is `[.., rows]` f32
    /// (leading dimensions kept; `x` `[m, cols]` gives `[m, rows]`). A tracked `x` loses
    /// its gradient (inference only).
    pub fn matmul_t(&self, x: &Tensor) -> Result<Tensor> {
        if x.dtype() != DType::F32 || !matches!(x.device(), Device::Cpu) || x.rank() == 0 {
            return Err(Error::Quant(format!(
                "matmul_t needs an f32 CPU tensor [.., {}], got {:?} {:?} on {:?}",
                self.cols,
                x.dtype(),
                x.dims(),
                x.device().location()
            )));
        }
        let dims = x.dims();
        if dims[dims.len() - 1] != self.cols {
            return Err(Error::ShapeMismatch {
                name: "matmul_t input".into(),
                got: dims.to_vec(),
                expected: [&dims[..dims.len() - 1], &[self.cols]].concat(),
            });
        }
        let m: usize = dims[..dims.len() - 1].iter().product();
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().unwrap_or(&mut 0) = self.rows;
        let x = x.contiguous()?;
        let (storage, layout) = x.storage_and_layout();
        let Storage::Cpu(cpu) = &*storage else {
            return Err(Error::Quant("matmul_t input is not on the CPU".into()));
        };
        let (a, b) = layout
            .contiguous_offsets()
            .ok_or_else(|| Error::Quant("matmul_t input is not contiguous".into()))?;
        let xs = cpu.as_slice::<f32>()?.get(a..b).unwrap_or(&[]);
        let y = matmul_t_with(self, xs, m, isa())?;
        drop(storage);
        Ok(Tensor::from_vec(y, out_dims, &Device::Cpu)?)
    }
}

/// `x` (`m` rows of `w.cols`) times `wᵀ`, row-major `[m, rows]`, with the kernels of
/// `isa` (the portable loop where the CPU lacks it) — tests run each one.
pub(crate) fn matmul_t_with(w: &QMatrix, x: &[f32], m: usize, isa: Isa) -> Result<Vec<f32>> {
    let (n, k) = (w.rows, w.cols);
    if x.len() != m * k {
        return Err(Error::Quant(format!(
            "matmul_t: {} input values are not {m} rows of {k}",
            x.len()
        )));
    }
    if m == 0 || n == 0 || k == 0 {
        return Ok(vec![0f32; m * n]);
    }
    let isa = if available(isa) { isa } else { Isa::Portable };
    // Transposed result [n, m]: each thread's rows are one contiguous piece.
    let yt = match w.dtype {
        GgmlDType::Q4_0 | GgmlDType::Q4_1 | GgmlDType::Q8_0 => {
            let kind = match w.dtype {
                GgmlDType::Q4_0 => Kind::Q4_0,
                GgmlDType::Q4_1 => Kind::Q4_1,
                _ => Kind::Q8_0,
            };
            let run = |act: &mut Q8Act| {
                act.quantize(x, m, k, isa != Isa::Portable);
                let xr: Vec<Q8Row<'_>> = (0..m).map(|i| act.row(i)).collect();
                par_rows(n, m, m * k, |range, out| {
                    rows_tiled(w, kind, range, &xr, out, isa)
                })
            };
            ACT.with(|c| match c.try_borrow_mut() {
                Ok(mut act) => run(&mut act),
                // Re-entered on this thread (a nested rayon job): use a fresh buffer.
                Err(_) => run(&mut Q8Act::default()),
            })
        }
        GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => float_rows(w, x, m)?,
        dtype => with_block!(dtype, T => candle_rows::<T>(w, x, m)?),
    };
    Ok(transpose(yt, n, m))
}

/// Weight rows `range` against all activation rows `x` into `out` (`[range.len(), m]`):
/// two weight rows at a time (one at a segment's odd end), each pair against [`XR`]
/// activation rows at a time while the pair is in L1.
fn rows_tiled(
    w: &QMatrix,
    kind: Kind,
    range: Range<usize>,
    x: &[Q8Row<'_>],
    out: &mut [f32],
    isa: Isa,
) {
    let m = x.len();
    let mut j = range.start;
    while j < range.end {
        let Some((bytes, avail)) = w.rows_from(j) else {
            return;
        };
        let take = avail.min(range.end - j);
        let rb = w.row_bytes;
        let o = &mut out[(j - range.start) * m..(j - range.start + take) * m];
        let mut rows = bytes[..take * rb].chunks_exact(rb);
        let mut outs = o.chunks_exact_mut(m);
        while let (Some(r0), Some(o0)) = (rows.next(), outs.next()) {
            match (rows.next(), outs.next()) {
                (Some(r1), Some(o1)) => tile_rows::<2>(kind, [r0, r1], x, [o0, o1], isa),
                _ => tile_rows::<1>(kind, [r0], x, [o0], isa),
            }
        }
        j += take;
    }
}

/// Activation rows per register tile (the match in [`tile_rows`] covers 1..=XR): 2 × 2 tiles (8 accumulators over the two block
/// parities) fit the 16 vector registers; 2 × 4 spilled and ran 5-15% slower at 4 and
/// 128 rows (`examples/quant_matmul.rs`). The tile shape does not change any result.
const XR: usize = 2;

/// `J` weight rows against all activation rows `x`, [`XR`] at a time.
fn tile_rows<const J: usize>(
    kind: Kind,
    w: [&[u8]; J],
    x: &[Q8Row<'_>],
    mut out: [&mut [f32]; J],
    isa: Isa,
) {
    fn put<const J: usize, const R: usize>(out: &mut [&mut [f32]; J], i: usize, v: [[f32; R]; J]) {
        for (o, v) in out.iter_mut().zip(v) {
            o[i..i + R].copy_from_slice(&v);
        }
    }
    let mut i = 0;
    for xs in x.chunks(XR) {
        match xs {
            [a] => put(&mut out, i, tile::<J, 1>(kind, &w, &[*a], isa)),
            [a, b] => put(&mut out, i, tile::<J, 2>(kind, &w, &[*a, *b], isa)),
            _ => {}
        }
        i += xs.len();
    }
}

/// Run `f(rows, out)` over contiguous chunks of `0..n`, each writing its rows' `m`
/// results into its piece of the `[n, m]` output: on the installed [`super::Team`] where
/// there is one (chunks claimed from a counter), else two chunks per rayon thread.
fn par_rows(
    n: usize,
    m: usize,
    work_per_row: usize,
    f: impl Fn(Range<usize>, &mut [f32]) + Sync,
) -> Vec<f32> {
    let mut out = vec![0f32; n * m];
    if n * work_per_row < PAR_MIN_WORK || n < 2 {
        f(0..n, &mut out);
        return out;
    }
    if on_team(n, m, &f, &mut out) {
        return out;
    }
    let threads = rayon::current_num_threads().max(1);
    if threads == 1 {
        f(0..n, &mut out);
        return out;
    }
    // Two chunks per thread, so work-stealing evens out a worker that another process
    // preempts (2-thread SmolLM2 decode on a shared 2-core VM: median 603.5 vs 623.8 ms
    // per 64 tokens with one chunk per thread, prefill 338 vs 356 ms; 5 alternated runs);
    // an even row count per chunk, so the kernels' weight-row pairs never straddle two.
    let chunk = n.div_ceil(threads * 2).next_multiple_of(2);
    out.par_chunks_mut(chunk * m)
        .enumerate()
        .for_each(|(c, o)| f(c * chunk..(c * chunk + chunk).min(n), o));
    out
}

/// Chunks per team thread: enough that a worker waking late, or preempted, leaves its
/// share to the others; few enough that each streams a long run of weight rows.
const TEAM_CHUNKS_PER_THREAD: usize = 4;

/// [`par_rows`] on the installed team; `false` (nothing written) where there is none.
fn on_team(
    n: usize,
    m: usize,
    f: &(impl Fn(Range<usize>, &mut [f32]) + Sync),
    out: &mut [f32],
) -> bool {
    let chunk = n
        .div_ceil(TEAM_CHUNKS_PER_THREAD * super::team::threads().max(1))
        .next_multiple_of(2);
    let chunks = n.div_ceil(chunk);
    let base = super::team::SharedOut::new(out);
    super::team::for_each_chunk(chunks, &|c| {
        let rows = c * chunk..(c * chunk + chunk).min(n);
        // SAFETY: `for_each_chunk` runs each `c` exactly once, so the row ranges (and the
        // `[rows.start * m, rows.end * m)` pieces of `out`, which has `n * m` values) are
        // disjoint and in bounds.
        let o = unsafe { base.piece(rows.start * m, rows.len() * m) };
        f(rows, o);
    })
}

/// `[n, m]` → `[m, n]`, in bands of 16 columns of the result (each written a cache line
/// at a time while the 16 source rows stay in L1).
fn transpose(yt: Vec<f32>, n: usize, m: usize) -> Vec<f32> {
    if m == 1 || n == 1 {
        return yt;
    }
    const BAND: usize = 16;
    let mut y = vec![0f32; n * m];
    for j0 in (0..n).step_by(BAND) {
        let src = &yt[j0 * m..(j0 + BAND).min(n) * m];
        for (i, yrow) in y.chunks_exact_mut(n).enumerate() {
            for (o, s) in yrow[j0..].iter_mut().zip(src.chunks_exact(m)) {
                *o = s[i];
            }
        }
    }
    y
}

/// F32 / F16 / BF16 weights: each row dequantized (exact) and dotted in f32.
fn float_rows(w: &QMatrix, x: &[f32], m: usize) -> Result<Vec<f32>> {
    let k = w.cols;
    let err = std::sync::Mutex::new(None);
    let yt = par_rows(w.rows, m, m * k, |range, out| {
        let mut buf = vec![0f32; k];
        w.for_rows(range.clone(), |j, row| {
            if let Err(e) = blocks::dequantize(w.dtype, row, &mut buf) {
                *err.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                return;
            }
            for (i, xi) in x.chunks_exact(k).enumerate() {
                out[(j - range.start) * m + i] = dot_f32(xi, &buf);
            }
        })
    });
    match err.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(e) => Err(e),
        None => Ok(yt),
    }
}

/// `a · b` with eight partial sums (vectorises).
fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (u, v) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += u[l] * v[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Block dtypes without a kernel here: candle's activation quantization and `vec_dot`.
fn candle_rows<T: Plain>(w: &QMatrix, x: &[f32], m: usize) -> Result<Vec<f32>>
where
    T::VecDotType: Send + Sync,
{
    let k = w.cols;
    let nb = k / T::BLCK_SIZE;
    let mut xq = vec![T::VecDotType::zeros(); m * nb];
    for (xi, qi) in x.chunks_exact(k).zip(xq.chunks_exact_mut(nb.max(1))) {
        T::VecDotType::from_float(xi, qi);
    }
    let err = std::sync::Mutex::new(None);
    let yt = par_rows(w.rows, m, m * k, |range, out| {
        w.for_rows(range.clone(), |j, row| match blocks::cast::<T>(row) {
            Ok(wr) => {
                for (i, qi) in xq.chunks_exact(nb).enumerate() {
                    out[(j - range.start) * m + i] = vec_dot_any::<T>(wr, qi);
                }
            }
            Err(e) => *err.lock().unwrap_or_else(|p| p.into_inner()) = Some(e),
        })
    });
    match err.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(e) => Err(e),
        None => Ok(yt),
    }
}

/// candle's `vec_dot` for any block count: its 32-block dots assert an even count (debug
/// builds), so an odd last block is paired with an all-zero one (scale 0, adds 0).
fn vec_dot_any<T: GgmlType>(w: &[T], x: &[T::VecDotType]) -> f32 {
    let nb = w.len().min(x.len());
    let even = nb - nb % 2;
    let head = if even > 0 {
        T::vec_dot(even * T::BLCK_SIZE, &w[..even], &x[..even])
    } else {
        0.0
    };
    if even == nb {
        return head;
    }
    let w2 = [w[even].clone(), T::zeros()];
    let x2 = [x[even].clone(), T::VecDotType::zeros()];
    head + T::vec_dot(2 * T::BLCK_SIZE, &w2, &x2)
}
