//! Projections and embeddings whose weights are either dense f32 tensors or quantized
//! GGUF matrices read in place ([`QMatrix`]): the model's layers hold a [`Proj`] or an
//! [`Embedding`] and never care which.
//!
//! Quantized weights stay quantized: `x · Wᵀ` runs the integer kernels of
//! [`crate::quant`] over the mapped file, the embedding dequantizes only the rows it looks
//! up, and a tied head reuses the embedding's matrix. In a differentiable graph (training
//! exits over a frozen quantized trunk) the backward pass dequantizes the weight a band of
//! rows at a time for `g · W`; nothing else of the quantized path needs a gradient.

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};
use crate::layers::Linear;
use crate::quant::QMatrix;
use crate::weights::TensorSource;

/// A linear projection `y = x Wᵀ + b` with a dense or a quantized weight.
#[derive(Clone)]
pub enum Proj {
    /// f32 weight (trainable, sliceable: see [`Linear`]).
    Dense(Linear),
    /// Quantized weight `[out, in]` read in place, optional f32 bias.
    Quant { w: QMatrix, b: Option<Tensor> },
}

impl Proj {
    /// `name.weight` (`[out, inp]`) and, with `bias`, `name.bias` from `src`: quantized
    /// when the source holds the weight quantized, dense otherwise.
    pub(crate) fn load(
        src: &dyn TensorSource,
        name: &str,
        out: usize,
        inp: usize,
        bias: bool,
    ) -> Result<Self> {
        let wname = format!("{name}.weight");
        match src.quantized(&wname, &[out, inp])? {
            Some(w) if src.row_slice(&wname).is_none() => {
                let b = if bias {
                    Some(src.get(&format!("{name}.bias"), &[out])?)
                } else {
                    None
                };
                Ok(Proj::Quant { w, b })
            }
            _ => Ok(Proj::Dense(Linear::load(src, name, out, inp, bias)?)),
        }
    }

    /// Concatenate along the output dimension (fused q/k/v, gate/up). Quantized parts of
    /// one type are fused without copying; a mix is fused dense.
    pub(crate) fn fuse(parts: Vec<Proj>) -> Result<Self> {
        let all_quant = parts.iter().all(|p| matches!(p, Proj::Quant { .. }));
        if all_quant {
            let mut ws = Vec::with_capacity(parts.len());
            let mut bs = Vec::with_capacity(parts.len());
            for p in &parts {
                if let Proj::Quant { w, b } = p {
                    ws.push(w.clone());
                    bs.push(b.clone());
                }
            }
            let same = ws.windows(2).all(|p| p[0].dtype() == p[1].dtype());
            if same {
                let b = if bs.iter().all(Option::is_some) {
                    let bs: Vec<Tensor> = bs.into_iter().flatten().collect();
                    Some(Tensor::cat(&bs, 0)?)
                } else if bs.iter().all(Option::is_none) {
                    None
                } else {
                    return Err(Error::Invalid(
                        "fusing projections with and without bias".into(),
                    ));
                };
                return Ok(Proj::Quant {
                    w: QMatrix::concat_rows(&ws)?,
                    b,
                });
            }
        }
        let dense: Vec<Linear> = parts
            .into_iter()
            .map(Proj::into_dense)
            .collect::<Result<_>>()?;
        Ok(Proj::Dense(Linear::fuse(&dense)?))
    }

    /// The dense form (a quantized weight is dequantized).
    pub fn into_dense(self) -> Result<Linear> {
        match self {
            Proj::Dense(l) => Ok(l),
            Proj::Quant { w, b } => Ok(Linear {
                w: w.dequantize()?,
                b,
                rows: None,
            }),
        }
    }

    /// `x Wᵀ + b` for `x` `[rows, in]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Proj::Dense(l) => l.forward(x),
            Proj::Quant { w, b } => {
                let y = if x.track_op() {
                    x.contiguous()?.apply_op1(QuantMatmul { w: w.clone() })?
                } else {
                    w.matmul_t(x)?
                };
                Ok(match b {
                    Some(b) => y.broadcast_add(b)?,
                    None => y,
                })
            }
        }
    }

    /// Output features.
    pub fn out_dim(&self) -> usize {
        match self {
            Proj::Dense(l) => l.out_dim(),
            Proj::Quant { w, .. } => w.rows(),
        }
    }

    /// Whether a gradient can flow into this projection's parameters.
    pub fn tracks(&self) -> bool {
        match self {
            Proj::Dense(l) => l.tracks(),
            Proj::Quant { b, .. } => b.as_ref().is_some_and(Tensor::track_op),
        }
    }
}

/// `x Wᵀ` for a frozen quantized `W` inside a differentiable graph: the forward runs the
/// quantized kernel, the backward computes only the input's gradient `g W`.
struct QuantMatmul {
    w: QMatrix,
}

impl candle_core::CustomOp1 for QuantMatmul {
    fn name(&self) -> &'static str {
        "quant-matmul"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let x = crate::layers::cpu_tensor(storage, layout, "quant-matmul")?;
        let y = self
            .w
            .matmul_t(&x)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        crate::layers::cpu_result(&y)
    }

    /// `g W` a band of [`BWD_ROWS`] rows of `W` at a time, each dequantized into one
    /// reused buffer: a tied head's whole `W` in f32 would be 113 MB on SmolLM2, more than
    /// everything a sparse scheme trains.
    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let (out, inn) = (self.w.rows(), self.w.cols());
        let dims = grad.dims();
        let lead = &dims[..dims.len().saturating_sub(1)];
        let m: usize = lead.iter().product();
        let g = grad.contiguous()?.reshape((m, out))?;
        let q = |e: crate::Error| candle_core::Error::Msg(e.to_string());
        let mut buf = vec![0f32; BWD_ROWS.min(out) * inn];
        let mut acc: Option<Tensor> = None;
        for r0 in (0..out).step_by(BWD_ROWS) {
            let r = BWD_ROWS.min(out - r0);
            for (i, row) in buf[..r * inn].chunks_exact_mut(inn).enumerate() {
                self.w.dequantize_row_into(r0 + i, row).map_err(q)?;
            }
            let wb = Tensor::from_slice(&buf[..r * inn], (r, inn), grad.device())?;
            let part = g.narrow(1, r0, r)?.contiguous()?.matmul(&wb)?;
            acc = Some(match acc {
                Some(a) => (a + part)?,
                None => part,
            });
        }
        let acc = match acc {
            Some(a) => a,
            None => Tensor::zeros((m, inn), grad.dtype(), grad.device())?,
        };
        Ok(Some(acc.reshape([lead, &[inn]].concat())?))
    }
}

/// Rows of a frozen quantized `W` dequantized at a time in [`QuantMatmul`]'s backward
/// (2.4 MB of f32 at SmolLM2's width).
const BWD_ROWS: usize = 1024;

/// The token embedding `[vocab, hidden]`, dense or quantized (rows dequantized on lookup).
#[derive(Clone)]
pub enum Embedding {
    Dense(Tensor),
    Quant(QMatrix),
}

impl Embedding {
    /// `model.embed_tokens.weight` from `src` (quantized when the source holds it so).
    pub(crate) fn load(src: &dyn TensorSource, name: &str, shape: &[usize]) -> Result<Self> {
        match src.quantized(name, shape)? {
            Some(q) => Ok(Embedding::Quant(q)),
            None => Ok(Embedding::Dense(src.get(name, shape)?)),
        }
    }

    /// Rows `ids` → `[ids.len(), hidden]` (ids already checked against the vocabulary).
    pub fn lookup(&self, ids: &[u32]) -> Result<Tensor> {
        match self {
            Embedding::Dense(e) => {
                let t = Tensor::from_slice(ids, ids.len(), &Device::Cpu)?;
                Ok(e.index_select(&t, 0)?)
            }
            Embedding::Quant(q) => {
                let h = q.cols();
                let mut out = vec![0f32; ids.len() * h];
                for (row, &id) in out.chunks_exact_mut(h).zip(ids) {
                    q.dequantize_row_into(id as usize, row)?;
                }
                Ok(Tensor::from_vec(out, (ids.len(), h), &Device::Cpu)?)
            }
        }
    }

    /// The same matrix as a head (tied embeddings).
    pub fn as_head(&self) -> Proj {
        match self {
            Embedding::Dense(w) => Proj::Dense(Linear {
                w: w.clone(),
                b: None,
                rows: None,
            }),
            Embedding::Quant(q) => Proj::Quant {
                w: q.clone(),
                b: None,
            },
        }
    }
}

fn fmt_q(f: &mut std::fmt::Formatter<'_>, what: &str, w: &QMatrix) -> std::fmt::Result {
    write!(f, "{what}({:?} [{}, {}])", w.dtype(), w.rows(), w.cols())
}

impl std::fmt::Debug for Proj {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Proj::Dense(l) => f.debug_tuple("Dense").field(l).finish(),
            Proj::Quant { w, .. } => fmt_q(f, "Quant", w),
        }
    }
}

impl std::fmt::Debug for Embedding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Embedding::Dense(t) => f.debug_tuple("Dense").field(t).finish(),
            Embedding::Quant(w) => fmt_q(f, "Quant", w),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{GgmlDType, QBytes};
    use candle_core::Var;
    use rand::{Rng, SeedableRng};

    /// A Q8_0 `[rows, cols]` matrix of random blocks (scale 0.01, random int8 values).
    fn q8(rows: usize, cols: usize, seed: u64) -> QMatrix {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut bytes = Vec::new();
        for _ in 0..rows * cols / 32 {
            bytes.extend_from_slice(&half::f16::from_f32(0.01).to_le_bytes());
            bytes.extend((0..32).map(|_| rng.gen::<u8>()));
        }
        QMatrix::new(GgmlDType::Q8_0, rows, cols, QBytes::from_vec(bytes)).unwrap()
    }

    /// The banded backward equals `g · W` with the whole `W` dequantized: rows not a
    /// multiple of the band, leading dimensions kept.
    #[test]
    fn quant_backward_is_g_times_w() {
        let (rows, cols) = (2 * BWD_ROWS + 37, 64);
        let w = q8(rows, cols, 3);
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 1.0, (2, 3, cols), &dev).unwrap();
        let c = Tensor::randn(0f32, 1.0, (2, 3, rows), &dev).unwrap();
        let proj = Proj::Quant {
            w: w.clone(),
            b: None,
        };
        let y = proj.forward(x.as_tensor()).unwrap();
        let loss = (y * &c).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let got = grads.get(x.as_tensor()).unwrap();
        assert_eq!(got.dims(), &[2, 3, cols]);
        let want = c
            .reshape((6, rows))
            .unwrap()
            .matmul(&w.dequantize().unwrap())
            .unwrap()
            .reshape((2, 3, cols))
            .unwrap();
        let d = (got - &want).unwrap().abs().unwrap().max_all().unwrap();
        let scale = want.abs().unwrap().max_all().unwrap();
        let (d, scale) = (
            d.to_scalar::<f32>().unwrap(),
            scale.to_scalar::<f32>().unwrap(),
        );
        assert!(d <= 1e-5 * scale.max(1.0), "max |Δ| {d} (scale {scale})");
    }
}
