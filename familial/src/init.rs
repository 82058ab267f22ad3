//! Seeded checkpoints in the exact HF layouts (`flow-node model init`): `config.json`,
//! `model.safetensors` and the byte-level `tokenizer.json`. The same code names every
//! tensor that loading reads, so a checkpoint written here exercises the real loader.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::config::{Ffn, Layout, ModelConfig, MoeKind, MoeSpec, RopeConfig};
use crate::error::{Error, Result};
use crate::layers::Block;
use crate::model::{FamilialModel, Part};
use crate::tokenizer::{byte_level_tokenizer_json, BYTE_BOS, BYTE_EOS, BYTE_VOCAB};
use crate::weights::save_safetensors;

/// Built-in family sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Preset {
    /// For tests: 6 layers, hidden 64, exits after layers 1/3/5; ~0.4M parameters.
    Tiny,
    /// The demo family: 8 layers, hidden 128, exits after layers 1/3/5/7; ~2.4M parameters.
    Small,
    /// MoE family for the cloud tier: 8 layers, hidden 128, layers 4.. are MoE (8 experts, top-2).
    MoeSmall,
    /// For serving benchmarks: 6 layers, hidden 384, exits after layers 1/3/5, 4096
    /// positions; ~10M parameters, so a long prompt's prefill costs what it costs on a real
    /// model relative to a decode step. Never trained (seeded weights only).
    Medium,
}

impl std::str::FromStr for Preset {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "tiny" => Ok(Preset::Tiny),
            "small" => Ok(Preset::Small),
            "moe-small" => Ok(Preset::MoeSmall),
            "medium" => Ok(Preset::Medium),
            o => Err(format!(
                "unknown preset `{o}` (use tiny, small, moe-small or medium)"
            )),
        }
    }
}

/// The configuration of `preset` in `layout`.
pub fn preset_config(preset: Preset, layout: Layout) -> Result<ModelConfig> {
    let (hidden, layers, heads, kv, inter, exits): (usize, usize, usize, usize, usize, Vec<usize>) =
        match preset {
            Preset::Tiny => (64, 6, 4, 2, 128, vec![1, 3, 5]),
            Preset::Small => (128, 8, 4, 2, 384, vec![1, 3, 5, 7]),
            Preset::MoeSmall => (128, 8, 4, 2, 384, vec![1, 3, 5, 7]),
            Preset::Medium => (384, 6, 6, 2, 1024, vec![1, 3, 5]),
        };
    let max_positions = match preset {
        Preset::Medium => 4096,
        _ => 1024,
    };
    let moe_layout = match (preset, layout) {
        (Preset::MoeSmall, Layout::Mixtral | Layout::Qwen2Moe) => true,
        (Preset::MoeSmall, _) => {
            return Err(Error::Invalid(
                "moe-small needs --layout mixtral or qwen2_moe".into(),
            ))
        }
        (_, Layout::Mixtral | Layout::Qwen2Moe) => {
            return Err(Error::Invalid(format!(
                "--layout {} needs --preset moe-small",
                layout.model_type()
            )))
        }
        _ => false,
    };
    let ffn: Vec<Ffn> = (0..layers)
        .map(|i| {
            if moe_layout && i >= layers / 2 {
                Ffn::Moe(MoeSpec {
                    kind: if layout == Layout::Mixtral {
                        MoeKind::Mixtral
                    } else {
                        MoeKind::Qwen2Moe
                    },
                    num_experts: 8,
                    top_k: 2,
                    expert_intermediate: inter / 2,
                    shared_intermediate: if layout == Layout::Qwen2Moe {
                        inter / 2
                    } else {
                        0
                    },
                    norm_topk_prob: true,
                })
            } else {
                Ffn::Dense {
                    intermediate: inter,
                }
            }
        })
        .collect();
    let mut cfg = ModelConfig {
        layout,
        vocab_size: BYTE_VOCAB,
        hidden_size: hidden,
        num_layers: layers,
        num_heads: heads,
        num_kv_heads: kv,
        head_dim: hidden / heads,
        max_position_embeddings: max_positions,
        rms_norm_eps: 1e-6,
        rope: RopeConfig {
            theta: 10_000.0,
            interleaved: false,
        },
        qkv_bias: matches!(layout, Layout::Qwen2 | Layout::RuyiQwen2 | Layout::Qwen2Moe),
        o_bias: false,
        tie_word_embeddings: false,
        ffn,
        exit_block_ffn: Vec::new(),
        exits: Vec::new(),
        bos_token_id: Some(BYTE_BOS),
        eos_token_ids: vec![BYTE_EOS],
        stored_dtype: Some("float32".into()),
    };
    if layout == Layout::Mixtral {
        // Mixtral has no dense layers in HF's class: every layer is MoE.
        for f in cfg.ffn.iter_mut() {
            if let Ffn::Dense { .. } = f {
                *f = Ffn::Moe(MoeSpec {
                    kind: MoeKind::Mixtral,
                    num_experts: 8,
                    top_k: 2,
                    expert_intermediate: inter / 2,
                    shared_intermediate: 0,
                    norm_topk_prob: true,
                });
            }
        }
    }
    // Round-trip through config.json so the exits are derived exactly as when loading.
    let mut json = cfg.to_hf_json();
    if layout == Layout::RuyiQwen2 {
        json["early_exit_points"] = serde_json::json!(exits);
        json["default_early_exit_point"] = serde_json::json!(layers - 1);
        json["shared_heads"] = false.into();
        json["intermediate_size"] = inter.into();
    } else {
        json["aiflow_exit_points"] = serde_json::json!(exits);
    }
    ModelConfig::from_json(&json)
}

/// Fresh seeded weights for every tensor `cfg` names.
///
/// Projections are N(0, 1/fan_in), residual outputs (o_proj, down) further scaled by
/// 1/sqrt(2·layers), embeddings N(0, 1), norms 1, biases 0.
pub fn init_weights(cfg: &ModelConfig, seed: u64) -> Result<HashMap<String, Tensor>> {
    let names = FamilialModel::tensor_names(cfg, &Part::full(cfg))?;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = HashMap::new();
    let shapes = tensor_shapes(cfg)?;
    let resid = 1.0 / ((2 * cfg.num_layers) as f64).sqrt();
    for name in names {
        let shape = shapes
            .get(&name)
            .cloned()
            .ok_or_else(|| Error::Invalid(format!("internal: no shape for `{name}`")))?;
        let n: usize = shape.iter().product();
        let data: Vec<f32> = if name.ends_with("layernorm.weight")
            || name.contains("norm") && shape.len() == 1
        {
            vec![1.0; n]
        } else if name.ends_with(".bias") {
            vec![0.0; n]
        } else {
            let fan_in = *shape.last().unwrap_or(&1) as f64;
            let mut std = if name.contains("embed_tokens") {
                1.0
            } else {
                1.0 / fan_in.sqrt()
            };
            if name.contains("o_proj") || name.contains("down_proj") || name.ends_with("w2.weight")
            {
                std *= resid;
            }
            (0..n).map(|_| (normal(&mut rng) * std) as f32).collect()
        };
        out.insert(name, Tensor::from_vec(data, shape, &Device::Cpu)?);
    }
    Ok(out)
}

fn normal(rng: &mut StdRng) -> f64 {
    // Box-Muller: platform-independent given the same RNG stream.
    let u1: f64 = rng.gen::<f64>().max(1e-12);
    let u2: f64 = rng.gen::<f64>();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// Shape of every tensor of the full family.
pub fn tensor_shapes(cfg: &ModelConfig) -> Result<HashMap<String, Vec<usize>>> {
    let h = cfg.hidden_size;
    let mut m = HashMap::new();
    let full = Part::full(cfg);
    for name in FamilialModel::tensor_names(cfg, &full)? {
        let shape = shape_of(cfg, &name, h).ok_or_else(|| {
            Error::Invalid(format!("internal: cannot derive the shape of `{name}`"))
        })?;
        m.insert(name, shape);
    }
    Ok(m)
}

fn shape_of(cfg: &ModelConfig, name: &str, h: usize) -> Option<Vec<usize>> {
    let (q, kv) = (cfg.q_dim(), cfg.kv_dim());
    if name == "model.embed_tokens.weight" || name.starts_with("lm_head") {
        return Some(vec![cfg.vocab_size, h]);
    }
    if name.ends_with("norm.weight")
        || name.ends_with("layernorm.weight")
        || name.starts_with("model.norms.")
    {
        return Some(vec![h]);
    }
    let ffn = block_ffn(cfg, name)?;
    let is_bias = name.ends_with(".bias");
    let proj = |out: usize| if is_bias { vec![out] } else { vec![out, h] };
    if name.contains("q_proj") {
        return Some(proj(q));
    }
    if name.contains("k_proj") || name.contains("v_proj") {
        return Some(proj(kv));
    }
    if name.contains("o_proj") {
        return Some(if is_bias { vec![h] } else { vec![h, q] });
    }
    let (inter, experts) = match &ffn {
        Ffn::Dense { intermediate } => (*intermediate, 0),
        Ffn::Moe(s) => {
            if name.contains("shared_expert_gate") {
                return Some(vec![1, h]);
            }
            if name.contains("shared_expert.") {
                return Some(if name.contains("down_proj") {
                    vec![h, s.shared_intermediate]
                } else {
                    vec![s.shared_intermediate, h]
                });
            }
            (s.expert_intermediate, s.num_experts)
        }
    };
    if name.ends_with(".gate.weight") {
        return Some(vec![experts, h]);
    }
    if name.contains("down_proj") || name.ends_with("w2.weight") {
        return Some(vec![h, inter]);
    }
    Some(vec![inter, h])
}

fn block_ffn(cfg: &ModelConfig, name: &str) -> Option<Ffn> {
    let rest = name.strip_prefix("model.")?;
    let (kind, rest) = rest.split_once('.')?;
    let idx: usize = rest.split('.').next()?.parse().ok()?;
    match kind {
        "layers" => cfg.ffn.get(idx).cloned(),
        "eelayers" => cfg.exit_block_ffn.get(idx).cloned(),
        _ => None,
    }
}

/// Write a complete checkpoint directory for `cfg` with `tensors`.
pub fn write_checkpoint(
    cfg: &ModelConfig,
    tensors: &HashMap<String, Tensor>,
    dtype: DType,
    dir: &Path,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut json = cfg.to_hf_json();
    json["torch_dtype"] = match dtype {
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        _ => "float32",
    }
    .into();
    let text = serde_json::to_string_pretty(&json)
        .map_err(|e| Error::Invalid(format!("config serialisation: {e}")))?;
    let cfg_path = dir.join("config.json");
    std::fs::write(&cfg_path, text + "\n").map_err(|e| Error::io(&cfg_path, e))?;
    save_safetensors(tensors, dtype, &dir.join("model.safetensors"))?;
    let tok = dir.join("tokenizer.json");
    if cfg.vocab_size == BYTE_VOCAB {
        std::fs::write(&tok, byte_level_tokenizer_json()).map_err(|e| Error::io(&tok, e))?;
    }
    Ok(())
}

/// `flow-node model init`: a seeded checkpoint of `preset` in `layout` written to `dir`.
pub fn init_checkpoint(
    preset: Preset,
    layout: Layout,
    seed: u64,
    dir: &Path,
) -> Result<ModelConfig> {
    let cfg = preset_config(preset, layout)?;
    let w = init_weights(&cfg, seed)?;
    write_checkpoint(&cfg, &w, DType::F32, dir)?;
    Ok(cfg)
}

/// Number of parameters in the tensors of one exit's member (embedding, trunk `[0, e)`,
/// its block, norm and head).
pub fn member_parameters(cfg: &ModelConfig, point: usize) -> Result<usize> {
    let shapes = tensor_shapes(cfg)?;
    let part = Part {
        embed: true,
        trunk: 0..point,
        exits: vec![point],
    };
    Ok(FamilialModel::tensor_names(cfg, &part)?
        .iter()
        .filter_map(|n| shapes.get(n))
        .map(|s| s.iter().product::<usize>())
        .sum())
}

/// Names of the layer at `prefix` (re-exported for tools).
pub fn block_tensor_names(prefix: &str, cfg: &ModelConfig, ffn: &Ffn) -> Vec<String> {
    Block::tensor_names(prefix, cfg, ffn)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medium_preset_is_a_long_context_dense_family() {
        let cfg = preset_config(Preset::Medium, Layout::Qwen2).unwrap();
        assert_eq!(cfg.max_position_embeddings, 4096);
        assert_eq!((cfg.hidden_size, cfg.num_layers), (384, 6));
        assert_eq!(cfg.exit_points(), vec![1, 3, 5]);
        assert!(cfg.ffn.iter().all(|f| matches!(f, Ffn::Dense { .. })));
        let params = member_parameters(&cfg, 5).unwrap();
        assert!((8_000_000..12_000_000).contains(&params), "{params}");
        assert_eq!("medium".parse::<Preset>(), Ok(Preset::Medium));
        // The other presets keep their 1024 positions (committed checkpoints use them).
        let small = preset_config(Preset::Small, Layout::RuyiQwen2).unwrap();
        assert_eq!(small.max_position_embeddings, 1024);
        assert!(preset_config(Preset::Medium, Layout::Mixtral).is_err());
    }
}
