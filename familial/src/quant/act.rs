//! Activations quantized once per call to 8-bit blocks of 32 (llama.cpp's Q8_1 with f32
//! scales): per block, `qs = round(x · 127 / amax)` (ties to even), `d = amax / 127`, and
//! `s = d · Σ qs`, which folds a weight block's offset (Q4_1's `m`, Q4_0's `-8 d`) into
//! one multiply. Weights of every 32-block dtype this module computes with integers
//! (Q4_0, Q4_1, Q8_0) take this one format.
//!
//! `d` and `s` of a block are stored side by side (`ds[b] = [d, s]`), so a kernel loads
//! both with one 64-bit read and meets a Q4_1 block's `[d, m]` pair in one multiply.
//!
//! Entry point: [`Q8Act::quantize`]; kernels read rows through [`Q8Act::row`].

/// Values per activation block.
pub(crate) const QK: usize = 32;

/// `m` rows of `cols` activations, quantized.
#[derive(Default)]
pub(crate) struct Q8Act {
    pub(crate) m: usize,
    pub(crate) cols: usize,
    qs: Vec<i8>,
    ds: Vec<[f32; 2]>,
}

/// One quantized activation row: `qs` (cols values), and per block `[d, s]`.
#[derive(Clone, Copy)]
pub(crate) struct Q8Row<'a> {
    pub(crate) qs: &'a [i8],
    pub(crate) ds: &'a [[f32; 2]],
}

impl Q8Act {
    /// Quantize `x` (`m` rows of `cols`, `cols` a multiple of 32), reusing this buffer's
    /// allocations. `simd` picks the AVX2 build of the same arithmetic (identical results).
    pub(crate) fn quantize(&mut self, x: &[f32], m: usize, cols: usize, simd: bool) {
        debug_assert_eq!(x.len(), m * cols);
        debug_assert_eq!(cols % QK, 0);
        let nb = cols / QK;
        self.m = m;
        self.cols = cols;
        self.qs.resize(m * cols, 0);
        self.ds.resize(m * nb, [0.0; 2]);
        #[cfg(target_arch = "x86_64")]
        if simd {
            // SAFETY: `simd` is only set where `super::matmul::isa()` found AVX2 + FMA.
            unsafe { quantize_avx2(x, &mut self.qs, &mut self.ds) };
            return;
        }
        let _ = simd;
        quantize_blocks(x, &mut self.qs, &mut self.ds);
    }

    /// Row `i`.
    pub(crate) fn row(&self, i: usize) -> Q8Row<'_> {
        let nb = self.cols / QK;
        Q8Row {
            qs: &self.qs[i * self.cols..(i + 1) * self.cols],
            ds: &self.ds[i * nb..(i + 1) * nb],
        }
    }
}

/// The quantization itself, written so the compiler vectorises it when inlined into an
/// AVX2 function (plain IEEE operations: the same bits either way).
#[inline(always)]
fn quantize_blocks(x: &[f32], qs: &mut [i8], ds: &mut [[f32; 2]]) {
    for ((xb, qb), ds) in x
        .chunks_exact(QK)
        .zip(qs.chunks_exact_mut(QK))
        .zip(ds.iter_mut())
    {
        // Eight running maxima (vectorises; a single fold chain does not): the same
        // value, as max over non-NaN values is order-independent and NaN is skipped.
        let mut m8 = [0f32; 8];
        for c in xb.chunks_exact(8) {
            for (m, v) in m8.iter_mut().zip(c) {
                *m = m.max(v.abs());
            }
        }
        let amax = m8.iter().fold(0f32, |a, &v| a.max(v));
        let id = if amax > 0.0 { 127.0 / amax } else { 0.0 };
        let mut sum = 0i32;
        for (q, v) in qb.iter_mut().zip(xb) {
            let r = (v * id).round_ties_even();
            // |r| ≤ 127 for finite input (NaN saturates to 0).
            *q = r as i8;
            sum += *q as i32;
        }
        let d = amax / 127.0;
        *ds = [d, d * sum as f32];
    }
}

/// [`quantize_blocks`] compiled for AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn quantize_avx2(x: &[f32], qs: &mut [i8], ds: &mut [[f32; 2]]) {
    quantize_blocks(x, qs, ds)
}
