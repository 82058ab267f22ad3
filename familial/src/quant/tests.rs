//! Tests: dequantization against candle's `to_float` path, `matmul_t` against
//! dequantize + f32 matmul and AVX2 against portable, row segments, and errors.

use std::borrow::Cow;
use std::sync::Arc;

use candle_core::{CpuStorage, DType, Device, Tensor};
use half::{bf16, f16};
use rand::{Rng, SeedableRng};

use super::dot::Isa;
use super::matmul::{available, matmul_t_with};
use super::*;
use crate::Error;

const BLOCK_DTYPES: [GgmlDType; 8] = [
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q5_0,
    GgmlDType::Q5_1,
    GgmlDType::Q8_0,
    GgmlDType::Q4K,
    GgmlDType::Q5K,
    GgmlDType::Q6K,
];

/// Byte offsets of the f16 scale fields within one block.
fn scale_fields(dtype: GgmlDType) -> &'static [usize] {
    match dtype {
        GgmlDType::Q4_0 | GgmlDType::Q5_0 | GgmlDType::Q8_0 => &[0],
        GgmlDType::Q4_1 | GgmlDType::Q5_1 | GgmlDType::Q4K | GgmlDType::Q5K => &[0, 2],
        GgmlDType::Q6K => &[208],
        _ => &[],
    }
}

/// Random valid data for a `[rows, cols]` matrix: random bytes with finite f16 scales
/// (or random finite floats for the float dtypes).
fn random_bytes(dtype: GgmlDType, rows: usize, cols: usize, rng: &mut impl Rng) -> Vec<u8> {
    let n = rows * cols;
    match dtype {
        GgmlDType::F32 => (0..n)
            .flat_map(|_| rng.gen_range(-1f32..1.0).to_le_bytes())
            .collect(),
        GgmlDType::F16 => (0..n)
            .flat_map(|_| f16::from_f32(rng.gen_range(-1f32..1.0)).to_le_bytes())
            .collect(),
        GgmlDType::BF16 => (0..n)
            .flat_map(|_| bf16::from_f32(rng.gen_range(-1f32..1.0)).to_le_bytes())
            .collect(),
        _ => {
            let (bs, ts) = (dtype.block_size(), dtype.type_size());
            let mut v: Vec<u8> = (0..n / bs * ts).map(|_| rng.gen()).collect();
            for block in v.chunks_exact_mut(ts) {
                for &o in scale_fields(dtype) {
                    let s = rng.gen_range(0.001f32..0.05) * if rng.gen() { 1.0 } else { -1.0 };
                    block[o..o + 2].copy_from_slice(&f16::from_f32(s).to_le_bytes());
                }
            }
            v
        }
    }
}

fn matrix(dtype: GgmlDType, rows: usize, cols: usize, seed: u64) -> (QMatrix, Vec<u8>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let v = random_bytes(dtype, rows, cols, &mut rng);
    let q = QMatrix::new(dtype, rows, cols, QBytes::from_vec(v.clone())).unwrap();
    (q, v)
}

/// Every supported dtype, bit-exact with candle's (ggml's) dequantization.
#[test]
fn dequantize_matches_candle() {
    let all = [GgmlDType::F32, GgmlDType::F16, GgmlDType::BF16];
    for dtype in all.into_iter().chain(BLOCK_DTYPES) {
        let (rows, cols) = (5, 512);
        let (q, v) = matrix(dtype, rows, cols, 7);
        let want = match dtype.from_data(Cow::Borrowed(&v)).dequantize(rows * cols) {
            Ok(CpuStorage::F32(w)) => w,
            _ => panic!("candle cannot dequantize {dtype:?}"),
        };
        let got = q
            .dequantize()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let same = got
            .iter()
            .zip(&want)
            .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "{dtype:?} differs from candle");
        let mut row = vec![0f32; cols];
        q.dequantize_row_into(3, &mut row).unwrap();
        assert_eq!(row, want[3 * cols..4 * cols], "{dtype:?} row 3");
    }
}

fn randn(m: usize, k: usize, seed: u64) -> Vec<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..m * k)
        .map(|_| rng.gen_range(-1f32..1.0) + rng.gen_range(-1f32..1.0))
        .collect()
}

/// `|got - want| ≤ tol · ‖w_j‖ ‖x_i‖` for every element of the `[m, n]` result.
fn check(got: &[f32], want: &[f32], w: &[f32], x: &[f32], k: usize, tol: f32, what: &str) {
    let m = x.len() / k;
    let n = want.len() / m.max(1);
    let norm = |v: &[f32]| v.iter().map(|a| a * a).sum::<f32>().sqrt();
    assert_eq!(got.len(), want.len(), "{what}: length");
    for i in 0..m {
        for j in 0..n {
            let scale = norm(&x[i * k..(i + 1) * k]) * norm(&w[j * k..(j + 1) * k]);
            let (a, b) = (got[i * n + j], want[i * n + j]);
            assert!(
                (a - b).abs() <= tol * scale + 1e-30,
                "{what}: y[{i},{j}] = {a}, expected {b} (scale {scale})"
            );
        }
    }
}

/// The exact f32 product of `x` `[m, k]` with the dequantized weight, `[m, n]`.
fn reference(q: &QMatrix, x: &[f32], m: usize) -> (Vec<f32>, Vec<f32>) {
    let w = q.dequantize().unwrap();
    let xt = Tensor::from_vec(x.to_vec(), (m, q.cols()), &Device::Cpu).unwrap();
    let y = xt.matmul(&w.t().unwrap()).unwrap();
    let w = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    (y.flatten_all().unwrap().to_vec1::<f32>().unwrap(), w)
}

fn matmul_case(dtype: GgmlDType, rows: usize, cols: usize, m: usize) {
    let (q, _) = matrix(dtype, rows, cols, (rows * 31 + cols * 7 + m) as u64);
    let x = randn(m, cols, m as u64 + 1);
    let (want, w) = reference(&q, &x, m);
    let what = format!("{dtype:?} [{rows}, {cols}] m={m}");
    let xt = Tensor::from_vec(x.clone(), (m, cols), &Device::Cpu).unwrap();
    let y = q.matmul_t(&xt).unwrap();
    assert_eq!(y.dims(), &[m, rows], "{what}");
    let y = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    check(&y, &want, &w, &x, cols, 1e-2, &what);
    let portable = matmul_t_with(&q, &x, m, Isa::Portable).unwrap();
    check(&portable, &want, &w, &x, cols, 1e-2, &what);
    for isa in [Isa::Avx2, Isa::AvxVnni, Isa::Avx512Vnni] {
        if !available(isa) {
            eprintln!("{what}: this CPU has no {isa:?}, not tested");
            continue;
        }
        let simd = matmul_t_with(&q, &x, m, isa).unwrap();
        check(
            &simd,
            &portable,
            &w,
            &x,
            cols,
            1e-6,
            &format!("{what} {isa:?} vs portable"),
        );
    }
}

/// The integer kernels against dequantize + f32 matmul, every row count.
#[test]
fn matmul_integer_kernels() {
    for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
        for cols in [32, 64, 576, 1536] {
            for m in [1, 2, 3, 4, 5, 8, 16, 17, 64, 130] {
                let rows = if cols >= 576 && m >= 64 { 13 } else { 37 };
                matmul_case(dtype, rows, cols, m);
            }
        }
    }
}

/// Float weights, Q5_x (32-blocks) and the K-quants (256-blocks) through candle's dots.
#[test]
fn matmul_other_dtypes() {
    for dtype in [
        GgmlDType::F32,
        GgmlDType::F16,
        GgmlDType::BF16,
        GgmlDType::Q5_0,
        GgmlDType::Q5_1,
    ] {
        for (cols, m) in [(32, 1), (64, 3), (576, 17), (1536, 5)] {
            matmul_case(dtype, 19, cols, m);
        }
    }
    for dtype in [GgmlDType::Q4K, GgmlDType::Q5K, GgmlDType::Q6K] {
        for (cols, m) in [(256, 1), (512, 4), (1536, 17), (256, 130)] {
            matmul_case(dtype, 11, cols, m);
        }
    }
}

/// Leading dimensions are kept: `[2, 3, cols]` → `[2, 3, rows]`.
#[test]
fn matmul_keeps_leading_dims() {
    let (q, _) = matrix(GgmlDType::Q4_1, 9, 64, 3);
    let x = Tensor::from_vec(randn(6, 64, 5), (2, 3, 64), &Device::Cpu).unwrap();
    let y = q.matmul_t(&x).unwrap();
    assert_eq!(y.dims(), &[2, 3, 9]);
    let flat = q.matmul_t(&x.reshape((6, 64)).unwrap()).unwrap();
    assert_eq!(
        y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        flat.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );
}

/// Rows `r0..r0 + n` of `whole` (which lives in `owner`) as a matrix over the same bytes.
fn rows_of(
    whole: &QMatrix,
    owner: &Arc<dyn AsRef<[u8]> + Send + Sync>,
    r0: usize,
    n: usize,
) -> QMatrix {
    let rb = whole.nbytes() / whole.rows();
    let b = QBytes::new(owner.clone(), r0 * rb, n * rb).unwrap();
    QMatrix::new(whole.dtype(), n, whole.cols(), b).unwrap()
}

/// `x · qᵀ`, flattened.
fn times(q: &QMatrix, x: &Tensor) -> Vec<f32> {
    q.matmul_t(x)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

/// Row segments over one buffer (as in an mmap'd file) equal the whole matrix.
#[test]
fn concat_rows_equals_whole() {
    for dtype in [
        GgmlDType::Q4_1,
        GgmlDType::Q8_0,
        GgmlDType::Q6K,
        GgmlDType::F16,
    ] {
        let (rows, cols) = (5 + 3 + 7, 256);
        let (whole, v) = matrix(dtype, rows, cols, 11);
        let owner: Arc<dyn AsRef<[u8]> + Send + Sync> = Arc::new(v);
        let part = |r0: usize, n: usize| rows_of(&whole, &owner, r0, n);
        let (a, b, c) = (part(0, 5), part(5, 3), part(8, 7));
        let bc = QMatrix::concat_rows(&[b, c]).unwrap();
        let fused = QMatrix::concat_rows(&[a, bc]).unwrap();
        assert_eq!(
            (fused.rows(), fused.cols(), fused.nbytes()),
            (rows, cols, whole.nbytes())
        );
        let d = |q: &QMatrix| {
            q.dequantize()
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        assert_eq!(d(&fused), d(&whole), "{dtype:?}");
        for m in [1, 6] {
            let x = Tensor::from_vec(randn(m, cols, 2), (m, cols), &Device::Cpu).unwrap();
            let y = |q: &QMatrix| times(q, &x);
            assert_eq!(y(&fused), y(&whole), "{dtype:?} m={m}");
        }
    }
}

/// A matmul [`Team`] of 2 or 3 threads gives the one-thread result bit for bit: odd row
/// counts, row segments that end at odd rows, every kernel family.
#[test]
fn team_equals_one_thread() {
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    for dtype in [
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q8_0,
        GgmlDType::Q6K,
        GgmlDType::F16,
    ] {
        let (rows, cols) = (301, 512);
        let (whole, v) = matrix(dtype, rows, cols, 5);
        let owner: Arc<dyn AsRef<[u8]> + Send + Sync> = Arc::new(v);
        let part = |r0: usize, n: usize| rows_of(&whole, &owner, r0, n);
        let fused = QMatrix::concat_rows(&[part(0, 151), part(151, 150)]).unwrap();
        for m in [1, 3, 17] {
            let x = Tensor::from_vec(randn(m, cols, 9), (m, cols), &Device::Cpu).unwrap();
            let y = |q: &QMatrix| times(q, &x);
            let want = one.install(|| y(&whole));
            for threads in [2, 3] {
                let team = Team::with_spin(threads, std::time::Duration::from_micros(20)).unwrap();
                for q in [&whole, &fused] {
                    let got = one.install(|| team.install(|| y(q)));
                    assert_eq!(got, want, "{dtype:?} m={m} threads={threads}");
                }
            }
        }
    }
}

/// Bad sizes, ranges, alignment, dtypes and inputs are errors, not panics.
#[test]
fn errors() {
    let owner: Arc<dyn AsRef<[u8]> + Send + Sync> = Arc::new(vec![0u8; 100]);
    assert!(matches!(
        QBytes::new(owner.clone(), 90, 11),
        Err(Error::Quant(_))
    ));
    assert!(matches!(
        QBytes::new(owner.clone(), usize::MAX, 2),
        Err(Error::Quant(_))
    ));
    let b = |o: usize, n: usize| QBytes::new(owner.clone(), o, n).unwrap();
    // 48 columns are not whole 32-blocks; 40 bytes are not 1 × 64 Q4_1 values.
    assert!(matches!(
        QMatrix::new(GgmlDType::Q4_1, 1, 48, b(0, 30)),
        Err(Error::Quant(_))
    ));
    assert!(matches!(
        QMatrix::new(GgmlDType::Q4_1, 1, 64, b(0, 39)),
        Err(Error::Quant(_))
    ));
    assert!(
        matches!(
            QMatrix::new(GgmlDType::Q4_1, 1, 64, b(1, 40)),
            Err(Error::Quant(_))
        ),
        "misaligned"
    );
    assert!(QMatrix::new(GgmlDType::Q4_1, 1, 64, b(2, 40)).is_ok());
    assert!(
        matches!(QMatrix::new(GgmlDType::Q2K, 1, 256, b(0, 84)), Err(Error::UnsupportedQuant(s)) if s.contains("Q2K"))
    );
    assert!(matches!(
        QMatrix::new(GgmlDType::Q8_1, 1, 32, b(0, 36)),
        Err(Error::UnsupportedQuant(_))
    ));
    let (q, _) = matrix(GgmlDType::Q4_1, 3, 64, 1);
    let (q8, _) = matrix(GgmlDType::Q8_0, 3, 64, 1);
    let (wide, _) = matrix(GgmlDType::Q4_1, 3, 96, 1);
    assert!(QMatrix::concat_rows(&[q.clone(), q8]).is_err());
    assert!(QMatrix::concat_rows(&[q.clone(), wide]).is_err());
    assert!(QMatrix::concat_rows(&[]).is_err());
    let mut out = vec![0f32; 64];
    assert!(q.dequantize_row_into(3, &mut out).is_err());
    assert!(q.dequantize_row_into(0, &mut out[..63]).is_err());
    let dev = Device::Cpu;
    let x = Tensor::zeros((2, 63), DType::F32, &dev).unwrap();
    assert!(matches!(q.matmul_t(&x), Err(Error::ShapeMismatch { .. })));
    let x = Tensor::zeros((2, 64), DType::F64, &dev).unwrap();
    assert!(matches!(q.matmul_t(&x), Err(Error::Quant(_))));
    let x = Tensor::new(1f32, &dev).unwrap();
    assert!(q.matmul_t(&x).is_err(), "a scalar input");
    // Empty shapes give empty or zero results.
    let x = Tensor::zeros((0, 64), DType::F32, &dev).unwrap();
    assert_eq!(q.matmul_t(&x).unwrap().dims(), &[0, 3]);
    let none = QMatrix::new(GgmlDType::Q4_1, 0, 64, QBytes::from_vec(vec![])).unwrap();
    let x = Tensor::zeros((2, 64), DType::F32, &dev).unwrap();
    assert_eq!(none.matmul_t(&x).unwrap().dims(), &[2, 0]);
}
