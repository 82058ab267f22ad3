//! Causal grouped-query attention for inference, computed row by row in a fixed order.
//!
//! Every output row depends only on its own query, its position and the cached keys and
//! values — never on how many rows share the call. That makes a batched verification of
//! speculative drafts (several rows) bit-identical to single-token decoding (one row), which
//! a quantized model needs: activations are rounded to 8-bit blocks after every layer, so a
//! last-bit difference from another summation order can move a rounding step and, at a
//! near tie, change a greedy token (invariant I4). Matrix-multiply libraries pick their
//! blocking by shape, so they do not give that guarantee.
//!
//! Rows are split over the installed matmul [`crate::quant::Team`] (in chunks of a head and
//! a few query rows), which changes where a row is computed, never how.
//!
//! Entry point: [`causal_gqa`]. Training keeps the differentiable candle path in `layers`.

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};
use crate::quant::team::{run_chunks, SharedOut};

/// Lanes of the fixed-order partial sums (a multiple of the SIMD width, so the compiler
/// vectorises the loops without reordering any lane's additions).
const LANES: usize = 8;

fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s = 0f32;
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    acc.iter().sum::<f32>() + s
}

/// Query rows per chunk of work.
const ROWS: usize = 16;

/// Below this many multiply-adds (score and value passes each) a call stays on the calling
/// thread.
const PAR_MIN_WORK: usize = 1 << 15;

/// One query row over keys `0..n` (causal: up to its own position): softmax-weighted sum of
/// the values into `o` (zeroed), with `p` as scratch (at least `n` long).
fn row(qr: &[f32], kh: &[f32], vh: &[f32], n: usize, scale: f32, p: &mut [f32], o: &mut [f32]) {
    let hd = qr.len();
    let mut max = f32::NEG_INFINITY;
    for (t, pt) in p[..n].iter_mut().enumerate() {
        *pt = dot(qr, &kh[t * hd..(t + 1) * hd]) * scale;
        max = max.max(*pt);
    }
    let mut sum = 0f32;
    for pt in &mut p[..n] {
        *pt = (*pt - max).exp();
        sum += *pt;
    }
    for (t, &pt) in p[..n].iter().enumerate() {
        let w = pt / sum;
        for (oi, vi) in o.iter_mut().zip(&vh[t * hd..(t + 1) * hd]) {
            *oi += w * vi;
        }
    }
}

/// Attention of `q` (`[heads, len, hd]`, positions `start..start+len`) over `k`, `v`
/// (`[kv_heads, ≥ start+len, hd]`, the cache including these positions) → `[len, heads·hd]`.
/// Query head `h` reads kv head `h / (heads / kv_heads)`.
pub fn causal_gqa(q: &Tensor, k: &Tensor, v: &Tensor, start: usize, scale: f32) -> Result<Tensor> {
    let (nh, len, hd) = q.dims3()?;
    let (kvh, total, khd) = k.dims3()?;
    if khd != hd || v.dims3()? != (kvh, total, hd) || kvh == 0 || nh % kvh != 0 {
        return Err(Error::Invalid(format!(
            "attention: q {:?}, k {:?}, v {:?} do not fit together",
            q.dims(),
            k.dims(),
            v.dims()
        )));
    }
    if start + len > total {
        return Err(Error::Invalid(format!(
            "attention: positions {start}..{} but the cache holds {total}",
            start + len
        )));
    }
    let g = nh / kvh;
    let qd: Vec<f32> = q.contiguous()?.flatten_all()?.to_vec1()?;
    let kd: Vec<f32> = k.contiguous()?.flatten_all()?.to_vec1()?;
    let vd: Vec<f32> = v.contiguous()?.flatten_all()?.to_vec1()?;
    // Chunks of (head, ROWS query rows) split over the matmul team (each row is computed
    // the same way wherever it runs); results land per head, `[nh, len, hd]`.
    let blocks = len.div_ceil(ROWS);
    let mut by_head = vec![0f32; nh * len * hd];
    let shared = SharedOut::new(&mut by_head);
    let chunk = |c: usize| {
        let (h, r0) = (c / blocks, (c % blocks) * ROWS);
        let r1 = (r0 + ROWS).min(len);
        // SAFETY: chunk `c` is the only one with head `h` and rows `r0..r1`, so the pieces
        // are disjoint.
        let o = unsafe { shared.piece((h * len + r0) * hd, (r1 - r0) * hd) };
        let j = h / g;
        let (kh, vh) = (&kd[j * total * hd..], &vd[j * total * hd..]);
        let mut p = vec![0f32; start + r1];
        for (r, o) in (r0..r1).zip(o.chunks_exact_mut(hd)) {
            let qr = &qd[(h * len + r) * hd..(h * len + r + 1) * hd];
            row(qr, kh, vh, start + r + 1, scale, &mut p, o);
        }
    };
    let work = nh * len * (start + len) * hd;
    run_chunks(nh * blocks, work >= PAR_MIN_WORK, &chunk);
    let out = if len == 1 {
        by_head
    } else {
        let mut out = vec![0f32; len * nh * hd];
        for (h, head) in by_head.chunks_exact(len * hd).enumerate() {
            for (r, src) in head.chunks_exact(hd).enumerate() {
                out[(r * nh + h) * hd..(r * nh + h + 1) * hd].copy_from_slice(src);
            }
        }
        out
    };
    Ok(Tensor::from_vec(out, (len, nh * hd), &Device::Cpu)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference: the same attention with candle's ops (mask, softmax, matmul).
    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, start: usize, scale: f64) -> Tensor {
        let (nh, len, hd) = q.dims3().unwrap();
        let (kvh, _, _) = k.dims3().unwrap();
        let g = nh / kvh;
        let total = start + len;
        let k = k.narrow(1, 0, total).unwrap();
        let v = v.narrow(1, 0, total).unwrap();
        let mut rows = Vec::new();
        for h in 0..nh {
            let kj = k.get(h / g).unwrap();
            let vj = v.get(h / g).unwrap();
            let s = (q.get(h).unwrap().matmul(&kj.t().unwrap()).unwrap() * scale).unwrap();
            let mask: Vec<f32> = (0..len)
                .flat_map(|r| {
                    (0..total).map(move |t| {
                        if t <= start + r {
                            0.0
                        } else {
                            f32::NEG_INFINITY
                        }
                    })
                })
                .collect();
            let s = (s + Tensor::from_vec(mask, (len, total), &Device::Cpu).unwrap()).unwrap();
            let p = candle_nn::ops::softmax_last_dim(&s).unwrap();
            rows.push(p.matmul(&vj).unwrap());
        }
        Tensor::stack(&rows, 1)
            .unwrap()
            .reshape((len, nh * hd))
            .unwrap()
    }

    #[test]
    fn matches_candle_and_is_independent_of_the_batch() {
        let dev = Device::Cpu;
        for (nh, kvh, hd, start, len) in [(9, 3, 64, 0, 5), (4, 4, 8, 7, 3), (6, 2, 12, 2, 1)] {
            let total = start + len + 2;
            let q = Tensor::randn(0f32, 1.0, (nh, len, hd), &dev).unwrap();
            let k = Tensor::randn(0f32, 1.0, (kvh, total, hd), &dev).unwrap();
            let v = Tensor::randn(0f32, 1.0, (kvh, total, hd), &dev).unwrap();
            let scale = 1.0 / (hd as f64).sqrt();
            let got = causal_gqa(&q, &k, &v, start, scale as f32).unwrap();
            let want = reference(&q, &k, &v, start, scale);
            let d = (&got - &want).unwrap().abs().unwrap().max_all().unwrap();
            assert!(d.to_scalar::<f32>().unwrap() < 1e-5);
            // Row r alone (position start + r) is bit-identical to row r of the batch.
            for r in 0..len {
                let one = causal_gqa(&q.narrow(1, r, 1).unwrap(), &k, &v, start + r, scale as f32)
                    .unwrap();
                let a: Vec<f32> = one.flatten_all().unwrap().to_vec1().unwrap();
                let b: Vec<f32> = got.get(r).unwrap().to_vec1().unwrap();
                assert_eq!(a, b, "row {r}");
            }
        }
    }

    /// On a matmul team of 2 or 3 threads (chunks of a head and a few rows, several
    /// blocks of rows per head) the result is the one-thread result bit for bit.
    #[test]
    fn a_team_gives_the_same_bits() {
        let dev = Device::Cpu;
        for (nh, kvh, hd, start, len) in [(9, 3, 64, 0, 40), (9, 3, 64, 150, 1), (4, 2, 32, 9, 17)]
        {
            let total = start + len;
            let q = Tensor::randn(0f32, 1.0, (nh, len, hd), &dev).unwrap();
            let k = Tensor::randn(0f32, 1.0, (kvh, total, hd), &dev).unwrap();
            let v = Tensor::randn(0f32, 1.0, (kvh, total, hd), &dev).unwrap();
            let run = || -> Vec<f32> {
                causal_gqa(&q, &k, &v, start, 0.125)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap()
            };
            let want = run();
            for threads in [2, 3] {
                let team = crate::quant::Team::new(threads).unwrap();
                assert_eq!(team.install(run), want, "{threads} threads, len {len}");
            }
        }
    }

    #[test]
    fn shapes_that_do_not_fit_are_errors() {
        let dev = Device::Cpu;
        let q = Tensor::zeros((4, 2, 8), candle_core::DType::F32, &dev).unwrap();
        let k = Tensor::zeros((3, 4, 8), candle_core::DType::F32, &dev).unwrap();
        assert!(
            causal_gqa(&q, &k, &k, 0, 1.0).is_err(),
            "4 heads over 3 kv heads"
        );
        let k = Tensor::zeros((2, 4, 8), candle_core::DType::F32, &dev).unwrap();
        assert!(
            causal_gqa(&q, &k, &k, 3, 1.0).is_err(),
            "positions past the cache"
        );
    }
}
