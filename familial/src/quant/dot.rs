//! Integer dot products of `J` weight rows (Q4_0, Q4_1 or Q8_0 blocks, read straight from
//! the file's bytes) with `R` quantized activation rows ([`Q8Row`]): the portable loop
//! every build has, and the dispatch to the x86 ones (`dot_avx2.rs`: AVX2, AVX-VNNI,
//! AVX-512 VNNI) where the CPU has them.
//!
//! Per 32-block `b`, with `qw` the weight's integers and `qx` the activation's:
//! `Σ_b d_w d_x Σ qw·qx + m_w s_x`, where Q4_1's `m_w` is its offset, Q4_0 stores nibbles
//! `qw + 8` so its `m_w = -8 d_w` (and `Σ (qw - 8) qx` becomes the same form), and Q8_0
//! has none. The integer sums are exact; only the f32 accumulation order differs between
//! the portable and SIMD loops (results agree to ~1e-6 relative).

use half::f16;

use super::act::{Q8Row, QK};

/// A weight block format the integer kernels read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// 18 bytes: `d: f16`, 16 bytes of nibbles (`q + 8`).
    Q4_0,
    /// 20 bytes: `d: f16`, `m: f16`, 16 bytes of nibbles.
    Q4_1,
    /// 34 bytes: `d: f16`, 32 × `i8`.
    Q8_0,
}

impl Kind {
    /// Bytes per 32-value block.
    pub(crate) const fn block_bytes(self) -> usize {
        match self {
            Kind::Q4_0 => 18,
            Kind::Q4_1 => 20,
            Kind::Q8_0 => 34,
        }
    }
}

/// Which build of the kernels runs: detected once by `matmul::isa`; tests pick each one
/// the CPU has.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Isa {
    /// Plain Rust, any CPU.
    Portable,
    /// AVX2 + FMA + F16C: `vpmaddubsw` + `vpmaddwd`.
    Avx2,
    /// The same plus AVX-VNNI (VEX `vpdpbusd`).
    AvxVnni,
    /// The same plus AVX-512 VNNI and VL (EVEX `vpdpbusd`).
    Avx512Vnni,
}

/// The little-endian f16 at `b[i..i + 2]`, as f32.
#[inline(always)]
pub(crate) fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

/// `w[j] · x[r]` for each `j`, `r`: each `w[j]` is one weight row of `kind` blocks, each
/// `x[r]` an activation row of the same width. `isa` must be one the CPU has (see
/// `matmul::available`).
///
/// # Panics
/// If a weight row is not whole blocks or an activation row is shorter (caller bugs).
#[inline]
pub(crate) fn tile<const J: usize, const R: usize>(
    kind: Kind,
    w: &[&[u8]; J],
    x: &[Q8Row<'_>; R],
    isa: Isa,
) -> [[f32; R]; J] {
    let bb = kind.block_bytes();
    let nb = w.first().map_or(0, |r| r.len() / bb);
    assert!(
        w.iter().all(|r| r.len() == nb * bb)
            && x.iter().all(|r| r.qs.len() >= nb * QK && r.ds.len() >= nb),
        "quant dot: weight rows do not fit their activations"
    );
    #[cfg(target_arch = "x86_64")]
    if isa != Isa::Portable {
        // SAFETY: lengths checked above; `isa` is one the CPU has (the caller's contract,
        // kept by `matmul`, which only passes detected ones).
        return unsafe { super::dot_avx2::tile::<J, R>(isa, kind, w, x, nb) };
    }
    let _ = isa;
    std::array::from_fn(|j| dots_portable(kind, w[j], x))
}

/// The portable loop: one weight row against `R` activation rows.
pub(crate) fn dots_portable<const R: usize>(kind: Kind, w: &[u8], x: &[Q8Row<'_>; R]) -> [f32; R] {
    let bb = kind.block_bytes();
    let mut acc = [0f32; R];
    let mut off = [0f32; R];
    for (b, wb) in w.chunks_exact(bb).enumerate() {
        let d = f16_at(wb, 0);
        match kind {
            Kind::Q4_0 | Kind::Q4_1 => {
                let (m, qs) = match kind {
                    Kind::Q4_1 => (f16_at(wb, 2), &wb[4..20]),
                    _ => (-8.0 * d, &wb[2..18]),
                };
                for r in 0..R {
                    let xq = &x[r].qs[b * QK..(b + 1) * QK];
                    let mut sumi = 0i32;
                    for j in 0..QK / 2 {
                        sumi += (qs[j] & 15) as i32 * xq[j] as i32
                            + (qs[j] >> 4) as i32 * xq[j + QK / 2] as i32;
                    }
                    let [xd, xs] = x[r].ds[b];
                    acc[r] += sumi as f32 * (d * xd);
                    off[r] += m * xs;
                }
            }
            Kind::Q8_0 => {
                let qs = &wb[2..34];
                for r in 0..R {
                    let xq = &x[r].qs[b * QK..(b + 1) * QK];
                    let sumi: i32 = qs
                        .iter()
                        .zip(xq)
                        .map(|(&a, &c)| a as i8 as i32 * c as i32)
                        .sum();
                    acc[r] += sumi as f32 * (d * x[r].ds[b][0]);
                }
            }
        }
    }
    std::array::from_fn(|r| acc[r] + off[r])
}
