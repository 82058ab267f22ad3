//! MoE expert pruning in the cloud role, through real agents on loopback QUIC: an edge
//! hosting the dense layers sends hidden states to a cloud that serves `models/moe-small`
//! with `--moe-patterns` (signature at the first MoE layer it hosts, pattern retrieval,
//! top-`k` experts resident).
//! - k = all experts: every answer equals the unpruned single-node reference exactly, for
//!   clouds starting below the first MoE layer (3..7) and inside the MoE layers (5..7,
//!   signatures at layer 5 with the per-layer pattern keys);
//! - k = 2: only the kept experts are resident (memory reported in the engine stats that
//!   `/metrics` exports), and every request is served.

use std::path::{Path, PathBuf};

use flow_familial::tasks::{eval_set, Task};
use flow_familial::FamilialModel;
use flow_moe::profile::profile;
use flow_moe::store::save_pattern;
use flow_node::{Agent, AgentConfig, EngineConfig, GenEvent, GenerateRequest, MoePruning};
use flow_protocol::{ExitThreshold, InferMode, Policy, Role, Sampling};

fn family() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/moe-small")
}

/// A node hosting trunk layers `a..b` (+ the exit at `b`); the cloud listens on loopback.
fn node_config(dir: &Path, role: Role, name: &str, a: usize, b: usize) -> AgentConfig {
    let mut cfg = Agent::builder(dir)
        .role(role)
        .node_id(name)
        .layers(a..b)
        .config()
        .unwrap();
    cfg.listen = (role == Role::Cloud).then(|| "127.0.0.1:0".parse().unwrap());
    cfg
}

/// Patterns of every concrete task, profiled on the whole family.
fn patterns(dir: &Path) -> tempfile::TempDir {
    let model = FamilialModel::load(dir).unwrap();
    let store = tempfile::tempdir().unwrap();
    for t in Task::CONCRETE {
        let ex = eval_set(t, 8, 1);
        let seqs: Vec<Vec<u32>> = ex.iter().map(|e| e.tokens()).collect();
        let prompts: Vec<Vec<u32>> = ex.iter().map(|e| e.prompt.clone()).collect();
        let p = profile(&model, t.name(), &seqs, &prompts).unwrap();
        save_pattern(store.path(), &p).unwrap();
    }
    store
}

/// Held-out prompts, one of each task.
fn prompts() -> Vec<Vec<u32>> {
    Task::CONCRETE
        .into_iter()
        .map(|t| eval_set(t, 1, 7)[0].prompt.clone())
        .collect()
}

/// Every token answered by the cloud's deepest exit (no device exit is ever confident).
fn escalate(device_exit: usize) -> Policy {
    Policy {
        mode: InferMode::Escalate,
        thresholds: vec![ExitThreshold {
            exit: device_exit as u32,
            threshold: 2.0,
        }],
        default_threshold: 2.0,
        ..Policy::default()
    }
}

async fn tokens(agent: &Agent, prompt: &[u32], policy: Option<Policy>) -> Vec<u32> {
    let mut rx = agent
        .generate(GenerateRequest {
            prompt: prompt.to_vec(),
            max_new_tokens: 8,
            sampling: Sampling::default(),
            policy,
            stop_tokens: vec![],
        })
        .await
        .unwrap();
    let mut out = Vec::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            GenEvent::Token { token, degraded } => {
                assert!(!degraded, "a token was answered degraded");
                out.push(token.id);
            }
            GenEvent::Done(_) => {}
            GenEvent::Error(e) => panic!("the request failed: {e}"),
        }
    }
    assert!(!out.is_empty());
    out
}

/// A cloud hosting `a..7` (+ exit 7) with expert pruning and a device hosting `0..a`
/// (+ exit `a`) under it.
async fn pair(dir: &Path, store: &Path, a: usize, k: usize, budget: usize) -> (Agent, Agent) {
    let mut c = node_config(dir, Role::Cloud, "cloud", a, 7);
    c.moe = Some(MoePruning {
        patterns: store.to_path_buf(),
        experts: k,
        budget_bytes: budget,
    });
    let cloud = Agent::start(c).await.expect("cloud starts");
    let mut d = node_config(dir, Role::Edge, "edge", 0, a);
    d.parent = Some((cloud.local_addr().unwrap(), "cloud".into()));
    let device = Agent::start(d).await.expect("device starts");
    (cloud, device)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pruned_cloud_equals_unpruned_with_every_expert() {
    let dir = family();
    let store = patterns(&dir);
    // One node holding the whole family, answering from the deepest exit.
    let local = Policy {
        mode: InferMode::Local,
        ..Policy::default()
    };
    let single = flow_node::cluster::single_node(&dir, None, None, local, EngineConfig::default());
    let reference = single.await.unwrap();
    let prompts = prompts();
    let mut want = Vec::new();
    for p in &prompts {
        want.push(tokens(&reference, p, None).await);
    }
    for a in [3, 5] {
        let (cloud, device) = pair(&dir, store.path(), a, 8, usize::MAX).await;
        for (p, w) in prompts.iter().zip(&want) {
            let got = tokens(&device, p, Some(escalate(a))).await;
            assert_eq!(&got, w, "cloud {a}..7 with every expert resident");
        }
        let s = cloud.engine_stats().await.moe.expect("pruning stats");
        assert_eq!(s.retrievals, prompts.len() as u64, "{s:?}");
        assert_eq!(s.fallbacks, 0, "{s:?}");
        assert_eq!(s.experts.resident_bytes, s.all_expert_bytes, "{s:?}");
        drop(device);
        drop(cloud);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pruned_cloud_keeps_only_the_task_experts_resident() {
    let dir = family();
    let store = patterns(&dir);
    // Room for one pattern's 2 experts in each of the 4 MoE layers.
    let model = FamilialModel::load(&dir).unwrap();
    let one = model.moe(4).unwrap().expert_bytes();
    let (cloud, device) = pair(&dir, store.path(), 3, 2, 4 * 2 * one).await;
    for p in &prompts() {
        tokens(&device, p, Some(escalate(3))).await;
    }
    let s = cloud.engine_stats().await.moe.expect("pruning stats");
    assert_eq!(s.retrievals, 3, "{s:?}");
    assert_eq!(s.experts.resident, 8, "{s:?}");
    assert_eq!(s.experts.resident_bytes, 8 * one, "{s:?}");
    assert_eq!(s.all_expert_bytes, 4 * 8 * one, "{s:?}");
    assert!(s.experts.loads >= 8, "{s:?}");
}
