//! Model configuration: HF `config.json` for the supported layouts, normalised into one
//! [`ModelConfig`] that says, for every trunk layer and every exit, which tensors it uses.
//!
//! Supported `model_type`s: `llama`, `qwen2`, `ruyi_qwen2` (AI-Flow-Ruyi early exits),
//! `mixtral` and `qwen2_moe` (Mixture-of-Experts FFNs). A plain checkpoint becomes a family by
//! declaring exit points ([`ModelConfig::declare_exits`] or the `aiflow_exit_points` key);
//! its exits reuse the final norm and head.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};

/// Which tensor naming and block structure a checkpoint uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Layout {
    /// Llama: no attention bias unless `attention_bias`.
    Llama,
    /// Qwen2: q/k/v projections carry a bias, o_proj does not.
    Qwen2,
    /// AI-Flow-Ruyi on a Qwen2 trunk: `model.eelayers.i`, `model.norms.i`, `lm_head.i`.
    RuyiQwen2,
    /// Mixtral: every layer's FFN is a `block_sparse_moe` with `w1/w2/w3` experts.
    Mixtral,
    /// Qwen2-MoE: `mlp.experts.j.*`, a gated shared expert, some dense layers.
    Qwen2Moe,
}

impl Layout {
    /// Parse an HF `model_type`.
    pub fn from_model_type(s: &str) -> Result<Self> {
        Ok(match s {
            "llama" => Layout::Llama,
            "qwen2" => Layout::Qwen2,
            "ruyi_qwen2" => Layout::RuyiQwen2,
            "mixtral" => Layout::Mixtral,
            "qwen2_moe" => Layout::Qwen2Moe,
            other => return Err(Error::UnknownModelType(other.to_string())),
        })
    }

    /// The HF `model_type` string.
    pub fn model_type(self) -> &'static str {
        match self {
            Layout::Llama => "llama",
            Layout::Qwen2 => "qwen2",
            Layout::RuyiQwen2 => "ruyi_qwen2",
            Layout::Mixtral => "mixtral",
            Layout::Qwen2Moe => "qwen2_moe",
        }
    }

    fn qkv_bias_default(self) -> bool {
        matches!(self, Layout::Qwen2 | Layout::RuyiQwen2 | Layout::Qwen2Moe)
    }
}

/// How the experts of an MoE FFN are named and routed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MoeKind {
    /// `block_sparse_moe.gate`, `experts.j.w1` (gate) / `w3` (up) / `w2` (down);
    /// softmax over all experts, top-k, renormalised.
    Mixtral,
    /// `mlp.gate`, `mlp.experts.j.{gate,up,down}_proj`, plus `mlp.shared_expert` scaled by
    /// `sigmoid(mlp.shared_expert_gate(x))`; renormalised only if `norm_topk_prob`.
    Qwen2Moe,
}

/// The feed-forward block of one layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Ffn {
    /// SwiGLU MLP with this intermediate size.
    Dense { intermediate: usize },
    /// Mixture of experts.
    Moe(MoeSpec),
}

/// Shape and routing of a Mixture-of-Experts FFN.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoeSpec {
    pub kind: MoeKind,
    pub num_experts: usize,
    pub top_k: usize,
    pub expert_intermediate: usize,
    /// Qwen2-MoE's shared expert intermediate size (0 = none).
    pub shared_intermediate: usize,
    /// Renormalise the top-k routing weights to sum to one.
    pub norm_topk_prob: bool,
}

/// Which block an exit runs after the trunk layers `[0, point)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ExitBlock {
    /// Its own decoder layer `model.eelayers.{0}` (Ruyi, all but the last exit).
    Own(usize),
    /// The trunk layer with this index (the last Ruyi exit; every exit of a plain family).
    Trunk(usize),
}

/// Which RMSNorm an exit applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum NormRef {
    /// `model.norms.{0}`.
    Own(usize),
    /// `model.norm`.
    Final,
}

/// Which head an exit applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum HeadRef {
    /// `lm_head.{0}`.
    Own(usize),
    /// `lm_head` (one head shared by every exit).
    Shared,
    /// The input embedding matrix (`tie_word_embeddings`).
    TiedEmbedding,
}

/// One exit of the family: the member that answers after `point + 1` blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitSpec {
    /// Exit point `e`: the exit reads the hidden state after trunk layers `[0, e)`.
    pub point: usize,
    pub block: ExitBlock,
    pub norm: NormRef,
    pub head: HeadRef,
}

impl ExitSpec {
    /// Number of decoder blocks on this exit's path (`point + 1`).
    pub fn depth(&self) -> usize {
        self.point + 1
    }
}

/// RoPE parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RopeConfig {
    pub theta: f64,
    /// Rotate adjacent pairs (GPT-J / llama.cpp "normal" mode) instead of HF's rotate-half:
    /// GGUF `llama` files store q/k rows permuted for it (`aiflow_rope_interleaved`).
    #[serde(default)]
    pub interleaved: bool,
}

/// A normalised model configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub layout: Layout,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope: RopeConfig,
    pub qkv_bias: bool,
    pub o_bias: bool,
    pub tie_word_embeddings: bool,
    /// FFN of every trunk layer.
    pub ffn: Vec<Ffn>,
    /// FFN of every own exit block (`model.eelayers.i`).
    pub exit_block_ffn: Vec<Ffn>,
    /// Exits, sorted by point; the last one is the full model.
    pub exits: Vec<ExitSpec>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// dtype named in the config (`torch_dtype` / `dtype`), informational.
    pub stored_dtype: Option<String>,
}

/// Most trunk layers a configuration may declare.
pub const MAX_LAYERS: usize = 1 << 12;
/// Largest width, head count, vocabulary or FFN size a configuration may declare.
pub const MAX_DIM: usize = 1 << 24;
/// Largest `max_position_embeddings` a configuration may declare.
pub const MAX_POSITIONS: usize = 1 << 24;
/// Most experts in one MoE layer.
pub const MAX_EXPERTS: usize = 1 << 12;
/// Most experts over all layers together (each is three tensors to name and look up).
pub const MAX_TOTAL_EXPERTS: usize = 1 << 17;

/// `value` of `key`, refused when above `max`. The limits lie far above every released
/// model; they exist so that a corrupt or hostile file is refused before anything is sized
/// by its numbers (per-layer tables, tensor name lists) and so that products of two of
/// them cannot overflow.
fn bounded(key: &str, value: usize, max: usize) -> Result<usize> {
    if value > max {
        return Err(cfg_err(format!(
            "`{key}` = {value} is above {max}, the largest this loader accepts (no released \
             model comes close: is the file corrupt?)"
        )));
    }
    Ok(value)
}

fn get_usize(v: &Value, key: &str) -> Option<usize> {
    v.get(key).and_then(Value::as_u64).map(|x| x as usize)
}

fn get_f64(v: &Value, key: &str) -> Option<f64> {
    v.get(key).and_then(Value::as_f64)
}

fn get_bool(v: &Value, key: &str) -> Option<bool> {
    v.get(key).and_then(Value::as_bool)
}

fn usize_list(v: &Value, key: &str) -> Option<Vec<usize>> {
    v.get(key)?
        .as_array()?
        .iter()
        .map(|x| x.as_u64().map(|x| x as usize))
        .collect()
}

impl ModelConfig {
    /// Read and normalise `config.json` at `path`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json_str(&text).map_err(|e| match e {
            Error::Config { msg, .. } => Error::Config {
                path: path.to_path_buf(),
                msg,
            },
            other => other,
        })
    }

    /// Parse and normalise the text of a `config.json`.
    pub fn from_json_str(text: &str) -> Result<Self> {
        let v: Value = serde_json::from_str(text).map_err(|e| cfg_err(format!("not JSON: {e}")))?;
        Self::from_json(&v)
    }

    /// Normalise a parsed `config.json`.
    pub fn from_json(v: &Value) -> Result<Self> {
        let model_type = v
            .get("model_type")
            .and_then(Value::as_str)
            .ok_or_else(|| cfg_err("missing string field `model_type`".into()))?;
        let layout = Layout::from_model_type(model_type)?;
        let need_max = |key: &str, max: usize| -> Result<usize> {
            let x = get_usize(v, key)
                .ok_or_else(|| cfg_err(format!("missing integer field `{key}`")))?;
            bounded(key, x, max)
        };
        let need = |key: &str| need_max(key, MAX_DIM);
        let vocab_size = need("vocab_size")?;
        let hidden_size = need("hidden_size")?;
        let num_layers = need_max("num_hidden_layers", MAX_LAYERS)?;
        let num_heads = need("num_attention_heads")?;
        let num_kv_heads = match get_usize(v, "num_key_value_heads") {
            Some(n) => bounded("num_key_value_heads", n, MAX_DIM)?,
            None => num_heads,
        };
        let head_dim = match v.get("head_dim") {
            Some(Value::Number(n)) => n.as_u64().map(|x| x as usize).unwrap_or(0),
            _ => 0,
        };
        let head_dim = bounded("head_dim", head_dim, MAX_DIM)?;
        let head_dim = if head_dim == 0 {
            if num_heads == 0 || hidden_size % num_heads != 0 {
                return Err(cfg_err(format!(
                    "hidden_size {hidden_size} is not divisible by num_attention_heads {num_heads}"
                )));
            }
            hidden_size / num_heads
        } else {
            head_dim
        };
        if num_layers == 0 {
            return Err(cfg_err("num_hidden_layers must be at least 1".into()));
        }
        if num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            return Err(cfg_err(format!(
                "num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv_heads}"
            )));
        }
        if head_dim % 2 != 0 {
            return Err(cfg_err(format!(
                "head_dim {head_dim} must be even for RoPE"
            )));
        }
        // rope_theta moved into `rope_parameters` in newer transformers versions.
        let rope_params = v.get("rope_parameters");
        let theta = get_f64(v, "rope_theta")
            .or_else(|| rope_params.and_then(|r| get_f64(r, "rope_theta")))
            .unwrap_or(10_000.0);
        for key in ["rope_scaling", "rope_parameters"] {
            if let Some(r) = v.get(key).filter(|r| !r.is_null()) {
                let kind = r
                    .get("rope_type")
                    .or_else(|| r.get("type"))
                    .and_then(Value::as_str)
                    .unwrap_or("default");
                if kind != "default" {
                    return Err(cfg_err(format!(
                        "{key}.rope_type `{kind}` is not supported (only plain RoPE); remove it or use a checkpoint without RoPE scaling"
                    )));
                }
            }
        }
        if get_bool(v, "use_sliding_window") == Some(true) {
            return Err(cfg_err(
                "use_sliding_window: true is not supported (full causal attention only)".into(),
            ));
        }
        let rms_norm_eps = get_f64(v, "rms_norm_eps").unwrap_or(1e-6);
        let qkv_bias = get_bool(v, "attention_bias").unwrap_or(layout.qkv_bias_default());
        let o_bias = matches!(layout, Layout::Llama) && get_bool(v, "attention_bias") == Some(true);
        let tie_word_embeddings = get_bool(v, "tie_word_embeddings").unwrap_or(false);
        let max_position_embeddings = bounded(
            "max_position_embeddings",
            get_usize(v, "max_position_embeddings").unwrap_or(4096),
            MAX_POSITIONS,
        )?;
        let intermediate = match (get_usize(v, "intermediate_size"), layout) {
            (Some(_), _) | (None, Layout::Llama | Layout::Qwen2 | Layout::RuyiQwen2) => {
                need("intermediate_size")?
            }
            (None, Layout::Mixtral | Layout::Qwen2Moe) => 0,
        };

        let ffn: Vec<Ffn> = (0..num_layers)
            .map(|i| layer_ffn(v, layout, i, intermediate))
            .collect::<Result<_>>()?;
        let experts: usize = ffn
            .iter()
            .map(|f| match f {
                Ffn::Moe(m) => m.num_experts,
                Ffn::Dense { .. } => 0,
            })
            .sum();
        if experts > MAX_TOTAL_EXPERTS {
            return Err(cfg_err(format!(
                "{num_layers} layers declare {experts} experts in all, above {MAX_TOTAL_EXPERTS}, \
                 the most this loader accepts (is the file corrupt?)"
            )));
        }

        let mut cfg = ModelConfig {
            layout,
            vocab_size,
            hidden_size,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            max_position_embeddings,
            rms_norm_eps,
            rope: RopeConfig {
                theta,
                interleaved: get_bool(v, "aiflow_rope_interleaved").unwrap_or(false),
            },
            qkv_bias,
            o_bias,
            tie_word_embeddings,
            ffn,
            exit_block_ffn: Vec::new(),
            exits: Vec::new(),
            bos_token_id: get_usize(v, "bos_token_id").map(|x| x as u32),
            eos_token_ids: match v.get("eos_token_id") {
                Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
                Some(Value::Array(a)) => a
                    .iter()
                    .filter_map(|x| x.as_u64().map(|x| x as u32))
                    .collect(),
                _ => Vec::new(),
            },
            stored_dtype: v
                .get("torch_dtype")
                .or_else(|| v.get("dtype"))
                .and_then(Value::as_str)
                .map(str::to_string),
        };

        if layout == Layout::RuyiQwen2 {
            let points = usize_list(v, "early_exit_points").ok_or_else(|| {
                cfg_err("ruyi_qwen2 needs an integer list `early_exit_points`".into())
            })?;
            let shared = get_bool(v, "shared_heads").unwrap_or(false);
            cfg.set_ruyi_exits(&points, shared)?;
        } else {
            let points =
                usize_list(v, "aiflow_exit_points").unwrap_or_else(|| vec![num_layers - 1]);
            cfg.declare_exits(&points)?;
        }
        Ok(cfg)
    }

    fn set_ruyi_exits(&mut self, points: &[usize], shared_heads: bool) -> Result<()> {
        check_points(points, self.num_layers)?;
        if points.last() != Some(&(self.num_layers - 1)) {
            return Err(cfg_err(format!(
                "the last early_exit_point must be the last layer {} (got {:?})",
                self.num_layers - 1,
                points
            )));
        }
        let n = points.len();
        self.exits = points
            .iter()
            .enumerate()
            .map(|(i, &p)| ExitSpec {
                point: p,
                block: if i + 1 == n {
                    ExitBlock::Trunk(p)
                } else {
                    ExitBlock::Own(i)
                },
                norm: NormRef::Own(i),
                head: if shared_heads {
                    HeadRef::Shared
                } else {
                    HeadRef::Own(i)
                },
            })
            .collect();
        let dense = Ffn::Dense {
            intermediate: match &self.ffn[0] {
                Ffn::Dense { intermediate } => *intermediate,
                Ffn::Moe(_) => 0,
            },
        };
        self.exit_block_ffn = vec![dense; n - 1];
        Ok(())
    }

    /// Declare a plain (non-Ruyi) checkpoint a family: exit `e` runs trunk layers `[0, e]`
    /// and then the final norm and head. The last point must be the last layer.
    pub fn declare_exits(&mut self, points: &[usize]) -> Result<()> {
        if self.layout == Layout::RuyiQwen2 {
            return Err(cfg_err(
                "ruyi_qwen2 checkpoints define their exits in `early_exit_points`".into(),
            ));
        }
        check_points(points, self.num_layers)?;
        if points.last() != Some(&(self.num_layers - 1)) {
            return Err(cfg_err(format!(
                "the last exit point must be the last layer {} (got {:?})",
                self.num_layers - 1,
                points
            )));
        }
        let head = if self.tie_word_embeddings {
            HeadRef::TiedEmbedding
        } else {
            HeadRef::Shared
        };
        self.exits = points
            .iter()
            .map(|&p| ExitSpec {
                point: p,
                block: ExitBlock::Trunk(p),
                norm: NormRef::Final,
                head,
            })
            .collect();
        self.exit_block_ffn.clear();
        Ok(())
    }

    /// Attach Ruyi-style exits to a plain (non-Ruyi) trunk: exit `points[i]` (all but the
    /// last) reads the state after trunk layers `[0, point)` and runs its own decoder block
    /// `model.eelayers.{i}` (same shape as a trunk layer), its own norm `model.norms.{i}` and
    /// the head `head` (tied embedding or `lm_head`); the last point must be the last layer
    /// and is the full model (trunk block, final norm). Used by family overlays
    /// ([`crate::family`]).
    pub fn attach_exits(&mut self, points: &[usize]) -> Result<()> {
        if self.layout == Layout::RuyiQwen2 {
            return Err(cfg_err(
                "ruyi_qwen2 checkpoints already have their exits in `early_exit_points`".into(),
            ));
        }
        if self.ffn.iter().any(|f| matches!(f, Ffn::Moe(_))) {
            return Err(cfg_err(
                "exit blocks can only be attached to dense trunks".into(),
            ));
        }
        self.declare_exits(points)?;
        let n = self.exits.len();
        for (i, e) in self.exits.iter_mut().take(n - 1).enumerate() {
            e.block = ExitBlock::Own(i);
            e.norm = NormRef::Own(i);
        }
        self.exit_block_ffn = self.exits[..n - 1]
            .iter()
            .map(|e| self.ffn[e.point].clone())
            .collect();
        Ok(())
    }

    /// Exit points, ascending.
    pub fn exit_points(&self) -> Vec<usize> {
        self.exits.iter().map(|e| e.point).collect()
    }

    /// Index of the exit at `point`.
    pub fn exit_index(&self, point: usize) -> Result<usize> {
        self.exits
            .iter()
            .position(|e| e.point == point)
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "{point} is not an exit point of this family (exits: {:?})",
                    self.exit_points()
                ))
            })
    }

    /// The deepest exit (the full model).
    pub fn last_exit(&self) -> &ExitSpec {
        // `exits` is never empty after parsing.
        &self.exits[self.exits.len() - 1]
    }

    /// Query width `num_heads * head_dim`.
    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }

    /// Key/value width `num_kv_heads * head_dim`.
    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// Render back to an HF `config.json` value (used by `model init`).
    pub fn to_hf_json(&self) -> Value {
        let mut m = serde_json::Map::new();
        let mut put = |k: &str, v: Value| {
            m.insert(k.to_string(), v);
        };
        let arch = match self.layout {
            Layout::Llama => "LlamaForCausalLM",
            Layout::Qwen2 => "Qwen2ForCausalLM",
            Layout::RuyiQwen2 => "RuyiQwen2ForCausalLM",
            Layout::Mixtral => "MixtralForCausalLM",
            Layout::Qwen2Moe => "Qwen2MoeForCausalLM",
        };
        put("architectures", serde_json::json!([arch]));
        put("model_type", self.layout.model_type().into());
        put("vocab_size", self.vocab_size.into());
        put("hidden_size", self.hidden_size.into());
        put("num_hidden_layers", self.num_layers.into());
        put("num_attention_heads", self.num_heads.into());
        put("num_key_value_heads", self.num_kv_heads.into());
        put("head_dim", self.head_dim.into());
        put(
            "max_position_embeddings",
            self.max_position_embeddings.into(),
        );
        put("rms_norm_eps", self.rms_norm_eps.into());
        put("rope_theta", self.rope.theta.into());
        if self.rope.interleaved {
            put("aiflow_rope_interleaved", true.into());
        }
        put("tie_word_embeddings", self.tie_word_embeddings.into());
        put("hidden_act", "silu".into());
        if let Some(d) = &self.stored_dtype {
            put("torch_dtype", d.as_str().into());
        }
        if let Some(b) = self.bos_token_id {
            put("bos_token_id", b.into());
        }
        match self.eos_token_ids.as_slice() {
            [] => {}
            [e] => put("eos_token_id", (*e).into()),
            all => put("eos_token_id", serde_json::json!(all)),
        }
        if self.layout == Layout::Llama || self.qkv_bias != self.layout.qkv_bias_default() {
            put("attention_bias", self.qkv_bias.into());
        }
        let dense_inter = self.ffn.iter().find_map(|f| match f {
            Ffn::Dense { intermediate } => Some(*intermediate),
            Ffn::Moe(_) => None,
        });
        if let Some(i) = dense_inter {
            put("intermediate_size", i.into());
        }
        if let Some(moe) = self.ffn.iter().find_map(|f| match f {
            Ffn::Moe(s) => Some(s.clone()),
            Ffn::Dense { .. } => None,
        }) {
            match moe.kind {
                MoeKind::Mixtral => {
                    put("num_local_experts", moe.num_experts.into());
                    put("intermediate_size", moe.expert_intermediate.into());
                }
                MoeKind::Qwen2Moe => {
                    put("num_experts", moe.num_experts.into());
                    put("moe_intermediate_size", moe.expert_intermediate.into());
                    put(
                        "shared_expert_intermediate_size",
                        moe.shared_intermediate.into(),
                    );
                    put("norm_topk_prob", moe.norm_topk_prob.into());
                    put("decoder_sparse_step", 1.into());
                    let dense: Vec<usize> = self
                        .ffn
                        .iter()
                        .enumerate()
                        .filter(|(_, f)| matches!(f, Ffn::Dense { .. }))
                        .map(|(i, _)| i)
                        .collect();
                    put("mlp_only_layers", serde_json::json!(dense));
                }
            }
            put("num_experts_per_tok", moe.top_k.into());
        }
        let points = self.exit_points();
        if self.layout == Layout::RuyiQwen2 {
            put("early_exit_points", serde_json::json!(points));
            if let Some(last) = self.exits.last() {
                put("default_early_exit_point", last.point.into());
                put("shared_heads", matches!(last.head, HeadRef::Shared).into());
            }
        } else if points.len() > 1 {
            put("aiflow_exit_points", serde_json::json!(points));
        }
        Value::Object(m)
    }
}

fn layer_ffn(v: &Value, layout: Layout, i: usize, intermediate: usize) -> Result<Ffn> {
    let top_k = get_usize(v, "num_experts_per_tok").unwrap_or(2);
    match layout {
        Layout::Llama | Layout::Qwen2 | Layout::RuyiQwen2 => Ok(Ffn::Dense { intermediate }),
        Layout::Mixtral => {
            let n = get_usize(v, "num_local_experts")
                .ok_or_else(|| cfg_err("mixtral needs `num_local_experts`".into()))?;
            let n = bounded("num_local_experts", n, MAX_EXPERTS)?;
            check_moe(n, top_k)?;
            Ok(Ffn::Moe(MoeSpec {
                kind: MoeKind::Mixtral,
                num_experts: n,
                top_k,
                expert_intermediate: intermediate,
                shared_intermediate: 0,
                norm_topk_prob: true,
            }))
        }
        Layout::Qwen2Moe => {
            let n = bounded(
                "num_experts",
                get_usize(v, "num_experts").unwrap_or(0),
                MAX_EXPERTS,
            )?;
            let step = get_usize(v, "decoder_sparse_step").unwrap_or(1).max(1);
            let dense_only = usize_list(v, "mlp_only_layers").unwrap_or_default();
            if n == 0 || dense_only.contains(&i) || (i + 1) % step != 0 {
                if intermediate == 0 {
                    return Err(cfg_err(format!(
                        "layer {i} is dense but `intermediate_size` is missing"
                    )));
                }
                return Ok(Ffn::Dense { intermediate });
            }
            check_moe(n, top_k)?;
            Ok(Ffn::Moe(MoeSpec {
                kind: MoeKind::Qwen2Moe,
                num_experts: n,
                top_k,
                expert_intermediate: bounded(
                    "moe_intermediate_size",
                    get_usize(v, "moe_intermediate_size")
                        .ok_or_else(|| cfg_err("qwen2_moe needs `moe_intermediate_size`".into()))?,
                    MAX_DIM,
                )?,
                shared_intermediate: bounded(
                    "shared_expert_intermediate_size",
                    get_usize(v, "shared_expert_intermediate_size").unwrap_or(0),
                    MAX_DIM,
                )?,
                norm_topk_prob: get_bool(v, "norm_topk_prob").unwrap_or(false),
            }))
        }
    }
}

fn check_moe(n: usize, top_k: usize) -> Result<()> {
    if top_k == 0 || top_k > n {
        return Err(cfg_err(format!(
            "num_experts_per_tok {top_k} must be in 1..={n} (the number of experts)"
        )));
    }
    Ok(())
}

fn check_points(points: &[usize], num_layers: usize) -> Result<()> {
    if points.is_empty() {
        return Err(cfg_err("a family needs at least one exit point".into()));
    }
    if points.windows(2).any(|w| w[0] >= w[1]) {
        return Err(cfg_err(format!(
            "exit points must be strictly increasing (got {points:?})"
        )));
    }
    if let Some(&p) = points.iter().find(|&&p| p >= num_layers) {
        return Err(cfg_err(format!(
            "exit point {p} is beyond the last layer {}",
            num_layers - 1
        )));
    }
    Ok(())
}

fn cfg_err(msg: String) -> Error {
    Error::Config {
        path: "config.json".into(),
        msg,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ruyi_json() -> Value {
        serde_json::json!({
            "model_type": "ruyi_qwen2", "vocab_size": 152064, "hidden_size": 3584,
            "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
            "num_key_value_heads": 4, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
            "early_exit_points": [11, 15, 19, 23, 27], "default_early_exit_point": 27,
            "shared_heads": false, "tie_word_embeddings": false
        })
    }

    #[test]
    fn ruyi_7b_exits_follow_the_released_code() {
        let c = ModelConfig::from_json(&ruyi_json()).unwrap();
        assert_eq!(c.exit_points(), vec![11, 15, 19, 23, 27]);
        assert_eq!(c.exits[0].block, ExitBlock::Own(0));
        assert_eq!(c.exits[3].block, ExitBlock::Own(3));
        assert_eq!(c.exits[4].block, ExitBlock::Trunk(27));
        assert_eq!(c.exits[2].norm, NormRef::Own(2));
        assert_eq!(c.exits[4].head, HeadRef::Own(4));
        assert_eq!(c.exit_block_ffn.len(), 4);
        assert_eq!(c.head_dim, 128);
        assert!(c.qkv_bias && !c.o_bias);
        assert_eq!(c.exits[0].depth(), 12);
    }

    #[test]
    fn bad_configs_name_the_field() {
        let mut v = ruyi_json();
        v["model_type"] = "gpt2".into();
        assert!(
            matches!(ModelConfig::from_json(&v), Err(Error::UnknownModelType(t)) if t == "gpt2")
        );
        let mut v = ruyi_json();
        v["early_exit_points"] = serde_json::json!([11, 15]);
        let e = ModelConfig::from_json(&v).unwrap_err().to_string();
        assert!(e.contains("last early_exit_point"), "{e}");
        let mut v = ruyi_json();
        v.as_object_mut().unwrap().remove("hidden_size");
        let e = ModelConfig::from_json(&v).unwrap_err().to_string();
        assert!(e.contains("hidden_size"), "{e}");
        let mut v = ruyi_json();
        v["rope_scaling"] = serde_json::json!({"rope_type": "yarn", "factor": 4.0});
        let e = ModelConfig::from_json(&v).unwrap_err().to_string();
        assert!(e.contains("yarn"), "{e}");
    }

    /// Counts that size tables before any tensor is checked are refused, naming the key.
    #[test]
    fn huge_counts_are_refused() {
        let base = serde_json::json!({
            "model_type": "qwen2_moe", "vocab_size": 100, "hidden_size": 32,
            "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_experts": 4, "moe_intermediate_size": 48
        });
        assert!(ModelConfig::from_json(&base).is_ok());
        for (key, value, what) in [
            (
                "num_hidden_layers",
                serde_json::json!(1_000_000_000_000u64),
                "num_hidden_layers",
            ),
            ("vocab_size", serde_json::json!(1u64 << 40), "vocab_size"),
            ("head_dim", serde_json::json!(1u64 << 62), "head_dim"),
            (
                "max_position_embeddings",
                serde_json::json!(1u64 << 40),
                "max_position",
            ),
            ("num_experts", serde_json::json!(1u64 << 20), "num_experts"),
            (
                "num_hidden_layers",
                serde_json::json!(4096),
                "experts in all",
            ),
        ] {
            let mut v = base.clone();
            v[key] = value;
            if what == "experts in all" {
                v["num_experts"] = serde_json::json!(4096);
            }
            let e = ModelConfig::from_json(&v).unwrap_err().to_string();
            assert!(e.contains(what), "{key}: {e}");
        }
    }

    #[test]
    fn plain_family_and_round_trip() {
        let v = serde_json::json!({
            "model_type": "qwen2", "vocab_size": 100, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
            "tie_word_embeddings": true
        });
        let mut c = ModelConfig::from_json(&v).unwrap();
        assert_eq!(c.exit_points(), vec![3]);
        c.declare_exits(&[1, 3]).unwrap();
        assert_eq!(c.exits[0].block, ExitBlock::Trunk(1));
        assert_eq!(c.exits[0].head, HeadRef::TiedEmbedding);
        let back = ModelConfig::from_json(&c.to_hf_json()).unwrap();
        assert_eq!(back, c);
        assert!(c.declare_exits(&[1, 2]).is_err());
        assert!(c.declare_exits(&[2, 1, 3]).is_err());
    }

    #[test]
    fn qwen2_moe_dense_and_sparse_layers() {
        let v = serde_json::json!({
            "model_type": "qwen2_moe", "vocab_size": 100, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
            "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 48,
            "shared_expert_intermediate_size": 64, "decoder_sparse_step": 1, "mlp_only_layers": [0]
        });
        let c = ModelConfig::from_json(&v).unwrap();
        assert_eq!(c.ffn[0], Ffn::Dense { intermediate: 64 });
        assert!(
            matches!(&c.ffn[1], Ffn::Moe(s) if s.num_experts == 4 && !s.norm_topk_prob && s.shared_intermediate == 64)
        );
        let back = ModelConfig::from_json(&c.to_hf_json()).unwrap();
        assert_eq!(back, c);
    }
}
