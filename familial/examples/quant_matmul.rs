//! Microbenchmark of `QMatrix::matmul_t` for SmolLM2-135M shapes (Q4_1 linear weights,
//! Q8_0 tied head): fused qkv 576→960, o 576→576, gate_up 576→3072, down 1536→576,
//! head 576→49152, at m = 1, 4 and 128 rows; then a whole decode token (30 layers of
//! distinct weights, so they come from memory as in the real model, plus the head).
//!
//! Threads come from `RAYON_NUM_THREADS`: run it twice, e.g.
//! `RAYON_NUM_THREADS=1 cargo run --release -p flow-familial --example quant_matmul` and
//! again with 2. Prints median µs per call and the effective GB/s of weight read.

use std::time::Instant;

use candle_core::{Device, Tensor};
use flow_familial::quant::{GgmlDType, QBytes, QMatrix};
use half::f16;
use rand::{Rng, SeedableRng};

/// A `[rows, cols]` matrix of random valid blocks (finite f16 scales).
fn random(dtype: GgmlDType, rows: usize, cols: usize, rng: &mut impl Rng) -> QMatrix {
    let ts = dtype.type_size();
    let mut v: Vec<u8> = (0..rows * cols / dtype.block_size() * ts)
        .map(|_| rng.gen())
        .collect();
    let scales: &[usize] = if dtype == GgmlDType::Q4_1 {
        &[0, 2]
    } else {
        &[0]
    };
    for b in v.chunks_exact_mut(ts) {
        for &o in scales {
            let s = f16::from_f32(rng.gen_range(-0.05f32..0.05));
            b[o..o + 2].copy_from_slice(&s.to_le_bytes());
        }
    }
    match QMatrix::new(dtype, rows, cols, QBytes::from_vec(v)) {
        Ok(q) => q,
        Err(e) => panic!("{e}"),
    }
}

/// Median seconds of `f` over enough calls to fill about 0.3 s (at least 5).
fn median(mut f: impl FnMut()) -> f64 {
    f();
    let mut times = Vec::new();
    let start = Instant::now();
    while times.len() < 5 || (start.elapsed().as_secs_f64() < 0.3 && times.len() < 2000) {
        let t = Instant::now();
        f();
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn main() -> flow_familial::Result<()> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let threads = rayon::current_num_threads();
    println!("threads {threads}");
    let shapes = [
        ("qkv", GgmlDType::Q4_1, 960, 576),
        ("o", GgmlDType::Q4_1, 576, 576),
        ("gate_up", GgmlDType::Q4_1, 3072, 576),
        ("down", GgmlDType::Q4_1, 576, 1536),
        ("head", GgmlDType::Q8_0, 49152, 576),
    ];
    println!(
        "{:<8} {:>6} {:>5} {:>12} {:>8}",
        "matrix", "dtype", "m", "median µs", "GB/s"
    );
    for &(name, dtype, rows, cols) in &shapes {
        let w = random(dtype, rows, cols, &mut rng);
        for m in [1usize, 4, 128] {
            let x = Tensor::randn(0f32, 1.0, (m, cols), &Device::Cpu)?;
            let t = median(|| {
                let _ = w.matmul_t(&x);
            });
            let gbs = w.nbytes() as f64 / t / 1e9;
            println!("{name:<8} {dtype:>6?} {m:>5} {:>12.1} {gbs:>8.2}", t * 1e6);
        }
    }
    // One decode token: 30 layers of distinct weights (≈ the model's 98 MB) and the head.
    let layers: Vec<Vec<QMatrix>> = (0..30)
        .map(|_| {
            shapes[..4]
                .iter()
                .map(|&(_, d, r, c)| random(d, r, c, &mut rng))
                .collect()
        })
        .collect();
    let head = random(GgmlDType::Q8_0, 49152, 576, &mut rng);
    let bytes: usize = layers.iter().flatten().map(|w| w.nbytes()).sum::<usize>() + head.nbytes();
    let x576 = Tensor::randn(0f32, 1.0, (1, 576), &Device::Cpu)?;
    let x1536 = Tensor::randn(0f32, 1.0, (1, 1536), &Device::Cpu)?;
    let t = median(|| {
        for l in &layers {
            for w in l {
                let x = if w.cols() == 576 { &x576 } else { &x1536 };
                let _ = w.matmul_t(x);
            }
        }
        let _ = head.matmul_t(&x576);
    });
    println!(
        "decode token (30 layers + head, {:.1} MB): {:.2} ms = {:.0} tok/s, {:.2} GB/s",
        bytes as f64 / 1e6,
        t * 1e3,
        1.0 / t,
        bytes as f64 / t / 1e9
    );
    Ok(())
}
