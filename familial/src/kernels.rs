//! A CPU kernel for `x Wᵀ` with few rows in `x`: decode batches, small prefill chunks and
//! grouped-query decode attention (`q Kᵀ` over the KV cache).
//!
//! Candle's CPU matmul hands `x Wᵀ` to the gemm crate, which repacks the whole of `W` on
//! every call once `x` has 2 or more rows: for a `[2048, 384]` weight in cache, 43 µs for
//! 1 row, 284 µs for 2 and 461 µs for 16 on this project's 2-core AMD EPYC
//! (`examples/small_matmul.rs`). Serving rarely has many rows per iteration: a few decodes
//! plus a prefill chunk cut to a time-between-tokens SLO. [`matmul_t`] reads `W` once, row
//! after row, in its checkpoint layout (no copy, no packing), and takes each row's dot
//! product with up to four rows of `x` while the row is in L1, with 2-8 eight-lane
//! accumulators per row of `x` (AVX2 + FMA, detected at run time; a portable loop
//! otherwise). Same example: 2 rows 3.0-4.3× faster than candle with the weight cold and
//! 3.7-8.6× warm, 8 rows 1.5-3.9×, 1 row 0.92-1.01×.
//!
//! [`causal_softmax`] is attention's softmax with the causal mask folded in: each row is
//! normalised over its own visible prefix with a vectorised `exp`, and the masked tail is
//! written as zeros. Candle's path builds a `[len, total]` mask, adds it, and calls libm's
//! `expf` per element through rayon: after 1960 cached positions, 367 µs per layer for an
//! 8-token chunk (24 query rows), a quarter of the whole iteration.
//!
//! Entry points: [`matmul_t`], which `Linear` and attention call for every `x Wᵀ`, and
//! [`causal_softmax`]; both take the kernel when it applies and candle's ops otherwise.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};

/// Above this many rows of `x`, candle's matmul is used: between 16 and 32 rows gemm's
/// packing starts to pay for itself (see `examples/small_matmul.rs`).
pub const MAX_ROWS: usize = 16;

/// `x Wᵀ` for `x` `[.., m, k]` and `w` `[.., n, k]` with the same leading dimensions
/// (result `[.., m, n]`). Runs this module's kernel when `x` has at most [`MAX_ROWS`] rows,
/// both are f32 on the CPU and neither tracks a gradient; otherwise candle's matmul (so
/// training keeps its backward pass). Leading dimensions may have any stride (a narrowed
/// KV cache is read in place); rows that are not contiguous are copied first.
pub fn matmul_t(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    let small = x.rank() >= 2 && w.rank() == x.rank() && x.dim(x.rank() - 2)? <= MAX_ROWS;
    let plain = |t: &Tensor| t.dtype() == DType::F32 && t.device().is_cpu() && !t.track_op();
    if !(small && plain(x) && plain(w)) {
        return x.matmul(&w.t()?);
    }
    let rows = |t: &Tensor| -> candle_core::Result<Tensor> {
        let r = t.rank();
        if t.dims()[r - 1] > 1 && t.stride()[r - 1] != 1 {
            t.contiguous()
        } else {
            Ok(t.clone())
        }
    };
    rows(x)?.apply_op2_no_bwd(&rows(w)?, &MatmulT)
}

struct MatmulT;

/// `(batch, rows, cols)` of a rank ≥ 2 layout whose rows are contiguous, with the element
/// offset of each batch entry's first row and the row stride.
fn rows_of(l: &Layout, what: &str) -> candle_core::Result<(Vec<usize>, usize, usize, usize)> {
    let dims = l.dims();
    let st = l.stride();
    let r = dims.len();
    if r < 2 {
        candle_core::bail!("small matmul: {what} has rank {r}, needs ≥ 2");
    }
    let (rows, cols) = (dims[r - 2], dims[r - 1]);
    if cols > 1 && st[r - 1] != 1 {
        candle_core::bail!("small matmul: {what}'s rows are not contiguous");
    }
    let row_stride = st[r - 2];
    // Offsets of every batch entry (row-major over the leading dimensions).
    let mut offs = vec![l.start_offset()];
    for d in 0..r - 2 {
        let mut next = Vec::with_capacity(offs.len() * dims[d]);
        for &o in &offs {
            for i in 0..dims[d] {
                next.push(o + i * st[d]);
            }
        }
        offs = next;
    }
    Ok((offs, rows, cols, row_stride))
}

impl CustomOp2 for MatmulT {
    fn name(&self) -> &'static str {
        "small-matmul-t"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = s1.as_slice::<f32>()?;
        let w = s2.as_slice::<f32>()?;
        let (xo, m, k, xs) = rows_of(l1, "x")?;
        let (wo, n, wk, ws) = rows_of(l2, "w")?;
        if wk != k
            || xo.len() != wo.len()
            || l1.dims()[..l1.dims().len() - 2] != l2.dims()[..l2.dims().len() - 2]
        {
            candle_core::bail!(
                "small matmul: shapes {:?} and {:?} do not match for x Wᵀ",
                l1.dims(),
                l2.dims()
            );
        }
        let mut out = vec![0f32; xo.len() * m * n];
        for (b, (&xb, &wb)) in xo.iter().zip(&wo).enumerate() {
            let y = &mut out[b * m * n..(b + 1) * m * n];
            let xr = |i: usize| &x[xb + i * xs..xb + i * xs + k];
            let wr = |j: usize| &w[wb + j * ws..wb + j * ws + k];
            if m == 0 || n == 0 {
                continue;
            }
            if x.len() < xb + (m - 1) * xs + k || w.len() < wb + (n - 1) * ws + k {
                candle_core::bail!("small matmul: layout runs past its storage");
            }
            kernel(m, n, &xr, &wr, y);
        }
        let mut shape = l1.dims().to_vec();
        let r = shape.len();
        shape[r - 1] = n;
        Ok((CpuStorage::F32(out), Shape::from(shape)))
    }
}

/// Softmax over the last dimension of `scale × att`, for attention scores `att`
/// `[.., rows, total]` whose rows are blocks of `len` queries at positions
/// `start..start + len` (query heads sharing a KV head, kv-major), with the causal mask
/// applied: query `start + i` sees keys `0..=start + i`, and the rest of its row is zero. Inference only: a tracked `att` (or
/// one that is not f32 on the CPU) takes candle's mask + softmax, which has a backward pass.
pub fn causal_softmax(
    att: &Tensor,
    scale: f64,
    len: usize,
    start: usize,
) -> candle_core::Result<Tensor> {
    let r = att.rank();
    let (rows, total) = (att.dim(r.saturating_sub(2))?, att.dim(r.saturating_sub(1))?);
    if r < 2
        || len == 0
        || rows % len != 0
        || start + len > total
        || !scale.is_finite()
        || scale <= 0.0
    {
        candle_core::bail!(
            "causal softmax: scores of shape {:?} do not hold blocks of {len} queries at \
             positions {start}..{} (or scale {scale} is not a positive number)",
            att.dims(),
            start + len
        );
    }
    if att.dtype() != DType::F32 || !att.device().is_cpu() || att.track_op() {
        let mut m = vec![0f32; len * total];
        for i in 0..len {
            for v in &mut m[i * total + start + i + 1..(i + 1) * total] {
                *v = f32::NEG_INFINITY;
            }
        }
        let mask = Tensor::from_vec(m, (len, total), att.device())?.to_dtype(att.dtype())?;
        let mut blocks = att.dims()[..r - 2].to_vec();
        blocks.extend([rows / len, len, total]);
        let masked = (att * scale)?
            .reshape(blocks)?
            .broadcast_add(&mask)?
            .reshape(att.shape())?;
        let max = masked.max_keepdim(candle_core::D::Minus1)?.detach();
        let e = masked.broadcast_sub(&max)?.exp()?;
        return e.broadcast_div(&e.sum_keepdim(candle_core::D::Minus1)?);
    }
    att.contiguous()?.apply_op1_no_bwd(&CausalSoftmax {
        scale: scale as f32,
        len,
        start,
    })
}

struct CausalSoftmax {
    scale: f32,
    len: usize,
    start: usize,
}

impl candle_core::CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "causal-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (a, b) = l.contiguous_offsets().ok_or_else(|| {
            candle_core::Error::Msg("causal softmax: input not contiguous".into())
        })?;
        let x = &s.as_slice::<f32>()?[a..b];
        let total = l.dims()[l.dims().len() - 1];
        let mut out = vec![0f32; x.len()];
        #[cfg(target_arch = "x86_64")]
        let fma = x86::available();
        for (row, (xr, yr)) in x
            .chunks_exact(total)
            .zip(out.chunks_exact_mut(total))
            .enumerate()
        {
            let visible = (self.start + row % self.len + 1).min(total);
            let (xv, yv) = (&xr[..visible], &mut yr[..visible]);
            let max = xv.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            #[cfg(target_arch = "x86_64")]
            let sum = if fma {
                // SAFETY: the CPU has the features `exp_sub_fma` is compiled for.
                unsafe { x86::exp_sub_fma(xv, max, self.scale, yv) }
            } else {
                exp_sub(xv, max, self.scale, yv)
            };
            #[cfg(not(target_arch = "x86_64"))]
            let sum = exp_sub(xv, max, self.scale, yv);
            let inv = 1.0 / sum;
            for v in yv {
                *v *= inv;
            }
        }
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }
}

/// `y = exp((x - max) × scale)`, returning `Σ y` (portable fallback).
fn exp_sub(x: &[f32], max: f32, scale: f32, y: &mut [f32]) -> f32 {
    let mut sum = 0f32;
    for (a, b) in x.iter().zip(y.iter_mut()) {
        *b = ((a - max) * scale).exp();
        sum += *b;
    }
    sum
}

/// `y[i, j] = x_i · w_j` for `i < m`, `j < n`.
fn kernel<'a>(
    m: usize,
    n: usize,
    x: &dyn Fn(usize) -> &'a [f32],
    w: &dyn Fn(usize) -> &'a [f32],
    y: &mut [f32],
) {
    let mut i = 0;
    while i < m {
        // R rows of x × U vectors per row: 4-8 accumulators hide the FMA latency and
        // stay within the 16 vector registers.
        match m - i {
            1 => block::<1, 4>(i, n, x, w, y),
            2 => block::<2, 4>(i, n, x, w, y),
            3 => block::<3, 2>(i, n, x, w, y),
            _ => block::<4, 2>(i, n, x, w, y),
        }
        i += 4;
    }
}

/// Rows `i..i + R` of `x` against every row of `w`, each row of `w` read once, `U`
/// vectors at a time.
fn block<'a, const R: usize, const U: usize>(
    i: usize,
    n: usize,
    x: &dyn Fn(usize) -> &'a [f32],
    w: &dyn Fn(usize) -> &'a [f32],
    y: &mut [f32],
) {
    let xs: [&[f32]; R] = std::array::from_fn(|r| x(i + r));
    #[cfg(target_arch = "x86_64")]
    let fma = x86::available();
    for j in 0..n {
        let wj = w(j);
        #[cfg(target_arch = "x86_64")]
        let d = if fma {
            // SAFETY: the CPU has the features `dots_fma` is compiled for.
            unsafe { x86::dots_fma::<R, U>(&xs, wj) }
        } else {
            dots(&xs, wj)
        };
        #[cfg(not(target_arch = "x86_64"))]
        let d = dots(&xs, wj);
        for (r, v) in d.into_iter().enumerate() {
            y[(i + r) * n + j] = v;
        }
    }
}

/// `x_r · w` for every `r` (portable fallback).
fn dots<const R: usize>(xs: &[&[f32]; R], w: &[f32]) -> [f32; R] {
    std::array::from_fn(|r| {
        let mut acc = [0f32; 8];
        let mut xc = xs[r].chunks_exact(8);
        let mut wc = w.chunks_exact(8);
        for (a, b) in (&mut xc).zip(&mut wc) {
            for l in 0..8 {
                acc[l] += a[l] * b[l];
            }
        }
        let tail: f32 = xc
            .remainder()
            .iter()
            .zip(wc.remainder())
            .map(|(a, b)| a * b)
            .sum();
        acc.iter().sum::<f32>() + tail
    })
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// Whether this CPU runs the `*_fma` functions below (AVX2 and FMA).
    pub(super) fn available() -> bool {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }

    /// `exp` of 8 lanes (Cephes' single-precision polynomial, about 1 ulp on the range
    /// softmax uses; inputs below -87.3 give 0).
    #[target_feature(enable = "avx2,fma")]
    fn exp8(x: __m256) -> __m256 {
        let lo = _mm256_set1_ps(-87.336_55);
        let under = _mm256_cmp_ps::<_CMP_LT_OQ>(x, lo);
        let x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.376_26)), lo);
        // n = round(x / ln 2); r = x - n ln 2 in two steps.
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm256_set1_ps(1.987_569_1e-4);
        for c in [
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            0.166_666_65,
            0.5,
        ] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let y = _mm256_fmadd_ps(
            _mm256_mul_ps(p, r),
            r,
            _mm256_add_ps(r, _mm256_set1_ps(1.0)),
        );
        // × 2^n through the exponent bits.
        let e = _mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        ));
        let y = _mm256_mul_ps(y, _mm256_castsi256_ps(e));
        _mm256_andnot_ps(under, y)
    }

    /// `y = exp((x - max) × scale)`, returning `Σ y`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn exp_sub_fma(x: &[f32], max: f32, scale: f32, y: &mut [f32]) -> f32 {
        assert_eq!(x.len(), y.len());
        let m = _mm256_set1_ps(max);
        let sc = _mm256_set1_ps(scale);
        let mut acc = _mm256_setzero_ps();
        let mut c = 0;
        while c + 8 <= x.len() {
            // SAFETY: c + 8 ≤ len of both slices; unaligned loads and stores are allowed.
            let v = unsafe { _mm256_loadu_ps(x.as_ptr().add(c)) };
            let e = exp8(_mm256_mul_ps(_mm256_sub_ps(v, m), sc));
            unsafe { _mm256_storeu_ps(y.as_mut_ptr().add(c), e) };
            acc = _mm256_add_ps(acc, e);
            c += 8;
        }
        let s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps::<1>(acc));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<0b01>(s, s));
        let mut sum = _mm_cvtss_f32(s);
        for i in c..x.len() {
            y[i] = ((x[i] - max) * scale).exp();
            sum += y[i];
        }
        sum
    }

    /// `x_r · w` for every `r`, with 256-bit fused multiply-adds: `U` vectors of 8 lanes
    /// in flight per row of `x` (`R × U` independent accumulators), while `w` is read
    /// once, front to back (prefetcher-friendly).
    // `u` and `r` index accumulators and pointer offsets at once.
    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn dots_fma<const R: usize, const U: usize>(
        xs: &[&[f32]; R],
        w: &[f32],
    ) -> [f32; R] {
        let k = w.len();
        assert!(xs.iter().all(|v| v.len() == k));
        let mut acc = [[_mm256_setzero_ps(); U]; R];
        let mut c = 0;
        while c + 8 * U <= k {
            for u in 0..U {
                // SAFETY: every slice holds k ≥ c + 8U elements (asserted above);
                // unaligned loads are allowed.
                let wv = unsafe { _mm256_loadu_ps(w.as_ptr().add(c + 8 * u)) };
                for r in 0..R {
                    let xv = unsafe { _mm256_loadu_ps(xs[r].as_ptr().add(c + 8 * u)) };
                    acc[r][u] = _mm256_fmadd_ps(xv, wv, acc[r][u]);
                }
            }
            c += 8 * U;
        }
        while c + 8 <= k {
            // SAFETY: as above, k ≥ c + 8.
            let wv = unsafe { _mm256_loadu_ps(w.as_ptr().add(c)) };
            for r in 0..R {
                let xv = unsafe { _mm256_loadu_ps(xs[r].as_ptr().add(c)) };
                acc[r][0] = _mm256_fmadd_ps(xv, wv, acc[r][0]);
            }
            c += 8;
        }
        std::array::from_fn(|r| {
            let a = &acc[r];
            let v = a[1..].iter().fold(a[0], |s, &v| _mm256_add_ps(s, v));
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_shuffle_ps::<0b01>(s, s));
            let mut t = _mm_cvtss_f32(s);
            for i in c..k {
                t = xs[r][i].mul_add(w[i], t);
            }
            t
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
        let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
        let s = b.abs().unwrap().max_all().unwrap();
        d.to_scalar::<f32>().unwrap() / s.to_scalar::<f32>().unwrap().max(1e-6)
    }

    /// Against candle's matmul, for every row count up to the threshold and inner sizes that
    /// are and are not multiples of the vector width.
    #[test]
    fn matches_candle_matmul() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        for k in [1usize, 7, 8, 64, 100, 384] {
            for n in [1usize, 3, 33] {
                let w = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
                for m in 1..=MAX_ROWS {
                    let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
                    let y = matmul_t(&x, &w)?;
                    let r = x.matmul(&w.t()?)?;
                    assert_eq!(y.dims(), r.dims());
                    let e = max_rel(&y, &r);
                    assert!(e < 1e-5, "m={m} n={n} k={k}: relative error {e}");
                }
            }
        }
        Ok(())
    }

    /// Batched with a strided leading dimension, as a narrowed KV cache is.
    #[test]
    fn batched_over_a_narrowed_cache() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let cache = Tensor::randn(0f32, 1.0, (2, 40, 16), &dev)?;
        let k = cache.narrow(1, 0, 29)?;
        let q = Tensor::randn(0f32, 1.0, (2, 3, 16), &dev)?;
        let y = matmul_t(&q, &k)?;
        let r = q.matmul(&k.t()?)?;
        assert_eq!(y.dims(), &[2, 3, 29]);
        assert!(max_rel(&y, &r) < 1e-5);
        Ok(())
    }

    /// Empty operands give empty (or zero) results, not errors.
    #[test]
    fn empty_operands() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (3, 8), &dev)?;
        assert_eq!(
            matmul_t(&Tensor::zeros((0, 8), DType::F32, &dev)?, &w)?.dims(),
            &[0, 3]
        );
        let x = Tensor::randn(0f32, 1.0, (2, 8), &dev)?;
        let none = Tensor::zeros((0, 8), DType::F32, &dev)?;
        assert_eq!(matmul_t(&x, &none)?.dims(), &[2, 0]);
        let y = matmul_t(
            &Tensor::zeros((2, 0), DType::F32, &dev)?,
            &Tensor::zeros((3, 0), DType::F32, &dev)?,
        )?;
        assert_eq!(y.to_vec2::<f32>()?, vec![vec![0f32; 3]; 2]);
        Ok(())
    }

    /// Mismatched inner sizes are an error, not a wrong answer; a column-strided operand
    /// is copied, not misread.
    #[test]
    fn odd_operands() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 8), &dev)?;
        let w = Tensor::randn(0f32, 1.0, (3, 7), &dev)?;
        assert!(matmul_t(&x, &w).is_err());
        assert!(
            matmul_t(&x, &Tensor::new(1f32, &dev)?).is_err(),
            "a scalar weight"
        );
        let wt = Tensor::randn(0f32, 1.0, (8, 3), &dev)?.t()?;
        let r = x.matmul(&wt.contiguous()?.t()?)?;
        assert!(max_rel(&matmul_t(&x, &wt)?, &r) < 1e-5);
        Ok(())
    }

    /// A tracked operand takes candle's matmul, so gradients still flow; more rows than
    /// [`MAX_ROWS`] too.
    #[test]
    fn falls_back_where_the_kernel_does_not_apply() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let w = candle_core::Var::randn(0f32, 1.0, (3, 8), &dev)?;
        let x = Tensor::randn(0f32, 1.0, (2, 8), &dev)?;
        let y = matmul_t(&x, w.as_tensor())?;
        let g = y.sum_all()?.backward()?;
        assert!(
            g.get(w.as_tensor()).is_some(),
            "the weight lost its gradient"
        );
        let big = Tensor::randn(0f32, 1.0, (MAX_ROWS + 1, 8), &dev)?;
        let w = w.as_tensor().detach();
        assert!(max_rel(&matmul_t(&big, &w)?, &big.matmul(&w.t()?)?) < 1e-6);
        Ok(())
    }
}

#[cfg(test)]
mod softmax_tests {
    use super::*;
    use candle_core::Device;

    fn reference(att: &Tensor, len: usize, start: usize) -> Tensor {
        let (rows, total) = att.dims2().unwrap();
        let mut m = vec![0f32; rows * total];
        for r in 0..rows {
            for j in start + r % len + 1..total {
                m[r * total + j] = f32::NEG_INFINITY;
            }
        }
        let mask = Tensor::from_vec(m, (rows, total), &Device::Cpu).unwrap();
        candle_nn::ops::softmax_last_dim(&((att * 0.125).unwrap() + mask).unwrap()).unwrap()
    }

    /// Against candle's mask + softmax: decode rows, a chunk of several grouped heads, a
    /// first chunk (start 0), totals off the vector width, and very negative scores.
    #[test]
    fn matches_mask_plus_softmax() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        for (groups, len, start, total) in [
            (3, 1, 40, 41),
            (3, 8, 1952, 1960),
            (2, 5, 0, 5),
            (1, 7, 10, 17),
        ] {
            let att = (Tensor::randn(0f32, 1.0, (groups * len, total), &dev)? * 240.0)?;
            let y = causal_softmax(&att, 0.125, len, start)?;
            let r = reference(&att, len, start);
            let d = (&y - &r)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(
                d < 1e-6,
                "groups {groups} len {len} start {start}: differs by {d}"
            );
            let sums = y.sum_keepdim(1)?.flatten_all()?.to_vec1::<f32>()?;
            assert!(
                sums.iter().all(|s| (s - 1.0).abs() < 1e-5),
                "rows do not sum to 1: {sums:?}"
            );
        }
        // The vectorised exp against libm's over the range softmax feeds it.
        let x: Vec<f32> = (0..4000).map(|i| -100.0 + i as f32 * 0.025).collect();
        let mut y = vec![0f32; x.len()];
        exp_sub(&x, 0.0, 1.0, &mut y);
        let t = Tensor::new(x.as_slice(), &dev)?.reshape((1, x.len()))?;
        let ours = causal_softmax(&t, 1.0, 1, x.len() - 1)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let sum: f32 = y.iter().sum();
        for (i, (a, b)) in ours.iter().zip(&y).enumerate() {
            let want = b / sum;
            assert!(
                (a - want).abs() <= 2e-6 * want.max(1e-30) + 1e-37,
                "x = {}: {a} vs {want}",
                x[i]
            );
        }
        Ok(())
    }

    /// A tracked input keeps its gradient (candle's differentiable path); bad shapes are
    /// errors.
    #[test]
    fn tracked_and_bad_inputs() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let v = candle_core::Var::randn(0f32, 1.0, (6, 9), &dev)?;
        let y = causal_softmax(v.as_tensor(), 0.125, 3, 6)?;
        let r = reference(&v.as_tensor().detach(), 3, 6);
        assert!((&y.detach() - &r)?.abs()?.max_all()?.to_scalar::<f32>()? < 1e-6);
        let g = (y * Tensor::randn(0f32, 1.0, (6, 9), &dev)?)?
            .sum_all()?
            .backward()?;
        assert!(g.get(v.as_tensor()).is_some());
        let att = Tensor::zeros((6, 9), DType::F32, &dev)?;
        assert!(
            causal_softmax(&att, 1.0, 4, 0).is_err(),
            "6 rows are not blocks of 4"
        );
        assert!(
            causal_softmax(&att, 1.0, 3, 7).is_err(),
            "positions 7..10 exceed 9 keys"
        );
        assert!(causal_softmax(&att, 0.0, 3, 0).is_err(), "scale 0");
        Ok(())
    }
}
