//! HF tensor names ↔ GGUF (llama.cpp) tensor names for the llama and qwen2 architectures.

/// The GGUF name of the HF tensor `hf`, if the layout has one.
///
/// `model.layers.{i}.self_attn.q_proj.weight` → `blk.{i}.attn_q.weight`, etc.;
/// `model.embed_tokens.weight` → `token_embd.weight`, `model.norm.weight` →
/// `output_norm.weight`, `lm_head.weight` → `output.weight`.
pub fn gguf_name(hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, suffix) = match rest.rsplit_once('.') {
        Some((m, s @ ("weight" | "bias"))) => (m, s),
        _ => return None,
    };
    let g = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{g}.{suffix}"))
}

#[cfg(test)]
mod tests {
    use super::gguf_name;

    #[test]
    fn maps_every_llama_tensor() {
        let cases = [
            ("model.embed_tokens.weight", "token_embd.weight"),
            ("model.norm.weight", "output_norm.weight"),
            ("lm_head.weight", "output.weight"),
            (
                "model.layers.0.input_layernorm.weight",
                "blk.0.attn_norm.weight",
            ),
            (
                "model.layers.29.post_attention_layernorm.weight",
                "blk.29.ffn_norm.weight",
            ),
            (
                "model.layers.3.self_attn.q_proj.weight",
                "blk.3.attn_q.weight",
            ),
            ("model.layers.3.self_attn.k_proj.bias", "blk.3.attn_k.bias"),
            (
                "model.layers.3.self_attn.v_proj.weight",
                "blk.3.attn_v.weight",
            ),
            (
                "model.layers.3.self_attn.o_proj.weight",
                "blk.3.attn_output.weight",
            ),
            (
                "model.layers.12.mlp.gate_proj.weight",
                "blk.12.ffn_gate.weight",
            ),
            ("model.layers.12.mlp.up_proj.weight", "blk.12.ffn_up.weight"),
            (
                "model.layers.12.mlp.down_proj.weight",
                "blk.12.ffn_down.weight",
            ),
        ];
        for (hf, g) in cases {
            assert_eq!(gguf_name(hf).as_deref(), Some(g), "{hf}");
        }
        for bad in [
            "model.layers.x.mlp.up_proj.weight",
            "model.layers.1.mlp.experts.0.up_proj.weight",
            "model.eelayers.0.mlp.up_proj.weight",
            "model.layers.1.mlp.up_proj.scale",
        ] {
            assert_eq!(gguf_name(bad), None, "{bad}");
        }
    }
}

/// The HF name of the GGUF tensor `gguf` (inverse of [`gguf_name`]).
pub fn hf_name(gguf: &str) -> Option<String> {
    match gguf {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, suffix) = rest.rsplit_once('.')?;
    if !matches!(suffix, "weight" | "bias") {
        return None;
    }
    let m = match module {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{m}.{suffix}"))
}

#[cfg(test)]
mod inverse_tests {
    use super::{gguf_name, hf_name};

    #[test]
    fn hf_name_inverts_gguf_name() {
        for hf in [
            "model.embed_tokens.weight",
            "model.norm.weight",
            "lm_head.weight",
            "model.layers.7.self_attn.q_proj.bias",
            "model.layers.7.mlp.down_proj.weight",
            "model.layers.0.post_attention_layernorm.weight",
        ] {
            let g = gguf_name(hf).expect("mapped");
            assert_eq!(hf_name(&g).as_deref(), Some(hf));
        }
        assert_eq!(hf_name("blk.1.attn_q_norm.weight"), None);
        assert_eq!(hf_name("rope_freqs.weight"), None);
    }
}
