//! `x Wᵀ` with few rows: `flow_familial::kernels::matmul_t` against candle's matmul, for
//! the projection shapes of the `medium` preset, with the weight cold (a fresh copy from
//! a pool larger than L3 on every call, as in a forward pass over a whole model) and warm
//! (the same copy every call). Medians of 200 calls, in µs.
//!
//!     RAYON_NUM_THREADS=1 cargo run --release -p flow-familial --example small_matmul

use std::time::Instant;

use candle_core::{Device, Tensor};
use flow_familial::kernels::{matmul_t, MAX_ROWS};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    println!("kernel used up to {MAX_ROWS} rows; times in µs (median of 200)");
    println!(
        "{:>12} {:>4} | {:>10} {:>10} {:>7} | {:>10} {:>10} {:>7}",
        "W [n, k]", "rows", "cold gemm", "cold ours", "ratio", "warm gemm", "warm ours", "ratio"
    );
    for (n, k) in [(640usize, 384usize), (384, 384), (2048, 384), (384, 1024)] {
        let copies = (96 << 20) / (4 * n * k);
        let ws: Vec<Tensor> = (0..copies)
            .map(|_| Tensor::randn(0f32, 1.0, (n, k), &dev))
            .collect::<candle_core::Result<_>>()?;
        for m in [1usize, 2, 4, 8, 16, 32] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
            let mut t: [Vec<f64>; 4] = Default::default();
            for r in 0..200 {
                for (i, ti) in t.iter_mut().enumerate() {
                    let w = &ws[if i < 2 { (2 * r + i) % copies } else { 0 }];
                    let s = Instant::now();
                    let y = if i % 2 == 0 {
                        x.matmul(&w.t()?)?
                    } else {
                        matmul_t(&x, w)?
                    };
                    ti.push(s.elapsed().as_secs_f64() * 1e6);
                    std::hint::black_box(y);
                }
            }
            let [cg, co, wg, wo] = t.map(median);
            println!(
                "{:>12} {m:>4} | {cg:>10.1} {co:>10.1} {:>6.2}x | {wg:>10.1} {wo:>10.1} {:>6.2}x",
                format!("[{n}, {k}]"),
                cg / co,
                wg / wo
            );
        }
    }
    Ok(())
}
