//! The real model across three agents (device → edge → cloud, QUIC + mutual TLS on
//! loopback): SmolLM2-135M-Instruct from its GGUF file, quantized weights mapped in place,
//! exits declared at layers 10 / 20 / 29. Invariants I2 (escalate-always) and I3 (route to
//! one exit) token for token against a single node, and I4 (speculation) against the same
//! reference; the tiers compute with two threads each, the single nodes with one. Chat prompts rendered with the model's own template.
//!
//! The model is looked up as `familial/tests/smollm2.rs` does; absent, the test is skipped
//! with a note — except under `CI=true`, where `.ci/run` pulls it first.

use std::path::PathBuf;

mod common;

use common::{ids, policy, request};
use flow_familial::chat::ChatMessage;
use flow_familial::ModelSource;
use flow_node::cluster::{single_node, ClusterSpec, LocalCluster};
use flow_node::EngineConfig;
use flow_protocol::{Encoding, InferMode, Policy, Role};

const EXITS: [usize; 3] = [10, 20, 29];
const NEW: usize = 16;

fn model_path() -> Option<PathBuf> {
    let root = match std::env::var("AIFLOW_HOME") {
        Ok(h) => PathBuf::from(h),
        Err(_) => {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/aiflow/models")
        }
    };
    let p = std::env::var("AIFLOW_SMOLLM2_GGUF")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root.join("smollm2-135m-instruct/model.gguf"));
    if p.exists() {
        return Some(p);
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{} is missing: CI pulls it with `flow-node model pull smollm2-135m-instruct`",
        p.display()
    );
    eprintln!("skipped: {} is absent", p.display());
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smollm2_three_tiers_equal_single_node() {
    let Some(path) = model_path() else { return };
    three_tiers_equal_single_node(path, Some(EXITS.to_vec())).await;
}

/// The same invariants on the committed family (`models/smollm2-family`: trained exits at
/// 10 and 20 over the pulled base), whose exits are its own (nothing declared).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smollm2_family_three_tiers_equal_single_node() {
    if model_path().is_none() {
        return;
    }
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/smollm2-family");
    let cfg = ModelSource::open(&dir).unwrap().config().unwrap();
    assert_eq!(cfg.exit_points(), EXITS.to_vec());
    three_tiers_equal_single_node(dir, None).await;
}

async fn three_tiers_equal_single_node(path: PathBuf, declare: Option<Vec<usize>>) {
    let src = ModelSource::open(&path).unwrap();
    let tok = src.tokenizer().unwrap();
    let chat = src.chat().unwrap().expect("SmolLM2 has a chat template");
    let prompts: Vec<Vec<u32>> = [
        "Name three primary colors.",
        "Write a haiku about the sea.",
        "What is the capital of France?",
    ]
    .iter()
    .map(|q| {
        let text = chat.render(&[ChatMessage::new("user", *q)], true).unwrap();
        tok.encode(&text).unwrap()
    })
    .collect();
    let certs = tempfile::tempdir().unwrap();
    let c = LocalCluster::start(ClusterSpec {
        model_dir: path.clone(),
        declare_exits: declare.clone(),
        device_exit: EXITS[0],
        edge_exit: EXITS[1],
        certs_dir: certs.path().to_path_buf(),
        policy: Policy::default(),
        encoding: Encoding::F32,
        // Two compute threads per tier (the quantized matmuls and attention split over a
        // spinning team) against one-thread single nodes: the split is exact either way.
        engine: EngineConfig {
            threads: 2,
            ..EngineConfig::default()
        },
    })
    .await
    .expect("cluster starts");
    for (i, &exit) in EXITS.iter().enumerate() {
        let single = single_node(
            &path,
            declare.clone(),
            Some(exit),
            policy(InferMode::Local),
            EngineConfig::default(),
        )
        .await
        .unwrap();
        for prompt in &prompts {
            let (want, _) = single
                .generate_collect(request(prompt, policy(InferMode::Local), NEW))
                .await
                .unwrap();
            // I3 (and I2 at the deepest exit): every token answered by one exit.
            let p = Policy {
                answer_exit: Some(exit as u32),
                ..policy(InferMode::Route)
            };
            let (got, stats) = c
                .device
                .generate_collect(request(prompt, p, NEW))
                .await
                .unwrap();
            assert_eq!(ids(&got), ids(&want), "route to exit {exit}");
            let tier = [Role::Device, Role::Edge, Role::Cloud][i];
            assert!(got.iter().all(|t| t.tier == tier && t.exit == exit as u32));
            assert_eq!(stats.bytes_up > 0, exit > EXITS[0]);
            if exit == EXITS[2] {
                // I2: escalate-always (a threshold no confidence reaches).
                let p = Policy {
                    default_threshold: 2.0,
                    ..policy(InferMode::Escalate)
                };
                let (got, _) = c
                    .device
                    .generate_collect(request(prompt, p, NEW))
                    .await
                    .unwrap();
                assert_eq!(ids(&got), ids(&want), "escalate-always");
                // I4: speculation keeps the full model's tokens.
                let p = Policy {
                    draft_len: 4,
                    ..policy(InferMode::Speculate)
                };
                let (got, stats) = c
                    .device
                    .generate_collect(request(prompt, p, NEW))
                    .await
                    .unwrap();
                assert_eq!(ids(&got), ids(&want), "speculate n=4");
                assert!(stats.drafts_proposed > 0);
            }
        }
        single.shutdown().await;
    }
    c.shutdown().await;
}
