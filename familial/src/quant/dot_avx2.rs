//! The AVX2 + FMA + F16C build of `dot.rs`'s integer dot products (llama.cpp's
//! `ggml_vec_dot_q4_1_q8_1` / `q4_0_q8_0` / `q8_0_q8_0` scheme): per 32-block, the
//! weight's integers are widened to 32 bytes once and meet each of the `R` activation rows
//! with `vpmaddubsw` (unsigned × signed byte pairs → i16, no saturation for these
//! ranges) and `vpmaddwd` (→ 8 × i32), then one FMA with `d_w d_x` into an f32 lane
//! accumulator per row. Blocks alternate between two accumulators so the FMA latency is
//! not the loop's limit.

use std::arch::x86_64::*;

use super::act::{Q8Row, QK};
use super::dot::Kind;

/// `w · x[r]` for each `r` (see `dot::dots`).
///
/// # Panics
/// If `w` is not whole blocks or an activation row is shorter than `w` (caller bugs).
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn dots<const R: usize>(kind: Kind, w: &[u8], x: &[Q8Row<'_>; R]) -> [f32; R] {
    let bb = kind.block_bytes();
    let nb = w.len() / bb;
    assert!(
        w.len() == nb * bb
            && x.iter()
                .all(|r| r.qs.len() >= nb * QK && r.d.len() >= nb && r.s.len() >= nb),
        "quant dot: weight row of {} bytes does not fit its activations",
        w.len()
    );
    match kind {
        Kind::Q4_0 => q4::<R, false>(w, x, nb),
        Kind::Q4_1 => q4::<R, true>(w, x, nb),
        Kind::Q8_0 => q8_0::<R>(w, x, nb),
    }
}

/// Sum of the 8 lanes.
#[target_feature(enable = "avx2,fma,f16c")]
fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps::<0b01>(s, s));
    _mm_cvtss_f32(s)
}

/// The f16 at `p` as f32.
///
/// # Safety
/// `p..p + 2` must be readable, and the CPU must have F16C.
#[inline(always)]
unsafe fn f16_at(p: *const u8) -> f32 {
    // SAFETY: the caller guarantees 2 readable bytes (unaligned reads are allowed) and F16C.
    unsafe {
        let bits = p.cast::<u16>().read_unaligned();
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    }
}

/// Raw pointers to the `R` activation rows' `qs`, `d` and `s` (lengths checked in `dots`).
struct Rows<const R: usize> {
    qs: [*const i8; R],
    d: [*const f32; R],
    s: [*const f32; R],
}

impl<const R: usize> Rows<R> {
    fn new(x: &[Q8Row<'_>; R]) -> Self {
        Rows {
            qs: std::array::from_fn(|r| x[r].qs.as_ptr()),
            d: std::array::from_fn(|r| x[r].d.as_ptr()),
            s: std::array::from_fn(|r| x[r].s.as_ptr()),
        }
    }
}

/// One Q4 block (bytes at `p`, index `b`) against every row, into `acc` and `off`.
///
/// Inlined into the `#[target_feature]` loops below, which compile it for AVX2.
///
/// # Safety
/// `p` must start a whole Q4_0 / Q4_1 block, `b` be below the rows' block count, and the
/// CPU have AVX2, FMA and F16C.
#[allow(clippy::needless_range_loop)]
#[inline(always)]
unsafe fn q4_block<const R: usize, const MIN: bool>(
    p: *const u8,
    b: usize,
    x: &Rows<R>,
    acc: &mut [__m256; R],
    off: &mut [f32; R],
) {
    // SAFETY (all reads): the caller guarantees the block's 18 or 20 bytes and that every
    // row holds block `b` (32 values of `qs`, one `d` and one `s`).
    unsafe {
        let d = f16_at(p);
        let (m, qp) = if MIN {
            (f16_at(p.add(2)), p.add(4))
        } else {
            (-8.0 * d, p.add(2))
        };
        let t = _mm_loadu_si128(qp.cast());
        // Low nibbles are values 0..16 of the block, high nibbles 16..32.
        let q = _mm256_and_si256(
            _mm256_set_m128i(_mm_srli_epi16::<4>(t), t),
            _mm256_set1_epi8(15),
        );
        for r in 0..R {
            let xq = _mm256_loadu_si256(x.qs[r].add(b * QK).cast());
            let s = _mm256_madd_epi16(_mm256_maddubs_epi16(q, xq), _mm256_set1_epi16(1));
            let sc = _mm256_set1_ps(d * *x.d[r].add(b));
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), sc, acc[r]);
            off[r] += m * *x.s[r].add(b);
        }
    }
}

/// Q4_0 (`MIN = false`) or Q4_1 (`MIN = true`) blocks against Q8 activations.
#[target_feature(enable = "avx2,fma,f16c")]
fn q4<const R: usize, const MIN: bool>(w: &[u8], x: &[Q8Row<'_>; R], nb: usize) -> [f32; R] {
    let bb = if MIN { 20 } else { 18 };
    let rows = Rows::new(x);
    let (mut acc0, mut acc1) = ([_mm256_setzero_ps(); R], [_mm256_setzero_ps(); R]);
    let (mut off0, mut off1) = ([0f32; R], [0f32; R]);
    let wp = w.as_ptr();
    let mut b = 0;
    while b + 2 <= nb {
        // SAFETY: b + 1 < nb; `w` holds nb whole blocks and every row nb blocks (`dots`).
        unsafe {
            q4_block::<R, MIN>(wp.add(b * bb), b, &rows, &mut acc0, &mut off0);
            q4_block::<R, MIN>(wp.add((b + 1) * bb), b + 1, &rows, &mut acc1, &mut off1);
        }
        b += 2;
    }
    if b < nb {
        // SAFETY: as above, b < nb.
        unsafe { q4_block::<R, MIN>(wp.add(b * bb), b, &rows, &mut acc0, &mut off0) };
    }
    std::array::from_fn(|r| hsum(_mm256_add_ps(acc0[r], acc1[r])) + (off0[r] + off1[r]))
}

/// One Q8_0 block: signed × signed through `|w| × sign(w)·x`.
///
/// # Safety
/// As [`q4_block`], for a 34-byte Q8_0 block.
// `r` indexes the accumulators and the rows' pointers at once.
#[allow(clippy::needless_range_loop)]
#[inline(always)]
unsafe fn q8_block<const R: usize>(p: *const u8, b: usize, x: &Rows<R>, acc: &mut [__m256; R]) {
    // SAFETY (all reads): as in `q4_block`.
    unsafe {
        let d = f16_at(p);
        let wq = _mm256_loadu_si256(p.add(2).cast());
        // |w| as unsigned bytes (-128 → 128); activations are within ±127, so the i16
        // pair sums stay below 2 · 128 · 127.
        let aw = _mm256_sign_epi8(wq, wq);
        for r in 0..R {
            let xq = _mm256_loadu_si256(x.qs[r].add(b * QK).cast());
            let prod = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(xq, wq));
            let s = _mm256_madd_epi16(prod, _mm256_set1_epi16(1));
            let sc = _mm256_set1_ps(d * *x.d[r].add(b));
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), sc, acc[r]);
        }
    }
}

/// Q8_0 blocks against Q8 activations.
#[target_feature(enable = "avx2,fma,f16c")]
fn q8_0<const R: usize>(w: &[u8], x: &[Q8Row<'_>; R], nb: usize) -> [f32; R] {
    let rows = Rows::new(x);
    let (mut acc0, mut acc1) = ([_mm256_setzero_ps(); R], [_mm256_setzero_ps(); R]);
    let wp = w.as_ptr();
    let mut b = 0;
    while b + 2 <= nb {
        // SAFETY: b + 1 < nb; `w` holds nb whole blocks and every row nb blocks (`dots`).
        unsafe {
            q8_block::<R>(wp.add(b * 34), b, &rows, &mut acc0);
            q8_block::<R>(wp.add((b + 1) * 34), b + 1, &rows, &mut acc1);
        }
        b += 2;
    }
    if b < nb {
        // SAFETY: as above, b < nb.
        unsafe { q8_block::<R>(wp.add(b * 34), b, &rows, &mut acc0) };
    }
    std::array::from_fn(|r| hsum(_mm256_add_ps(acc0[r], acc1[r])))
}
