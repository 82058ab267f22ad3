//! Decoder building blocks: linear, RMSNorm, RoPE, grouped-query attention, SwiGLU MLP,
//! Mixture-of-Experts FFN, and the decoder block that composes them.
//!
//! Hidden states are flattened to `[tokens, hidden]`: one call may carry several sequences
//! ("segments"), each with its own start position and KV cache. Projections and FFNs run on
//! all tokens at once; attention runs per segment against that segment's cache.
//!
//! `Mode::Train` swaps candle's fused kernels (rms_norm, softmax, rope), which have no
//! backward pass, for differentiable compositions of primitive ops.

use candle_core::{DType, Device, Module, Tensor, D};

use crate::config::{Ffn, ModelConfig, MoeKind, MoeSpec};
use crate::error::{Error, Result};
use crate::kernels;
use crate::kv::LayerKv;
use crate::proj::Proj;
use crate::weights::TensorSource;

/// Inference (fused kernels, preallocated KV) or training (differentiable everywhere).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    #[default]
    Infer,
    Train,
}

/// Contiguous positions `start..start + len` of one sequence inside a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seg {
    pub start: usize,
    pub len: usize,
}

impl Seg {
    /// Positions `start..start+len`.
    pub fn new(start: usize, len: usize) -> Self {
        Self { start, len }
    }
}

/// `y = x Wᵀ + b`.
#[derive(Debug, Clone)]
pub struct Linear {
    pub w: Tensor,
    pub b: Option<Tensor>,
    /// Rows of `w` replaced by (trainable) values, see [`RowSlice`].
    pub rows: Option<RowSlice>,
}

/// Rows `rows` (u32, `[k]`) of a matrix replaced by `values` (`[k, in]`): the trainable
/// output channels of a frozen matrix in sparse fine-tuning. A [`Linear`] with a row slice
/// computes `x Wᵀ` with the merged matrix inside one op whose backward pass produces the
/// input's gradient and the `k` rows' gradient only: neither the merged matrix nor its
/// whole gradient becomes part of the graph.
#[derive(Debug, Clone)]
pub struct RowSlice {
    pub rows: Tensor,
    pub values: Tensor,
}

/// `w` with rows `rows` replaced by `values` (exact copies; no graph).
pub fn replace_rows(w: &Tensor, rows: &Tensor, values: &Tensor) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    let idx: Vec<u32> = rows.to_vec1()?;
    let (k, vin) = values.dims2()?;
    if k != idx.len() || vin != inp {
        return Err(Error::Invalid(format!(
            "row slice: {} rows with values of shape [{k}, {vin}] for a [{out}, {inp}] matrix",
            idx.len()
        )));
    }
    let mut data: Vec<f32> = w.detach().flatten_all()?.to_vec1()?;
    let vals: Vec<f32> = values.detach().flatten_all()?.to_vec1()?;
    for (j, &r) in idx.iter().enumerate() {
        let r = r as usize;
        if r >= out {
            return Err(Error::Invalid(format!(
                "row slice: row {r} of a matrix with {out} rows"
            )));
        }
        data[r * inp..(r + 1) * inp].copy_from_slice(&vals[j * inp..(j + 1) * inp]);
    }
    Ok(Tensor::from_vec(data, (out, inp), &Device::Cpu)?)
}

impl Linear {
    pub(crate) fn load(
        src: &dyn TensorSource,
        name: &str,
        out: usize,
        inp: usize,
        bias: bool,
    ) -> Result<Self> {
        let w = src.get(&format!("{name}.weight"), &[out, inp])?;
        let b = if bias {
            Some(src.get(&format!("{name}.bias"), &[out])?)
        } else {
            None
        };
        let rows = src.row_slice(&format!("{name}.weight"));
        if let Some(rs) = &rows {
            // Validates shapes and indices once, at load.
            replace_rows(&w, &rs.rows, &rs.values)?;
        }
        Ok(Self { w, b, rows })
    }

    /// The whole weight, rows of a slice merged in (differentiable w.r.t. the slice).
    fn weight(&self) -> Result<Tensor> {
        let Some(rs) = &self.rows else {
            return Ok(self.w.clone());
        };
        if !rs.values.track_op() {
            return replace_rows(&self.w, &rs.rows, &rs.values);
        }
        let out = self.out_dim();
        let mut keep = vec![1f32; out];
        for r in rs.rows.to_vec1::<u32>()? {
            if let Some(k) = keep.get_mut(r as usize) {
                *k = 0.0;
            }
        }
        let keep = Tensor::from_vec(keep, (out, 1), &Device::Cpu)?;
        Ok(self
            .w
            .detach()
            .broadcast_mul(&keep)?
            .index_add(&rs.rows, &rs.values, 0)?)
    }

    /// Concatenate several linears along the output dimension (fused q/k/v, gate/up).
    pub(crate) fn fuse(parts: &[Linear]) -> Result<Self> {
        let b = if parts.iter().all(|l| l.b.is_some()) {
            let bs: Vec<&Tensor> = parts.iter().filter_map(|l| l.b.as_ref()).collect();
            Some(Tensor::cat(&bs, 0)?)
        } else {
            None
        };
        let sliced = parts.iter().any(|l| l.rows.is_some());
        if sliced && parts.iter().all(|l| !l.w.track_op()) {
            // Frozen matrices with trainable rows: the fused matrix stays frozen and the
            // slices are fused too (row indices offset by the parts above).
            let ws: Vec<&Tensor> = parts.iter().map(|l| &l.w).collect();
            let w = Tensor::cat(&ws, 0)?;
            let mut idx: Vec<u32> = Vec::new();
            let mut vals: Vec<&Tensor> = Vec::new();
            let mut off = 0u32;
            for l in parts {
                if let Some(rs) = &l.rows {
                    idx.extend(rs.rows.to_vec1::<u32>()?.into_iter().map(|r| r + off));
                    vals.push(&rs.values);
                }
                off += l.out_dim() as u32;
            }
            let n = idx.len();
            let rows = Some(RowSlice {
                rows: Tensor::from_vec(idx, n, &Device::Cpu)?,
                values: Tensor::cat(&vals, 0)?,
            });
            return Ok(Self { w, b, rows });
        }
        // Otherwise (a whole part is trainable too) merge the slices into their matrices.
        let ws: Vec<Tensor> = parts.iter().map(Linear::weight).collect::<Result<_>>()?;
        let w = Tensor::cat(&ws, 0)?;
        Ok(Self { w, b, rows: None })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = if let Some(rs) = &self.rows {
            if x.rank() == 2 && (x.track_op() || rs.values.track_op()) {
                x.contiguous()?.apply_op2(
                    &rs.values.contiguous()?,
                    SlicedMatmul {
                        w: self.w.detach(),
                        rows: rs.rows.clone(),
                    },
                )?
            } else {
                x.matmul(&self.weight()?.t()?)?
            }
        } else if x.track_op() && !self.w.track_op() && x.rank() == 2 {
            // A frozen weight inside a differentiable graph (sparse fine-tuning): candle's
            // matmul backward would also compute (and keep) the weight's gradient.
            x.contiguous()?
                .apply_op1(FrozenMatmul { w: self.w.clone() })?
        } else {
            kernels::matmul_t(x, &self.w)?
        };
        Ok(match &self.b {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }

    pub fn out_dim(&self) -> usize {
        self.w.dims()[0]
    }

    /// Whether a gradient can flow into this layer's weight or bias.
    pub fn tracks(&self) -> bool {
        self.w.track_op()
            || self.b.as_ref().is_some_and(Tensor::track_op)
            || self.rows.as_ref().is_some_and(|r| r.values.track_op())
    }
}

/// `x Wᵀ` for a weight that is not trained: the backward pass computes only the input's
/// gradient `g W`. Candle's own `matmul` backward always computes the right-hand side's
/// gradient too (`xᵀ g`, as large as `W`) even when nothing asks for it, which doubles the
/// backward cost of frozen layers above a trainable one.
struct FrozenMatmul {
    w: Tensor,
}

impl candle_core::CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let x = cpu_tensor(storage, layout, "frozen-matmul")?;
        cpu_result(&x.matmul(&self.w.t()?)?)
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad.matmul(&self.w)?))
    }
}

/// `x Wᵀ` where `W` is the frozen `w` with rows `rows` replaced by the second operand
/// (`[k, in]`). The merged matrix exists only inside the forward and backward calls; the
/// backward pass computes the input's gradient `g W` (if the input is tracked) and the
/// slice's gradient `g[:, rows]ᵀ x` (`[k, in]`), never the whole matrix's.
struct SlicedMatmul {
    w: Tensor,
    rows: Tensor,
}

/// The f32 operand of a custom op as a tensor (`op` names the op in the error).
pub(crate) fn cpu_tensor(
    storage: &candle_core::CpuStorage,
    layout: &candle_core::Layout,
    op: &str,
) -> candle_core::Result<Tensor> {
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{op}: operand not contiguous")))?;
    let data = storage.as_slice::<f32>()?;
    Tensor::from_slice(&data[start..end], layout.shape(), &Device::Cpu)
}

/// A custom op's f32 result as CPU storage and shape.
pub(crate) fn cpu_result(
    y: &Tensor,
) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
    let shape = y.shape().clone();
    let v = y.flatten_all()?.to_vec1::<f32>()?;
    Ok((candle_core::CpuStorage::F32(v), shape))
}

impl SlicedMatmul {
    fn merged(&self, values: &Tensor) -> candle_core::Result<Tensor> {
        replace_rows(&self.w, &self.rows, values)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))
    }
}

impl candle_core::CustomOp2 for SlicedMatmul {
    fn name(&self) -> &'static str {
        "sliced-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let x = cpu_tensor(s1, l1, "sliced-matmul")?;
        let values = cpu_tensor(s2, l2, "sliced-matmul")?;
        cpu_result(&x.matmul(&self.merged(&values)?.t()?)?)
    }

    fn bwd(
        &self,
        x: &Tensor,
        values: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let gx = if x.track_op() {
            Some(grad.matmul(&self.merged(values)?)?)
        } else {
            None
        };
        let gv = if values.track_op() {
            Some(grad.index_select(&self.rows, 1)?.t()?.matmul(&x.detach())?)
        } else {
            None
        };
        Ok((gx, gv))
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        Linear::forward(self, x).map_err(|e| candle_core::Error::Msg(e.to_string()))
    }
}

/// RMSNorm with weight `w`.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64, mode: Mode) -> Result<Tensor> {
    Ok(match mode {
        Mode::Infer => candle_nn::ops::rms_norm(x, w, eps as f32)?,
        Mode::Train => {
            let h = x.dim(D::Minus1)? as f64;
            let ms = (x.sqr()?.sum_keepdim(D::Minus1)? / h)?;
            x.broadcast_div(&(ms + eps)?.sqrt()?)?.broadcast_mul(w)?
        }
    })
}

/// Softmax over the last dimension.
pub fn softmax_last(x: &Tensor, mode: Mode) -> Result<Tensor> {
    Ok(match mode {
        Mode::Infer => candle_nn::ops::softmax_last_dim(x)?,
        Mode::Train => {
            let max = x.max_keepdim(D::Minus1)?.detach();
            let e = x.broadcast_sub(&max)?.exp()?;
            e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?
        }
    })
}

/// Rotary position tables (HF "rotate half" convention).
#[derive(Debug, Clone)]
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
    max_pos: usize,
    interleaved: bool,
}

impl Rope {
    pub fn new(head_dim: usize, theta: f64, max_pos: usize) -> Result<Self> {
        let half = head_dim / 2;
        let inv: Vec<f32> = (0..half)
            .map(|i| (1.0 / theta.powf(2.0 * i as f64 / head_dim as f64)) as f32)
            .collect();
        let mut cos = Vec::with_capacity(max_pos * half);
        let mut sin = Vec::with_capacity(max_pos * half);
        for p in 0..max_pos {
            for f in &inv {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        Ok(Self {
            cos: Tensor::from_vec(cos, (max_pos, half), &Device::Cpu)?,
            sin: Tensor::from_vec(sin, (max_pos, half), &Device::Cpu)?,
            max_pos,
            interleaved: false,
        })
    }

    /// Rotate adjacent pairs `(x[2i], x[2i+1])` (GGUF llama) instead of halves.
    pub fn interleaved(mut self, yes: bool) -> Self {
        self.interleaved = yes;
        self
    }

    /// Rotate `x` (`[heads, len, head_dim]`) for positions `start..start+len`.
    fn apply(&self, x: &Tensor, start: usize, mode: Mode) -> Result<Tensor> {
        let len = x.dim(1)?;
        if start + len > self.max_pos {
            return Err(Error::Invalid(format!(
                "position {} exceeds max_position_embeddings {}",
                start + len - 1,
                self.max_pos
            )));
        }
        let cos = self.cos.narrow(0, start, len)?;
        let sin = self.sin.narrow(0, start, len)?;
        let x4 = x.unsqueeze(0)?;
        use candle_nn::rotary_emb as re;
        let y = match (mode, self.interleaved) {
            (Mode::Infer, false) => re::rope(&x4.contiguous()?, &cos, &sin)?,
            (Mode::Train, false) => re::rope_slow(&x4, &cos, &sin)?,
            (Mode::Infer, true) => re::rope_i(&x4.contiguous()?, &cos, &sin)?,
            (Mode::Train, true) => re::rope_i_slow(&x4, &cos, &sin)?,
        };
        Ok(y.squeeze(0)?)
    }
}

/// Grouped-query self-attention.
#[derive(Debug, Clone)]
pub struct Attention {
    /// Fused `[q; k; v]` projection.
    qkv: Proj,
    o: Proj,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn load(src: &dyn TensorSource, p: &str, c: &ModelConfig) -> Result<Self> {
        let h = c.hidden_size;
        let q = Proj::load(src, &format!("{p}.q_proj"), c.q_dim(), h, c.qkv_bias)?;
        let k = Proj::load(src, &format!("{p}.k_proj"), c.kv_dim(), h, c.qkv_bias)?;
        let v = Proj::load(src, &format!("{p}.v_proj"), c.kv_dim(), h, c.qkv_bias)?;
        let o = Proj::load(src, &format!("{p}.o_proj"), h, c.q_dim(), c.o_bias)?;
        Ok(Self {
            qkv: Proj::fuse(vec![q, k, v])?,
            o,
            num_heads: c.num_heads,
            num_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        segs: &[Seg],
        kvs: &mut [&mut LayerKv],
        rope: &Rope,
        mode: Mode,
        what: &dyn Fn() -> String,
    ) -> Result<Tensor> {
        let (nh, kvh, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let g = nh / kvh;
        let qkv = self.qkv.forward(x)?;
        let q_all = qkv.narrow(1, 0, nh * hd)?;
        let k_all = qkv.narrow(1, nh * hd, kvh * hd)?;
        let v_all = qkv.narrow(1, (nh + kvh) * hd, kvh * hd)?;
        let scale = 1.0 / (hd as f64).sqrt();
        let mut outs = Vec::with_capacity(segs.len());
        let mut off = 0;
        for (seg, kv) in segs.iter().zip(kvs.iter_mut()) {
            let len = seg.len;
            let heads = |t: &Tensor, n: usize| -> Result<Tensor> {
                Ok(t.narrow(0, off, len)?
                    .reshape((len, n, hd))?
                    .transpose(0, 1)?
                    .contiguous()?)
            };
            let q = rope.apply(&heads(&q_all, nh)?, seg.start, mode)?;
            let k = rope.apply(&heads(&k_all, kvh)?, seg.start, mode)?;
            let v = heads(&v_all, kvh)?;
            let (k, v) = kv.append(seg.start, &k, &v, mode == Mode::Train, what)?;
            if mode == Mode::Infer && !q.track_op() && !k.track_op() && !v.track_op() {
                // Row by row in a fixed order: batched rows equal single-row decoding.
                outs.push(crate::attention::causal_gqa(
                    &q,
                    &k,
                    &v,
                    seg.start,
                    scale as f32,
                )?);
                off += len;
                continue;
            }
            // Query heads are kv-major: heads j*g..(j+1)*g share kv head j.
            let q = q.reshape((kvh, g * len, hd))?;
            // A tracked `att` (training) falls back inside to the differentiable mask + softmax.
            let att = kernels::causal_softmax(&kernels::matmul_t(&q, &k)?, scale, len, seg.start)?;
            let o = att.matmul(&v)?; // [kvh, g*len, hd]
            let o = o
                .reshape((nh, len, hd))?
                .transpose(0, 1)?
                .reshape((len, nh * hd))?;
            outs.push(o);
            off += len;
        }
        let o = if outs.len() == 1 {
            outs.pop()
                .ok_or_else(|| Error::Invalid("empty batch".into()))?
        } else {
            Tensor::cat(&outs, 0)?
        };
        self.o.forward(&o)
    }
}

/// SwiGLU MLP: `down(silu(gate(x)) * up(x))`.
#[derive(Debug, Clone)]
pub struct Mlp {
    /// Fused `[gate; up]`.
    gate_up: Proj,
    down: Proj,
    inter: usize,
}

impl Mlp {
    fn load(src: &dyn TensorSource, names: [String; 3], h: usize, inter: usize) -> Result<Self> {
        let [g, u, d] = names;
        let gate = Proj::load(src, &g, inter, h, false)?;
        let up = Proj::load(src, &u, inter, h, false)?;
        let down = Proj::load(src, &d, h, inter, false)?;
        Ok(Self {
            gate_up: Proj::fuse(vec![gate, up])?,
            down,
            inter,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gu = self.gate_up.forward(x)?;
        let g = gu.narrow(1, 0, self.inter)?;
        let u = gu.narrow(1, self.inter, self.inter)?;
        self.down.forward(&(candle_nn::ops::silu(&g)? * u)?)
    }
}

/// Mixture-of-Experts FFN with a top-k router.
#[derive(Debug, Clone)]
pub struct Moe {
    pub spec: MoeSpec,
    router: Linear,
    /// `None` = not resident (expert pruning loads experts lazily, see [`Moe::load_expert`]).
    experts: Vec<Option<Mlp>>,
    shared: Option<(Mlp, Linear)>,
    /// Tensor-name prefix of the layer (`model.layers.i`), for loading experts later.
    prefix: String,
    hidden: usize,
    /// Where [`Mode::Train`] forwards record their router auxiliary losses (`None` = off).
    aux: Option<RouterAuxSink>,
}

/// Router auxiliary losses of one MoE forward in [`Mode::Train`] (both differentiable
/// scalars): the Switch-Transformer load-balancing loss `E · Σ_j f_j · P_j` (`f_j` the
/// fraction of the `tokens · top_k` routing slots given to expert `j`, `P_j` the mean router
/// probability of `j`; 1.0 when perfectly balanced) and the ST-MoE router z-loss
/// `mean_t logsumexp(logits_t)²`.
#[derive(Debug, Clone)]
pub struct RouterAux {
    pub balance: Tensor,
    pub z: Tensor,
}

/// Collects [`RouterAux`] from every MoE forward of a training model (see
/// [`crate::model::FamilialModel::set_router_aux_sink`]).
pub type RouterAuxSink = std::sync::Arc<std::sync::Mutex<Vec<RouterAux>>>;

/// Per-token routing decided by an MoE layer (for profiling and expert pruning).
#[derive(Debug, Clone)]
pub struct Routing {
    /// Router logits `[tokens, experts]`.
    pub logits: Tensor,
}

impl Moe {
    fn load(
        src: &dyn TensorSource,
        p: &str,
        h: usize,
        spec: &MoeSpec,
        experts: bool,
    ) -> Result<Self> {
        let e = spec.num_experts;
        let router_name = match spec.kind {
            MoeKind::Mixtral => format!("{p}.block_sparse_moe.gate"),
            MoeKind::Qwen2Moe => format!("{p}.mlp.gate"),
        };
        let router = Linear::load(src, &router_name, e, h, false)?;
        let shared = if spec.kind == MoeKind::Qwen2Moe && spec.shared_intermediate > 0 {
            let m = Mlp::load(
                src,
                mlp_names(&format!("{p}.mlp.shared_expert")),
                h,
                spec.shared_intermediate,
            )?;
            let g = Linear::load(src, &format!("{p}.mlp.shared_expert_gate"), 1, h, false)?;
            Some((m, g))
        } else {
            None
        };
        let mut moe = Self {
            spec: spec.clone(),
            router,
            experts: (0..e).map(|_| None).collect(),
            shared,
            prefix: p.to_string(),
            hidden: h,
            aux: None,
        };
        if experts {
            for j in 0..e {
                moe.load_expert(src, j)?;
            }
        }
        Ok(moe)
    }

    /// Tensor names (`[gate, up, down]` without `.weight`) of expert `j`.
    fn expert_names(&self, j: usize) -> [String; 3] {
        let p = &self.prefix;
        match self.spec.kind {
            MoeKind::Mixtral => {
                let b = format!("{p}.block_sparse_moe.experts.{j}");
                [format!("{b}.w1"), format!("{b}.w3"), format!("{b}.w2")]
            }
            MoeKind::Qwen2Moe => mlp_names(&format!("{p}.mlp.experts.{j}")),
        }
    }

    /// Load expert `j` from `src` (no-op if resident). Returns the bytes it now holds.
    pub fn load_expert(&mut self, src: &dyn TensorSource, j: usize) -> Result<usize> {
        let names = self.expert_names(j);
        let inter = self.spec.expert_intermediate;
        let slot = self.experts.get_mut(j).ok_or_else(|| {
            Error::Invalid(format!(
                "expert {j} does not exist (the layer has {} experts)",
                self.spec.num_experts
            ))
        })?;
        if slot.is_none() {
            *slot = Some(Mlp::load(src, names, self.hidden, inter)?);
        }
        Ok(self.expert_bytes())
    }

    /// Drop expert `j`'s weights. Returns whether it was resident.
    pub fn evict_expert(&mut self, j: usize) -> bool {
        self.experts.get_mut(j).and_then(Option::take).is_some()
    }

    /// Which experts are resident.
    pub fn resident(&self) -> Vec<bool> {
        self.experts.iter().map(Option::is_some).collect()
    }

    /// Bytes one resident expert holds (f32 gate, up and down matrices).
    pub fn expert_bytes(&self) -> usize {
        3 * self.hidden * self.spec.expert_intermediate * std::mem::size_of::<f32>()
    }

    /// Record router auxiliary losses of [`Mode::Train`] forwards into `sink` (`None`: stop).
    pub fn set_aux_sink(&mut self, sink: Option<RouterAuxSink>) {
        self.aux = sink;
    }

    /// Router logits for `x` (`[tokens, experts]`).
    pub fn router_logits(&self, x: &Tensor) -> Result<Tensor> {
        self.router.forward(x)
    }

    fn forward(&self, x: &Tensor, mode: Mode, allowed: Option<&[bool]>) -> Result<Tensor> {
        let n = x.dim(0)?;
        let e = self.spec.num_experts;
        let logits = self.router.forward(x)?;
        let probs = softmax_last(&logits, mode)?;
        // Top-k on the host: the routing decision itself carries no gradient.
        let pv: Vec<Vec<f32>> = probs.to_vec2()?;
        let mut mask = vec![0f32; n * e];
        let mut rows: Vec<Vec<u32>> = vec![Vec::new(); e];
        let k = self.spec.top_k;
        // Usable = allowed by the caller and resident; the router is restricted to them.
        let usable: Vec<bool> = (0..e)
            .map(|j| {
                self.experts[j].is_some()
                    && allowed.is_none_or(|a| a.get(j).copied().unwrap_or(false))
            })
            .collect();
        if !usable.iter().any(|&u| u) {
            return Err(Error::Invalid(format!(
                "MoE layer `{}` has no usable expert (allowed and resident)",
                self.prefix
            )));
        }
        let restricted = usable.iter().any(|&u| !u);
        let mut order: Vec<usize> = Vec::with_capacity(e);
        for (t, row) in pv.iter().enumerate() {
            order.clear();
            order.extend((0..e).filter(|&j| usable[j]));
            // Stable: ties go to the lower expert index, as torch.topk does in practice.
            order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
            for &j in order.iter().take(k) {
                mask[t * e + j] = 1.0;
                rows[j].push(t as u32);
            }
        }
        if let (Mode::Train, Some(sink)) = (mode, &self.aux) {
            let aux = self.router_aux(&logits, &probs, &rows, n)?;
            sink.lock()
                .map_err(|_| Error::Invalid("router aux sink poisoned".into()))?
                .push(aux);
        }
        let mask = Tensor::from_vec(mask, (n, e), x.device())?;
        let mut w = (probs * mask)?;
        if self.spec.norm_topk_prob || restricted {
            w = w.broadcast_div(&w.sum_keepdim(1)?)?;
        }
        // [experts, tokens]: one contiguous row of routing weights per expert.
        let wt = w.t()?.contiguous()?;
        let mut out = x.zeros_like()?;
        for (j, idx) in rows.iter().enumerate() {
            if idx.is_empty() {
                continue;
            }
            let idx = Tensor::from_slice(idx, idx.len(), x.device())?;
            let xs = x.index_select(&idx, 0)?;
            let expert = self.experts[j].as_ref().ok_or_else(|| {
                Error::Invalid(format!("internal: expert {j} routed but not resident"))
            })?;
            let ys = expert.forward(&xs)?;
            let wj = wt.get(j)?.index_select(&idx, 0)?.unsqueeze(1)?;
            out = out.index_add(&idx, &ys.broadcast_mul(&wj)?, 0)?;
        }
        if let Some((m, g)) = &self.shared {
            let gate = candle_nn::ops::sigmoid(&g.forward(x)?)?;
            out = (out + m.forward(x)?.broadcast_mul(&gate)?)?;
        }
        Ok(out)
    }
}

impl Moe {
    /// [`RouterAux`] of one forward: `rows[j]` are the tokens routed to expert `j`.
    fn router_aux(
        &self,
        logits: &Tensor,
        probs: &Tensor,
        rows: &[Vec<u32>],
        n: usize,
    ) -> Result<RouterAux> {
        let e = self.spec.num_experts;
        let slots = (n * self.spec.top_k).max(1) as f32;
        let f: Vec<f32> = rows.iter().map(|r| r.len() as f32 / slots).collect();
        let f = Tensor::from_vec(f, e, logits.device())?;
        let p = probs.mean(0)?;
        let balance = ((p * f)?.sum_all()? * e as f64)?;
        let max = logits.max_keepdim(1)?.detach();
        let lse = logits
            .broadcast_sub(&max)?
            .exp()?
            .sum_keepdim(1)?
            .log()?
            .broadcast_add(&max)?;
        let z = lse.sqr()?.mean_all()?;
        Ok(RouterAux { balance, z })
    }
}

fn mlp_names(p: &str) -> [String; 3] {
    [
        format!("{p}.gate_proj"),
        format!("{p}.up_proj"),
        format!("{p}.down_proj"),
    ]
}

/// Dense or MoE feed-forward.
#[derive(Debug, Clone)]
pub enum FfnBlock {
    Dense(Mlp),
    Moe(Moe),
}

/// A pre-norm decoder layer.
#[derive(Debug, Clone)]
pub struct Block {
    in_norm: Tensor,
    attn: Attention,
    post_norm: Tensor,
    pub ffn: FfnBlock,
    eps: f64,
}

impl Block {
    /// Load the layer whose tensors start with `prefix` (e.g. `model.layers.3`).
    pub fn load(src: &dyn TensorSource, prefix: &str, c: &ModelConfig, ffn: &Ffn) -> Result<Self> {
        Self::load_with(src, prefix, c, ffn, true)
    }

    /// [`Block::load`]; with `experts == false` an MoE layer starts with no expert resident
    /// (load them with [`Moe::load_expert`]).
    pub fn load_with(
        src: &dyn TensorSource,
        prefix: &str,
        c: &ModelConfig,
        ffn: &Ffn,
        experts: bool,
    ) -> Result<Self> {
        let h = c.hidden_size;
        let in_norm = src.get(&format!("{prefix}.input_layernorm.weight"), &[h])?;
        let post_norm = src.get(&format!("{prefix}.post_attention_layernorm.weight"), &[h])?;
        let attn = Attention::load(src, &format!("{prefix}.self_attn"), c)?;
        let ffn = match ffn {
            Ffn::Dense { intermediate } => FfnBlock::Dense(Mlp::load(
                src,
                mlp_names(&format!("{prefix}.mlp")),
                h,
                *intermediate,
            )?),
            Ffn::Moe(spec) => FfnBlock::Moe(Moe::load(src, prefix, h, spec, experts)?),
        };
        Ok(Self {
            in_norm,
            attn,
            post_norm,
            ffn,
            eps: c.rms_norm_eps,
        })
    }

    /// Tensor names of the layer at `prefix` for this config.
    pub fn tensor_names(prefix: &str, c: &ModelConfig, ffn: &Ffn) -> Vec<String> {
        let mut v = vec![
            format!("{prefix}.input_layernorm.weight"),
            format!("{prefix}.post_attention_layernorm.weight"),
        ];
        for p in ["q_proj", "k_proj", "v_proj", "o_proj"] {
            v.push(format!("{prefix}.self_attn.{p}.weight"));
            let bias = if p == "o_proj" { c.o_bias } else { c.qkv_bias };
            if bias {
                v.push(format!("{prefix}.self_attn.{p}.bias"));
            }
        }
        match ffn {
            Ffn::Dense { .. } => {
                v.extend(mlp_names(&format!("{prefix}.mlp")).map(|n| n + ".weight"))
            }
            Ffn::Moe(s) => match s.kind {
                MoeKind::Mixtral => {
                    v.push(format!("{prefix}.block_sparse_moe.gate.weight"));
                    for j in 0..s.num_experts {
                        for w in ["w1", "w2", "w3"] {
                            v.push(format!("{prefix}.block_sparse_moe.experts.{j}.{w}.weight"));
                        }
                    }
                }
                MoeKind::Qwen2Moe => {
                    v.push(format!("{prefix}.mlp.gate.weight"));
                    for j in 0..s.num_experts {
                        v.extend(
                            mlp_names(&format!("{prefix}.mlp.experts.{j}")).map(|n| n + ".weight"),
                        );
                    }
                    if s.shared_intermediate > 0 {
                        v.extend(
                            mlp_names(&format!("{prefix}.mlp.shared_expert"))
                                .map(|n| n + ".weight"),
                        );
                        v.push(format!("{prefix}.mlp.shared_expert_gate.weight"));
                    }
                }
            },
        }
        v
    }

    /// Run the layer on `x` (`[tokens, hidden]`), appending to each segment's cache.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        segs: &[Seg],
        kvs: &mut [&mut LayerKv],
        rope: &Rope,
        mode: Mode,
        allowed_experts: Option<&[bool]>,
        what: &dyn Fn() -> String,
    ) -> Result<Tensor> {
        // Nothing in this layer can receive a gradient (the frozen prefix of sparse
        // fine-tuning, below the first trainable slice): no backward pass will run through
        // it, so it runs the inference kernels (fused norm/softmax/rope, preallocated KV),
        // which are faster than the differentiable compositions and build no graph either.
        let mode = if mode == Mode::Train && !x.track_op() && !self.tracks() {
            Mode::Infer
        } else {
            mode
        };
        let h = rms_norm(x, &self.in_norm, self.eps, mode)?;
        let x = (x + self.attn.forward(&h, segs, kvs, rope, mode, what)?)?;
        let h = rms_norm(&x, &self.post_norm, self.eps, mode)?;
        let f = match &self.ffn {
            FfnBlock::Dense(m) => m.forward(&h)?,
            FfnBlock::Moe(m) => m.forward(&h, mode, allowed_experts)?,
        };
        Ok((x + f)?)
    }

    /// Whether any weight of the layer can receive a gradient. MoE layers always answer
    /// yes: in [`Mode::Train`] they record router auxiliary losses, which the inference
    /// path does not.
    pub fn tracks(&self) -> bool {
        self.in_norm.track_op()
            || self.post_norm.track_op()
            || self.attn.qkv.tracks()
            || self.attn.o.tracks()
            || match &self.ffn {
                FfnBlock::Dense(m) => m.gate_up.tracks() || m.down.tracks(),
                FfnBlock::Moe(_) => true,
            }
    }

    /// `x + attn(norm(x))` in inference mode: the residual stream before the FFN.
    pub(crate) fn attention_residual(
        &self,
        x: &Tensor,
        segs: &[Seg],
        kvs: &mut [&mut LayerKv],
        rope: &Rope,
        what: &dyn Fn() -> String,
    ) -> Result<Tensor> {
        let h = rms_norm(x, &self.in_norm, self.eps, Mode::Infer)?;
        Ok((x + self.attn.forward(&h, segs, kvs, rope, Mode::Infer, what)?)?)
    }

    /// The FFN input (post-attention norm) for the residual stream `x`.
    pub(crate) fn post_attention_input(&self, x: &Tensor) -> Result<Tensor> {
        rms_norm(x, &self.post_norm, self.eps, Mode::Infer)
    }
}

/// Make sure `dtype` is something we compute in.
pub(crate) fn check_compute_dtype(t: &Tensor) -> Result<()> {
    if t.dtype() != DType::F32 {
        return Err(Error::Invalid(format!(
            "hidden states must be f32, got {:?}",
            t.dtype()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    /// A frozen weight under a trainable input: same output and input gradient as a plain
    /// matmul, and no gradient for the weight.
    #[test]
    fn frozen_linear_matches_matmul_and_skips_weight_grad() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (5, 3), &dev)?;
        let b = Tensor::randn(0f32, 1.0, 5, &dev)?;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (4, 3), &dev)?)?;
        let frozen = Linear {
            w: w.clone(),
            b: Some(b.clone()),
            rows: None,
        };
        let y = frozen.forward(x.as_tensor())?;
        let g = y.sqr()?.sum_all()?.backward()?;
        let wt = w.t()?;
        let reference = x.as_tensor().matmul(&wt)?.broadcast_add(&b)?;
        let gr = reference.sqr()?.sum_all()?.backward()?;
        let d = (y - &reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d < 1e-5, "outputs differ by {d}");
        let gx = g.get(x.as_tensor()).expect("input gradient");
        let gxr = gr.get(x.as_tensor()).expect("reference gradient");
        let d = (gx - gxr)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d < 1e-4, "input gradients differ by {d}");
        assert!(g.get(&w).is_none(), "the frozen weight got a gradient");
        assert!(
            gr.get(&wt).is_some(),
            "candle's matmul computes it (what we avoid)"
        );
        // Inference (nothing tracked) stays a plain matmul.
        let yi = frozen.forward(&x.as_tensor().detach())?;
        assert!(!yi.track_op());
        Ok(())
    }

    /// A row-sliced frozen matrix: same output and gradients (input and slice) as the
    /// differentiable merge, alone and fused with an unsliced frozen part; the frozen
    /// matrix gets no gradient.
    #[test]
    fn sliced_linear_matches_the_merged_matmul() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (6, 4), &dev)?;
        let w2 = Tensor::randn(0f32, 1.0, (3, 4), &dev)?;
        let rows = Tensor::new(&[1u32, 4], &dev)?;
        let vals = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 4), &dev)?)?;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (5, 4), &dev)?)?;
        let sliced = Linear {
            w: w.clone(),
            b: None,
            rows: Some(RowSlice {
                rows: rows.clone(),
                values: vals.as_tensor().clone(),
            }),
        };
        let plain = Linear {
            w: w2.clone(),
            b: None,
            rows: None,
        };
        let fused = Linear::fuse(&[plain.clone(), sliced.clone()])?;
        assert!(fused.rows.is_some() && fused.tracks());
        // Reference: keep-mask + index_add, differentiable in candle's own ops.
        let keep = Tensor::new(&[[1f32], [0.], [1.], [1.], [0.], [1.]], &dev)?;
        let merged = w
            .broadcast_mul(&keep)?
            .index_add(&rows, vals.as_tensor(), 0)?;
        for (lin, wref) in [
            (&sliced, merged.clone()),
            (&fused, Tensor::cat(&[&w2, &merged], 0)?),
        ] {
            let y = lin.forward(x.as_tensor())?;
            let yr = x.as_tensor().matmul(&wref.t()?)?;
            let d = (&y - &yr)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(d < 1e-5, "outputs differ by {d}");
            let g = (y.sqr()?.sum_all()? * 0.5)?.backward()?;
            let gr = (yr.sqr()?.sum_all()? * 0.5)?.backward()?;
            for t in [x.as_tensor(), vals.as_tensor()] {
                let a = g.get(t).expect("gradient");
                let b = gr.get(t).expect("reference gradient");
                let d = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(d < 1e-4, "gradients differ by {d}");
            }
            assert!(g.get(&w).is_none(), "the frozen matrix got a gradient");
        }
        // The merged value is exact, and an untracked call is a plain matmul.
        let m = replace_rows(&w, &rows, vals.as_tensor())?;
        assert_eq!(
            m.to_vec2::<f32>()?,
            merged.detach().to_vec2::<f32>()?,
            "replace_rows is not exact"
        );
        let yi = sliced.forward(&x.as_tensor().detach())?;
        assert!(
            yi.track_op(),
            "the slice is a variable: the output must track it"
        );
        let bad = replace_rows(&w, &Tensor::new(&[9u32, 0], &dev)?, vals.as_tensor());
        assert!(bad.is_err());
        Ok(())
    }
}
