//! Loading this node's part of the family: which layers and exits it hosts, the
//! fingerprints it announces in its [`Hello`], and the weights (on a blocking thread).

use flow_familial::{FamilialModel, ModelConfig, ModelSource, Part};
use flow_protocol::{
    Capacity, Hello, HostedLayers, ModelFingerprint, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
};

use super::AgentConfig;
use crate::delta::WeightStore;
use crate::engine::Stage;
use crate::error::{NodeError, Result};

/// What loading produced: the hosted part, our `Hello`, and the versioned weights.
pub(super) struct Loaded {
    pub model: FamilialModel,
    pub hello: Hello,
    pub store: WeightStore,
}

/// The part of the family this node hosts: trunk layers `a..b`, the exit at `b` when
/// hosted, and the exit at each split point. Refuses a configuration that cannot serve.
pub(super) fn part_of(cfg: &AgentConfig, model_cfg: &ModelConfig) -> Result<Part> {
    let Stage { a, b, exit } = cfg.stage;
    if exit && model_cfg.exit_index(b).is_err() {
        return Err(NodeError::Config(format!(
            "this node hosts layers {a}..{b} with an exit at {b}, but {b} is not an exit of the family (exits: {:?})",
            model_cfg.exit_points()
        )));
    }
    if cfg.parent.is_none() && !exit {
        return Err(NodeError::Config(
            "a node without a parent must host an exit (it answers every request)".into(),
        ));
    }
    let mut exits: Vec<usize> = if exit { vec![b] } else { vec![] };
    for &p in &cfg.split_points {
        if a != 0 || p <= a || p >= b {
            return Err(NodeError::Config(format!(
                "split point {p}: split points are for the entry node and must lie strictly inside its layers {a}..{b}"
            )));
        }
        if model_cfg.exit_index(p).is_err() {
            return Err(NodeError::Config(format!(
                "split point {p} is not an exit of the family (exits: {:?})",
                model_cfg.exit_points()
            )));
        }
        if !exits.contains(&p) {
            exits.push(p);
        }
    }
    exits.sort_unstable();
    Ok(Part {
        embed: a == 0,
        trunk: a..b,
        exits,
    })
}

fn digest_hex(d: &[u8; 32]) -> String {
    hex::encode(&d[..8])
}

/// Our `Hello`: the family's fingerprint `family`, the hosted layers' fingerprint
/// `hosted`, and the engine's capacity.
pub(super) fn hello(
    cfg: &AgentConfig,
    mc: &ModelConfig,
    part: &Part,
    family: [u8; 32],
    hosted: [u8; 32],
) -> Hello {
    Hello {
        node_id: cfg.node_id.clone(),
        role: cfg.role,
        protocol_version: PROTOCOL_VERSION,
        min_protocol_version: MIN_PROTOCOL_VERSION,
        model: ModelFingerprint {
            family: format!("{}:{}", mc.layout.model_type(), digest_hex(&family)),
            digest: family,
        },
        hosted: vec![HostedLayers {
            start: part.trunk.start as u32,
            end: part.trunk.end as u32,
            digest: hosted,
        }],
        capacity: Capacity {
            max_sessions: 1024,
            max_batch_tokens: cfg.engine.max_batch_tokens as u32,
            layer_tokens_per_s: 0.0,
            free_memory_bytes: cfg.engine.kv_budget_bytes as u64,
        },
    }
}

/// Fingerprint the family and the hosted tensors and load `part` (on a blocking thread).
pub(super) async fn load(
    cfg: &AgentConfig,
    source: &ModelSource,
    model_cfg: &ModelConfig,
    part: &Part,
) -> Result<Loaded> {
    let cfg = cfg.clone();
    let mc = model_cfg.clone();
    let part = part.clone();
    let src = source.clone();
    tokio::task::spawn_blocking(move || -> Result<Loaded> {
        let all = FamilialModel::tensor_names(&mc, &Part::full(&mc))?;
        let family = src.fingerprint(all.iter().map(String::as_str))?;
        let hosted_names = FamilialModel::tensor_names(&mc, &part)?;
        let hosted = src.fingerprint(hosted_names.iter().map(String::as_str))?;
        let (store, model) = match &src {
            ModelSource::Gguf(_) | ModelSource::Family(_) => {
                // GGUF weights stay quantized in the mapping; deltas (which need
                // f32 copies of the hosted tensors) are refused on such nodes
                // (and on family overlays, whose trunk is such a base).
                let empty = std::collections::HashMap::new();
                (
                    WeightStore::new(empty, family),
                    src.load_part(mc.clone(), part.clone())?,
                )
            }
            ModelSource::Hf(_) if cfg.moe.is_some() => {
                // Experts are paged in per task pattern (flow_moe::cloud); this node
                // refuses deltas (see `Agent::apply_delta`), so its store is empty.
                let model = FamilialModel::load_part_without_experts(
                    &cfg.model_dir,
                    mc.clone(),
                    part.clone(),
                )?;
                (
                    WeightStore::new(std::collections::HashMap::new(), family),
                    model,
                )
            }
            ModelSource::Hf(ck) => crate::fleet::load_store(ck, &mc, &part, &all, family)?,
        };
        let hello = hello(&cfg, &mc, &part, family, hosted);
        Ok(Loaded {
            model,
            hello,
            store,
        })
    })
    .await
    .map_err(|e| NodeError::Internal(format!("model loading task: {e}")))?
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::Agent;

    /// A 4-layer llama family with exits after layers 1 and 3.
    pub(crate) fn family() -> ModelConfig {
        let mut mc = ModelConfig::from_json(&serde_json::json!({
            "model_type": "llama", "vocab_size": 64, "hidden_size": 16,
            "intermediate_size": 32, "num_hidden_layers": 4, "num_attention_heads": 2,
            "num_key_value_heads": 1, "rms_norm_eps": 1e-6, "tie_word_embeddings": true
        }))
        .unwrap();
        mc.declare_exits(&[1, 3]).unwrap();
        mc
    }

    fn exits(mc: &ModelConfig) -> (usize, usize) {
        let p = mc.exit_points();
        (p[0], p[1])
    }

    #[test]
    fn an_entry_node_loads_its_exit_and_its_split_points() {
        let mc = family();
        let (first, last) = exits(&mc);
        let cfg = Agent::builder("unused")
            .layers(0..last)
            .split_points(vec![first])
            .config()
            .unwrap();
        let part = part_of(&cfg, &mc).unwrap();
        assert!(part.embed);
        assert_eq!(part.trunk, 0..last);
        assert_eq!(part.exits, vec![first, last]);
    }

    #[test]
    fn a_node_further_up_without_an_exit_needs_a_parent() {
        let mc = family();
        let (first, last) = exits(&mc);
        let builder = Agent::builder("unused").layers(first..last).exit(false);
        let e = part_of(&builder.clone().config().unwrap(), &mc).unwrap_err();
        assert!(e.to_string().contains("must host an exit"), "{e}");
        let cfg = builder
            .parent("127.0.0.1:7000".parse().unwrap(), "cloud")
            .config()
            .unwrap();
        let part = part_of(&cfg, &mc).unwrap();
        assert!(!part.embed);
        assert_eq!(part.trunk, first..last);
        assert!(part.exits.is_empty());
    }

    /// Why `part_of` refuses a node hosting `layers` with `split_points`.
    fn refusal(
        mc: &ModelConfig,
        layers: std::ops::Range<usize>,
        split_points: Vec<usize>,
    ) -> String {
        let cfg = Agent::builder("unused")
            .layers(layers)
            .split_points(split_points)
            .config()
            .unwrap();
        part_of(&cfg, mc).unwrap_err().to_string()
    }

    #[test]
    fn exits_and_split_points_must_be_exits_of_the_family() {
        let mc = family();
        let (first, last) = exits(&mc);
        let not_exit = (0..last).find(|p| *p != first && *p > 0).unwrap();
        let e = refusal(&mc, 0..not_exit, vec![]);
        assert!(e.contains("is not an exit of the family"), "{e}");
        let e = refusal(&mc, 0..last, vec![not_exit]);
        assert!(
            e.contains(&format!("split point {not_exit} is not an exit")),
            "{e}"
        );
        // Outside the hosted layers, or on a node that is not the entry.
        for (layers, split) in [(0..last, last), (1..last, first)] {
            let e = refusal(&mc, layers, vec![split]);
            assert!(e.contains("strictly inside its layers"), "{e}");
        }
    }

    #[test]
    fn hello_announces_fingerprints_layers_and_capacity() {
        let mc = family();
        let (_, last) = exits(&mc);
        let cfg = Agent::builder("unused")
            .node_id("edge-1")
            .role(flow_protocol::Role::Edge)
            .layers(0..last)
            .kv_budget_bytes(1 << 20)
            .config()
            .unwrap();
        let part = part_of(&cfg, &mc).unwrap();
        let h = hello(&cfg, &mc, &part, [0xab; 32], [7; 32]);
        assert_eq!(h.node_id, "edge-1");
        assert_eq!(h.role, flow_protocol::Role::Edge);
        assert_eq!(h.protocol_version, PROTOCOL_VERSION);
        assert_eq!(h.model.family, "llama:abababababababab");
        assert_eq!(h.model.digest, [0xab; 32]);
        assert_eq!(h.hosted.len(), 1);
        assert_eq!((h.hosted[0].start, h.hosted[0].end), (0, last as u32));
        assert_eq!(h.hosted[0].digest, [7; 32]);
        assert_eq!(h.capacity.free_memory_bytes, 1 << 20);
        assert_eq!(
            h.capacity.max_batch_tokens as usize,
            cfg.engine.max_batch_tokens
        );
    }
}
