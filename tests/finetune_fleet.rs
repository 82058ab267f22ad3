//! Fine-tuned deltas and federated rounds across real agents on loopback (QUIC).
//!
//! Distribution: an edge pushes a delta to its device over the device's own connection
//! while a request is in flight there; that request finishes on the old weights (equal to
//! a single node on the base), a request after the push runs on the new ones (equal to a
//! single node loaded with base + delta), a delta for another base is refused with a
//! clear error, and a rollback restores the old outputs.
//!
//! Aggregation: devices offer updates with sample counts; an edge averages them (FedAvg,
//! exact on known inputs) and drops a device that never answers at the deadline; a cloud
//! averages its edges the same way and distributes the result down the tree.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use flow_familial::weights::{save_safetensors, Checkpoint, TensorSource};
use flow_finetune::aggregate::RoundConfig;
use flow_finetune::Delta;
use flow_node::fleet::FederationPlan;
use flow_node::{Agent, GenEvent, GenerateRequest};
use flow_protocol::{DeltaStatus, InferMode, Policy, Role};

mod common;

const PROMPT: &[u32] = &[256, 49, 50, 43, 51, 52, 61];
const EMBED: &str = "model.embed_tokens.weight";

fn local() -> Policy {
    Policy {
        mode: InferMode::Local,
        ..Policy::default()
    }
}

/// A device hosting layer 0 and exit 1, answering locally, child of `parent` (or alone).
async fn device(dir: &Path, name: &str, parent: Option<SocketAddr>) -> Agent {
    let mut b = Agent::builder(dir)
        .role(Role::Device)
        .node_id(name)
        .layers(0..1)
        .policy(local());
    if let Some(p) = parent {
        b = b.parent(p, "edge");
    }
    b.start().await.unwrap()
}

async fn upper(
    dir: &Path,
    role: Role,
    name: &str,
    layers: std::ops::Range<usize>,
    parent: Option<SocketAddr>,
) -> Agent {
    let mut b = Agent::builder(dir)
        .role(role)
        .node_id(name)
        .layers(layers)
        .listen("127.0.0.1:0".parse().unwrap());
    if let Some(p) = parent {
        b = b.parent(p, "cloud");
    }
    b.start().await.unwrap()
}

async fn tokens(agent: &Agent, n: usize) -> Vec<u32> {
    let (t, _) = agent
        .generate_collect(GenerateRequest::greedy(PROMPT.to_vec(), n))
        .await
        .unwrap();
    t.iter().map(|t| t.id).collect()
}

fn load(dir: &Path, name: &str) -> Tensor {
    let ck = Checkpoint::open(dir).unwrap();
    let shape = ck.tensor_infos()[name].1.clone();
    ck.get(name, &shape).unwrap()
}

/// The family in `dir` with `name` replaced by `t`, written to a new directory.
fn patched_copy(dir: &Path, name: &str, t: &Tensor) -> tempfile::TempDir {
    let out = tempfile::tempdir().unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(dir.join(f), out.path().join(f)).unwrap();
    }
    let ck = Checkpoint::open(dir).unwrap();
    let mut all: HashMap<String, Tensor> = ck
        .tensor_infos()
        .iter()
        .map(|(n, (_, shape))| (n.clone(), ck.get(n, shape).unwrap()))
        .collect();
    all.insert(name.into(), t.clone());
    save_safetensors(&all, DType::F32, &out.path().join("model.safetensors")).unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_mid_request_keeps_it_on_the_old_weights_and_rolls_back() {
    let dir = common::tiny_family_without_eos();
    let base = load(dir.path(), EMBED);
    let tuned = (&base + Tensor::randn(0f32, 0.5, base.dims(), &Device::Cpu).unwrap()).unwrap();
    let new_dir = patched_copy(dir.path(), EMBED, &tuned);

    // References: single nodes on the base and on base + delta.
    let n = 100; // > the 64-event channel: the request cannot finish before we read
    let old_ref = tokens(&device(dir.path(), "ref-old", None).await, n).await;
    let new_ref = tokens(&device(new_dir.path(), "ref-new", None).await, n).await;
    assert_ne!(old_ref, new_ref, "the delta must change the outputs");

    let edge = upper(dir.path(), Role::Edge, "edge", 1..3, None).await;
    let dev = device(dir.path(), "dev", edge.local_addr()).await;
    let fp = dev.base_fingerprint();
    assert_eq!(
        fp,
        flow_finetune::delta::base_fingerprint(&Checkpoint::open(dir.path()).unwrap()).unwrap(),
        "agents name the base the way `flow-node finetune` does"
    );
    assert!(
        flow_node::agent::wait_until(Duration::from_secs(30), || edge.children().len() == 1).await,
        "the device connects"
    );
    let run = async {
        // A request in flight: one token read, the rest waits on the bounded channel.
        let mut rx = dev
            .generate(GenerateRequest::greedy(PROMPT.to_vec(), n))
            .await
            .unwrap();
        let mut in_flight = Vec::new();
        match rx.recv().await {
            Some(GenEvent::Token { token, .. }) => in_flight.push(token.id),
            other => panic!("first event: {other:?}"),
        }

        let base_map = HashMap::from([(EMBED.to_string(), base.clone())]);
        let up = HashMap::from([(EMBED.to_string(), tuned.clone())]);
        let delta = Delta::diff(&base_map, &up, DType::F32, fp, 1, "embed").unwrap();
        let dist = edge.distribute(&delta, Duration::from_secs(30)).await;
        assert!(dist.all_ok(), "{}", dist.summary());
        assert_eq!(dev.weights_version(), 1);

        while let Some(ev) = rx.recv().await {
            match ev {
                GenEvent::Token { token, .. } => in_flight.push(token.id),
                GenEvent::Done(_) => break,
                GenEvent::Error(e) => panic!("in-flight request failed: {e}"),
            }
        }
        assert_eq!(
            in_flight, old_ref,
            "the request in flight finished on the old weights"
        );
        assert_eq!(
            tokens(&dev, n).await,
            new_ref,
            "a new request runs on base + delta"
        );

        // Another base: refused at the device with a clear error; nothing changes.
        let other = Delta {
            base_fingerprint: [9; 32],
            version: 2,
            ..delta.clone()
        };
        let child = edge.children().pop().unwrap();
        let ack = flow_node::delta::push_delta(&child, 77, &other)
            .await
            .unwrap();
        assert_eq!(ack.status, DeltaStatus::Refused);
        assert!(ack.message.contains("base"), "{}", ack.message);
        assert_eq!(dev.weights_version(), 1);

        // Rollback restores the old outputs.
        let dist = edge.rollback_everywhere(1, Duration::from_secs(30)).await;
        assert!(dist.all_ok(), "{}", dist.summary());
        assert_eq!(dev.weights_version(), 0);
        assert_eq!(tokens(&dev, n).await, old_ref, "rolled back to the base");
    };
    tokio::time::timeout(Duration::from_secs(180), run)
        .await
        .expect("distribution test hung");
}

/// A 1-D tensor the device hosts (an exit-1 norm), to carry made-up updates.
fn device_vector(dir: &Path) -> (String, Vec<usize>) {
    let ck = Checkpoint::open(dir).unwrap();
    let cfg = flow_familial::ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let part = flow_familial::Part {
        embed: true,
        trunk: 0..1,
        exits: vec![1],
    };
    let infos = ck.tensor_infos();
    flow_familial::FamilialModel::tensor_names(&cfg, &part)
        .unwrap()
        .into_iter()
        .find_map(|n| {
            let shape = infos.get(&n)?.1.clone();
            (shape.len() == 1).then_some((n, shape))
        })
        .expect("a 1-D tensor on the device")
}

fn update(fp: [u8; 32], name: &str, shape: &[usize], v: f32) -> Delta {
    Delta {
        base_fingerprint: fp,
        version: 1,
        scheme: "bias-norm:1".into(),
        tensors: BTreeMap::from([(
            name.to_string(),
            Tensor::full(v, shape, &Device::Cpu).unwrap(),
        )]),
    }
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rounds_average_by_samples_and_drop_the_silent_at_the_deadline() {
    let dir = common::tiny_family_without_eos();
    let (name, shape) = device_vector(dir.path());
    let cloud = upper(dir.path(), Role::Cloud, "cloud", 3..5, None).await;
    let edge_a = upper(dir.path(), Role::Edge, "edge-a", 1..3, cloud.local_addr()).await;
    let edge_b = upper(dir.path(), Role::Edge, "edge-b", 1..3, cloud.local_addr()).await;
    let d1 = device(dir.path(), "d1", edge_a.local_addr()).await;
    let d2 = device(dir.path(), "d2", edge_a.local_addr()).await;
    let silent = device(dir.path(), "silent", edge_a.local_addr()).await;
    let fp = d1.base_fingerprint();
    assert!(
        flow_node::agent::wait_until(Duration::from_secs(30), || {
            edge_a.children().len() == 3 && cloud.children().len() == 2
        })
        .await,
        "everyone connects"
    );
    let run = async {
        // Edge level: 1 sample of 1.0 and 3 samples of 5.0 → exactly 4.0; `silent` never
        // answers and is dropped at the deadline.
        d1.offer_update(1, update(fp, &name, &shape, 1.0));
        d2.offer_update(3, update(fp, &name, &shape, 5.0));
        let cfg = RoundConfig {
            deadline: Duration::from_millis(1500),
            min_participants: 1,
        };
        let out = edge_a.aggregate_round(1, cfg).await;
        let mut joined = out.joined.clone();
        joined.sort();
        assert_eq!(joined, vec!["d1", "d2"], "{out:?}");
        assert_eq!(out.dropped, vec!["silent"], "{out:?}");
        assert_eq!(out.samples, 4);
        let agg = out.aggregate.expect("an aggregate");
        assert!(values(&agg.tensors[&name]).iter().all(|&x| x == 4.0));

        // Cloud level: edge-a answers with its devices' average (4 samples), edge-b has
        // nothing and is dropped; the result reaches every device as version 1.
        d1.offer_update(1, update(fp, &name, &shape, 1.0));
        d2.offer_update(3, update(fp, &name, &shape, 5.0));
        let plan = FederationPlan {
            rounds: 1,
            round: RoundConfig {
                deadline: Duration::from_secs(4),
                min_participants: 1,
            },
            min_change: 0.0,
        };
        let reports = cloud.federate(plan).await.unwrap();
        let r = &reports[0];
        assert_eq!(r.outcome.joined, vec!["edge-a"], "{:?}", r.outcome);
        assert_eq!(r.outcome.samples, 4);
        assert!(!r.outcome.joined.contains(&"edge-b".to_string()));
        assert_eq!(r.version, Some(1));
        let dist = r.distribution.as_ref().unwrap();
        assert!(dist.all_ok(), "{}", dist.summary());
        for d in [&d1, &d2, &silent] {
            assert_eq!(d.weights_version(), 1);
            let w = d.weights().unwrap();
            assert!(values(&w.tensors[&name]).iter().all(|&x| x == 4.0));
        }
        assert_eq!(edge_b.weights_version(), 1);

        // Stop condition: devices keep offering the same updates; round 2's average equals
        // round 1's, so the federation stops there although 5 rounds were allowed.
        let (a1, a2) = (d1.clone(), d2.clone());
        let (n2, s2) = (name.clone(), shape.clone());
        let feeder = tokio::spawn(async move {
            loop {
                a1.offer_update(1, update(fp, &n2, &s2, 1.0));
                a2.offer_update(3, update(fp, &n2, &s2, 5.0));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        let plan = FederationPlan {
            rounds: 5,
            round: RoundConfig {
                deadline: Duration::from_secs(3),
                min_participants: 1,
            },
            min_change: 1e-9,
        };
        let reports = cloud.federate(plan).await.unwrap();
        feeder.abort();
        assert_eq!(reports.len(), 2, "{reports:?}");
        assert_eq!(reports[0].version, Some(2));
        assert_eq!(reports[1].version, Some(3));
        assert_eq!(reports[1].max_change, Some(0.0));
        assert_eq!(d1.weights_version(), 3);
    };
    tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .expect("a round hung");
}
