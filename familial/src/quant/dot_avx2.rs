//! The x86 builds of `dot.rs`'s integer dot products (llama.cpp's `q4_1_q8_1` /
//! `q4_0_q8_0` / `q8_0_q8_0` scheme), each a register tile of `J` weight rows × `R`
//! activation rows: per 32-block, each weight row's integers are widened to 32 bytes once
//! and meet every activation row (loaded once for all `J` weight rows) in an unsigned ×
//! signed byte dot product to 8 × i32, then one FMA with `d_w d_x` into an f32 lane
//! accumulator per (weight row, activation row).
//!
//! The byte dot is `vpmaddubsw` + `vpmaddwd` (AVX2) or one `vpdpbusd` (AVX-VNNI's VEX
//! or AVX-512 VNNI's EVEX form, through `asm!`): the same exact integers. Scales are handled
//! in one 128-bit multiply per (block, activation row): the weights' `[d, m]` pairs
//! (`[d_0, m_0, d_1, m_1]`, F16C) times the activation's `[d, s, d, s]`, giving both
//! rows' `d_w d_x` (broadcast into the FMA) and `m_w s_x` (summed in a vector, read at
//! the end).
//!
//! Even and odd blocks accumulate separately and meet only at the end, in the order of the
//! one-row kernels these replaced: results are bit-identical to them (and to each other
//! across the three instruction sets). That order matters here: SmolLM2's logits are
//! sensitive enough to activation-rounding flips that a single-accumulator order moved
//! the `smollm2` test's worst |Δlogit| against llama.cpp from 0.92 to 1.21.

use std::arch::x86_64::*;

use super::act::{Q8Row, QK};
use super::dot::{Isa, Kind};

/// Bytes ahead of the current block that the weight rows are prefetched into L1: a decode
/// token streams ~96 MB of SmolLM2-135M weights, and the hardware prefetcher alone (it
/// stops at 4 KiB pages) left the loop waiting on memory. Measured on the whole-token
/// loop of `examples/quant_matmul.rs` (1 thread): none 16.8-19.8 ms, 768 B 12.0-13.2,
/// 2048 B 9.9-11.1, 3072 B 9.2-10.7.
const PREFETCH: usize = 2048;

/// The byte dot product of 32 unsigned weight bytes with 32 signed activation bytes, as
/// 8 × i32 sums of 4 adjacent products.
trait ByteDot {
    /// # Safety
    /// The CPU must have the instructions the implementation uses.
    unsafe fn dot(w: __m256i, x: __m256i) -> __m256i;
}

struct Avx2;
struct AvxVnni;
struct Avx512Vnni;

impl ByteDot for Avx2 {
    #[inline(always)]
    unsafe fn dot(w: __m256i, x: __m256i) -> __m256i {
        // SAFETY: the caller guarantees AVX2. No saturation: weights ≤ 128 (Q8_0's |w|) or
        // ≤ 15, activations within ±127, so a pair sums to at most 2 · 128 · 127.
        unsafe { _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1)) }
    }
}

// VNNI through `asm!`: the intrinsics and the `avxvnni` / `avx512*` target features need
// Rust 1.89, the workspace builds with 1.85. The kernels around them are AVX2 code.
impl ByteDot for AvxVnni {
    #[inline(always)]
    unsafe fn dot(w: __m256i, x: __m256i) -> __m256i {
        // SAFETY: the caller guarantees AVX-VNNI.
        unsafe { dpbusd_vex(w, x) }
    }
}

impl ByteDot for Avx512Vnni {
    #[inline(always)]
    unsafe fn dot(w: __m256i, x: __m256i) -> __m256i {
        // SAFETY: the caller guarantees AVX-512 VNNI and VL.
        unsafe { dpbusd_evex(w, x) }
    }
}

/// `vpdpbusd` from zero in one encoding.
macro_rules! dpbusd_fn {
    ($name:ident, $insn:literal, $doc:literal) => {
        #[doc = $doc]
        ///
        /// # Safety
        /// The CPU must have the instruction.
        #[target_feature(enable = "avx2")]
        #[inline]
        unsafe fn $name(w: __m256i, x: __m256i) -> __m256i {
            let mut acc = _mm256_setzero_si256();
            // SAFETY: register-only instruction the caller guarantees the CPU has.
            unsafe {
                std::arch::asm!(
                    $insn,
                    acc = inout(ymm_reg) acc,
                    w = in(ymm_reg) w,
                    x = in(ymm_reg) x,
                    options(pure, nomem, nostack, preserves_flags)
                );
            }
            acc
        }
    };
}

dpbusd_fn!(
    dpbusd_vex,
    "{{vex}} vpdpbusd {acc}, {w}, {x}",
    "`vpdpbusd`, VEX (AVX-VNNI)."
);
dpbusd_fn!(
    dpbusd_evex,
    "vpdpbusd {acc}, {w}, {x}",
    "`vpdpbusd`, EVEX (AVX-512 VNNI + VL)."
);

/// `w[j] · x[r]` with the kernels of `isa` (not `Portable`).
///
/// # Safety
/// The CPU must have `isa`'s features; every `w[j]` must hold `nb` whole `kind` blocks and
/// every `x[r]` at least `nb` blocks (`dot::tile` checks both).
#[inline]
pub(crate) unsafe fn tile<const J: usize, const R: usize>(
    isa: Isa,
    kind: Kind,
    w: &[&[u8]; J],
    x: &[Q8Row<'_>; R],
    nb: usize,
) -> [[f32; R]; J] {
    let wp: [*const u8; J] = std::array::from_fn(|j| w[j].as_ptr());
    let rows = Rows::new(x);
    // SAFETY: forwarded from the caller.
    unsafe {
        match isa {
            Isa::Avx512Vnni => tile_avx512vnni::<J, R>(kind, &wp, &rows, nb),
            Isa::AvxVnni => tile_avxvnni::<J, R>(kind, &wp, &rows, nb),
            _ => tile_avx2::<J, R>(kind, &wp, &rows, nb),
        }
    }
}

macro_rules! tile_fn {
    ($name:ident, $features:literal, $dot:ty) => {
        /// `tile` compiled for one instruction set.
        ///
        /// # Safety
        /// As `tile`.
        #[target_feature(enable = $features)]
        unsafe fn $name<const J: usize, const R: usize>(
            kind: Kind,
            w: &[*const u8; J],
            x: &Rows<R>,
            nb: usize,
        ) -> [[f32; R]; J] {
            // SAFETY: forwarded from the caller; this function has the features.
            unsafe {
                match kind {
                    Kind::Q4_0 => q4::<$dot, J, R, false>(w, x, nb),
                    Kind::Q4_1 => q4::<$dot, J, R, true>(w, x, nb),
                    Kind::Q8_0 => q8_0::<$dot, J, R>(w, x, nb),
                }
            }
        }
    };
}

tile_fn!(tile_avx2, "avx2,fma,f16c", Avx2);
tile_fn!(tile_avxvnni, "avx2,fma,f16c", AvxVnni);
tile_fn!(tile_avx512vnni, "avx2,fma,f16c", Avx512Vnni);

/// Raw pointers to the `R` activation rows' `qs` and `ds`.
struct Rows<const R: usize> {
    qs: [*const i8; R],
    ds: [*const [f32; 2]; R],
}

impl<const R: usize> Rows<R> {
    fn new(x: &[Q8Row<'_>; R]) -> Self {
        Rows {
            qs: std::array::from_fn(|r| x[r].qs.as_ptr()),
            ds: std::array::from_fn(|r| x[r].ds.as_ptr()),
        }
    }
}

/// Sum of the 8 lanes.
#[inline(always)]
unsafe fn hsum(v: __m256) -> f32 {
    // SAFETY: register-only AVX operations; the caller has AVX2.
    unsafe {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<0b01>(s, s));
        _mm_cvtss_f32(s)
    }
}

/// Lane `2j` of `v` (lanes 0 and 2 hold the two weight rows' `d_w d_x`) in all 8 lanes.
#[inline(always)]
unsafe fn scale_of(v: __m128, j: usize) -> __m256 {
    // SAFETY: register-only AVX2 operations; the caller has AVX2.
    unsafe {
        if j == 0 {
            _mm256_broadcastss_ps(v)
        } else {
            _mm256_broadcastss_ps(_mm_movehl_ps(v, v))
        }
    }
}

/// Prefetch the cache line `PREFETCH` bytes past `p` into L1 (a hint: any address is
/// allowed).
#[inline(always)]
unsafe fn prefetch(p: *const u8) {
    // SAFETY: prefetches never fault; `wrapping_add` keeps the address computation
    // defined past the end of the row.
    unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH).cast()) }
}

/// Accumulators of one block parity: per (weight row, activation row) 8 f32 lanes, and
/// per activation row the `[_, m_0 s_x, _, m_1 s_x]` sums.
struct Acc<const J: usize, const R: usize> {
    v: [[__m256; R]; J],
    off: [__m128; R],
}

impl<const J: usize, const R: usize> Acc<J, R> {
    #[inline(always)]
    unsafe fn new() -> Self {
        // SAFETY: register-only; the caller has AVX.
        unsafe {
            Acc {
                v: [[_mm256_setzero_ps(); R]; J],
                off: [_mm_setzero_ps(); R],
            }
        }
    }

    /// `Σ lanes (self + other)` plus, with `OFF` (Q4 rows), the offsets: the reduction order of
    /// the kernels this replaced (bit-identical results).
    #[allow(clippy::needless_range_loop)]
    #[inline(always)]
    unsafe fn finish<const OFF: bool>(&self, other: &Self) -> [[f32; R]; J] {
        // SAFETY: register-only; the caller has AVX.
        unsafe {
            let mut out = [[0f32; R]; J];
            for r in 0..R {
                let (mut o0, mut o1) = ([0f32; 4], [0f32; 4]);
                _mm_storeu_ps(o0.as_mut_ptr(), self.off[r]);
                _mm_storeu_ps(o1.as_mut_ptr(), other.off[r]);
                for j in 0..J {
                    out[j][r] = hsum(_mm256_add_ps(self.v[j][r], other.v[j][r]));
                    if OFF {
                        out[j][r] += o0[2 * j + 1] + o1[2 * j + 1];
                    }
                }
            }
            out
        }
    }
}

/// `block(b, acc)` for every block `b < nb`, even and odd blocks into two sets of
/// accumulators (latency, and the summation order of the kernels this replaced), then
/// the tile's sums (with the Q4 offsets where `OFF`).
#[inline(always)]
unsafe fn over_blocks<const J: usize, const R: usize, const OFF: bool>(
    nb: usize,
    mut block: impl FnMut(usize, &mut Acc<J, R>),
) -> [[f32; R]; J] {
    // SAFETY: register-only setup and reduction; the caller has AVX2.
    unsafe {
        let (mut a0, mut a1) = (Acc::<J, R>::new(), Acc::<J, R>::new());
        let mut b = 0;
        while b + 2 <= nb {
            block(b, &mut a0);
            block(b + 1, &mut a1);
            b += 2;
        }
        if b < nb {
            block(b, &mut a0);
        }
        a0.finish::<OFF>(&a1)
    }
}

/// Q4_0 (`MIN = false`) or Q4_1 (`MIN = true`) rows against Q8 activations.
///
/// # Safety
/// As `tile`, with the features `D` needs plus AVX2, FMA and F16C.
#[inline(always)]
unsafe fn q4<D: ByteDot, const J: usize, const R: usize, const MIN: bool>(
    w: &[*const u8; J],
    x: &Rows<R>,
    nb: usize,
) -> [[f32; R]; J] {
    // SAFETY: `over_blocks` passes only b < nb (the caller's contract covers those).
    unsafe {
        over_blocks::<J, R, true>(
            nb,
            #[inline(always)]
            |b, acc| q4_block::<D, J, R, MIN>(w, x, b, acc),
        )
    }
}

/// Block `b` of Q4 rows `w` against activation rows `x`, into `acc`.
///
/// # Safety
/// As [`q4`], with `b < nb`.
#[allow(clippy::needless_range_loop)]
#[inline(always)]
unsafe fn q4_block<D: ByteDot, const J: usize, const R: usize, const MIN: bool>(
    w: &[*const u8; J],
    x: &Rows<R>,
    b: usize,
    acc: &mut Acc<J, R>,
) {
    let bb = if MIN { 20 } else { 18 };
    // SAFETY (all reads): block `b` of every weight row (bb bytes at w[j] + b·bb) and of
    // every activation row (32 qs at b·32, one ds pair at b) exist (the caller's
    // contract).
    unsafe {
        let p: [*const u8; J] = std::array::from_fn(|j| w[j].add(b * bb));
        if b % 3 == 0 {
            for j in 0..J {
                prefetch(p[j]);
            }
        }
        // [d_0, m_0, d_1, m_1] as f16 in the low 64 bits.
        let raw = |j: usize| -> i32 {
            if MIN {
                p[j].cast::<i32>().read_unaligned()
            } else {
                let d = p[j].cast::<u16>().read_unaligned() as i32;
                d | (d << 16)
            }
        };
        let h = if J == 2 {
            _mm_set_epi32(0, 0, raw(1), raw(0))
        } else {
            _mm_cvtsi32_si128(raw(0))
        };
        let mut dm = _mm_cvtph_ps(h);
        if !MIN {
            // Q4_0's implicit offset: m = -8 d.
            dm = _mm_mul_ps(dm, _mm_setr_ps(1.0, -8.0, 1.0, -8.0));
        }
        let mask = _mm256_set1_epi8(15);
        // Plain loops, not `array::from_fn`: a closure does not inherit this function's
        // target features, so intrinsics inside one compile to out-of-line calls (measured:
        // ~60% of batched matmul time went to such calls).
        let mut q = [_mm256_setzero_si256(); J];
        for j in 0..J {
            let t = _mm_loadu_si128(p[j].add(bb - 16).cast());
            // Low nibbles are values 0..16 of the block, high nibbles 16..32.
            q[j] = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16::<4>(t), t), mask);
        }
        for r in 0..R {
            let xq = _mm256_loadu_si256(x.qs[r].add(b * QK).cast());
            // [d_x, s_x, d_x, s_x] × [d_0, m_0, d_1, m_1]
            let xds = _mm_castpd_ps(_mm_loaddup_pd(x.ds[r].add(b).cast()));
            let prod = _mm_mul_ps(dm, xds);
            acc.off[r] = _mm_add_ps(acc.off[r], prod);
            for j in 0..J {
                let s = D::dot(q[j], xq);
                acc.v[j][r] =
                    _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), scale_of(prod, j), acc.v[j][r]);
            }
        }
    }
}

/// Q8_0 rows against Q8 activations.
///
/// # Safety
/// As [`q4`], for 34-byte Q8_0 blocks.
#[inline(always)]
unsafe fn q8_0<D: ByteDot, const J: usize, const R: usize>(
    w: &[*const u8; J],
    x: &Rows<R>,
    nb: usize,
) -> [[f32; R]; J] {
    // SAFETY: as in `q4`.
    unsafe {
        over_blocks::<J, R, false>(
            nb,
            #[inline(always)]
            |b, acc| q8_block::<D, J, R>(w, x, b, acc),
        )
    }
}

/// Block `b` of Q8_0 rows: signed × signed through `|w| × sign(w)·x`.
///
/// # Safety
/// As [`q4_block`], for 34-byte Q8_0 blocks.
#[allow(clippy::needless_range_loop)]
#[inline(always)]
unsafe fn q8_block<D: ByteDot, const J: usize, const R: usize>(
    w: &[*const u8; J],
    x: &Rows<R>,
    b: usize,
    acc: &mut Acc<J, R>,
) {
    // SAFETY (all reads): as in `q4_block`, for 34-byte blocks.
    unsafe {
        let p: [*const u8; J] = std::array::from_fn(|j| w[j].add(b * 34));
        if b % 2 == 0 {
            for j in 0..J {
                prefetch(p[j]);
            }
        }
        let raw = |j: usize| p[j].cast::<u16>().read_unaligned() as i32;
        // [d_0, _, d_1, _]: the zero high halves of each 32-bit lane convert to 0.0.
        let h = if J == 2 {
            _mm_set_epi32(0, 0, raw(1), raw(0))
        } else {
            _mm_cvtsi32_si128(raw(0))
        };
        let d = _mm_cvtph_ps(h);
        // Loops, not `array::from_fn` closures (see `q4_block`).
        let mut wq = [_mm256_setzero_si256(); J];
        // |w| as unsigned bytes (-128 → 128).
        let mut aw = [_mm256_setzero_si256(); J];
        for j in 0..J {
            wq[j] = _mm256_loadu_si256(p[j].add(2).cast());
            aw[j] = _mm256_sign_epi8(wq[j], wq[j]);
        }
        for r in 0..R {
            let xq = _mm256_loadu_si256(x.qs[r].add(b * QK).cast());
            let prod = _mm_mul_ps(d, _mm_set1_ps((*x.ds[r].add(b))[0]));
            for j in 0..J {
                let s = D::dot(aw[j], _mm256_sign_epi8(xq, wq[j]));
                acc.v[j][r] =
                    _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), scale_of(prod, j), acc.v[j][r]);
            }
        }
    }
}
