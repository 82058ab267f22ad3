//! Collaborative inference across three real agents (device → edge → cloud) on loopback,
//! over QUIC with mutual TLS: invariants I2, I3, I4 and confidence escalation with exact
//! backfill, against single-node references computed independently.

use std::path::Path;

mod common;

use common::{ids, policy, request};
use flow_familial::confidence::Confidence;
use flow_familial::init::{init_checkpoint, Preset};
use flow_familial::{FamilialModel, Layout};
use flow_node::cluster::{single_node, LocalCluster};
use flow_node::EngineConfig;
use flow_protocol::{InferMode, Policy, Role};

const PROMPTS: [&[u32]; 3] = [
    &[256, 49, 50, 43, 51, 52, 61],
    &[256, 104, 101, 108, 108, 111],
    &[256, 7, 200, 31, 99, 150, 2, 64, 64],
];
const NEW: usize = 12;

async fn cluster(dir: &Path, certs: &Path) -> LocalCluster {
    common::tiny_cluster(dir, certs).await
}

/// The tiny model emits eos sometimes; the family has no eos stop here because stop tokens
/// include the model's eos. Strip generation at eos on both sides the same way.
fn fixture() -> (tempfile::TempDir, tempfile::TempDir) {
    // No eos in the config: generation always runs NEW tokens, so every position counts.
    (
        common::tiny_family_without_eos(),
        tempfile::tempdir().unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn i2_i3_i4_three_tiers_equal_single_node() {
    let (dir, certs) = fixture();
    let c = cluster(dir.path(), certs.path()).await;
    for exit in [1usize, 3, 5] {
        let single = single_node(
            dir.path(),
            None,
            Some(exit),
            policy(InferMode::Local),
            EngineConfig::default(),
        )
        .await
        .unwrap();
        for prompt in PROMPTS {
            let (want, _) = single
                .generate_collect(request(prompt, policy(InferMode::Local), NEW))
                .await
                .unwrap();
            assert_eq!(want.len(), NEW);
            // I3 (and I2 at exit 5): route every token to one exit.
            let p = Policy {
                answer_exit: Some(exit as u32),
                ..policy(InferMode::Route)
            };
            let (got, stats) = c
                .device
                .generate_collect(request(prompt, p, NEW))
                .await
                .unwrap();
            assert_eq!(
                ids(&got),
                ids(&want),
                "route to exit {exit}, prompt {prompt:?}"
            );
            let tier = match exit {
                1 => Role::Device,
                3 => Role::Edge,
                _ => Role::Cloud,
            };
            assert!(
                got.iter().all(|t| t.tier == tier && t.exit == exit as u32),
                "{got:?}"
            );
            if exit > 1 {
                assert!(stats.bytes_up > 0 && stats.hops >= NEW as u32);
            } else {
                assert_eq!(stats.bytes_up, 0);
            }
            if exit == 5 {
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
                assert_eq!(ids(&got), ids(&want), "escalate-always, prompt {prompt:?}");
                // I4: speculative decoding gives the full model's tokens.
                for draft_len in [1u32, 3, 5] {
                    let p = Policy {
                        draft_len,
                        ..policy(InferMode::Speculate)
                    };
                    let (got, stats) = c
                        .device
                        .generate_collect(request(prompt, p, NEW))
                        .await
                        .unwrap();
                    assert_eq!(
                        ids(&got),
                        ids(&want),
                        "speculate n={draft_len}, prompt {prompt:?}"
                    );
                    assert_eq!(got.len(), NEW);
                    assert!(stats.drafts_proposed > 0);
                }
            }
        }
        single.shutdown().await;
    }
    c.shutdown().await;
}

/// CALM with exact backfill, computed locally: at every position the exit logits equal a
/// full forward of the whole sequence at that exit (exact backfill makes every KV equal to
/// the full forward's), so the reference needs no KV bookkeeping at all.
fn calm_reference(model: &FamilialModel, prompt: &[u32], th: f32) -> Vec<(u32, u32)> {
    let mut seq = prompt.to_vec();
    let mut out = Vec::new();
    for _ in 0..NEW {
        let mut chosen = None;
        for exit in [1usize, 3, 5] {
            let logits = model
                .forward_exit(&seq, exit, &mut model.new_cache())
                .unwrap();
            let last: Vec<f32> = logits.get(seq.len() - 1).unwrap().to_vec1().unwrap();
            let c = Confidence::of_row(&last);
            if exit == 5 || c.max_prob >= th {
                chosen = Some((c.token, exit as u32));
                break;
            }
        }
        let (tok, exit) = chosen.unwrap();
        out.push((tok, exit));
        seq.push(tok);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn escalate_matches_calm_with_exact_backfill() {
    let (dir, certs) = fixture();
    let model = FamilialModel::load(dir.path()).unwrap();
    // Pick the threshold that mixes tiers the most on these prompts.
    let mut best = (0usize, 0.0f32);
    for th in [0.02f32, 0.03, 0.04, 0.05, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3] {
        let mut exits = std::collections::BTreeMap::new();
        for p in PROMPTS {
            for (_, e) in calm_reference(&model, p, th) {
                *exits.entry(e).or_insert(0usize) += 1;
            }
        }
        let mix = exits.values().copied().min().unwrap_or(0) * usize::from(exits.len() == 3);
        if mix > best.0 {
            best = (mix, th);
        }
    }
    assert!(best.0 > 0, "no threshold sends tokens to all three tiers");
    let th = best.1;
    let c = cluster(dir.path(), certs.path()).await;
    let mut tiers = std::collections::BTreeSet::new();
    for prompt in PROMPTS {
        let want = calm_reference(&model, prompt, th);
        let p = Policy {
            default_threshold: th,
            ..policy(InferMode::Escalate)
        };
        let (got, stats) = c
            .device
            .generate_collect(request(prompt, p, NEW))
            .await
            .unwrap();
        let got: Vec<(u32, u32)> = got.iter().map(|t| (t.id, t.exit)).collect();
        assert_eq!(got, want, "threshold {th}, prompt {prompt:?}");
        for (_, e) in &got {
            tiers.insert(*e);
        }
        assert_eq!(stats.degraded_tokens, 0);
    }
    assert_eq!(tiers.len(), 3, "tokens came from every tier");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_parent_degrades_clearly_and_the_node_keeps_serving() {
    let (dir, certs) = fixture();
    let c = cluster(dir.path(), certs.path()).await;
    // Warm path works.
    let p = Policy {
        answer_exit: Some(5),
        ..policy(InferMode::Route)
    };
    c.device
        .generate_collect(request(PROMPTS[0], p.clone(), NEW))
        .await
        .unwrap();
    // The cloud goes away.
    c.cloud.shutdown().await;
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    // Route to the cloud's exit: the deepest exit still reachable (the edge's) answers,
    // every token marked degraded (issue 22; before, the request failed).
    let (toks, stats) = c
        .device
        .generate_collect(request(PROMPTS[1], p, NEW))
        .await
        .unwrap();
    assert_eq!(toks.len(), NEW);
    assert_eq!(stats.degraded_tokens, NEW, "{stats:?}");
    assert!(toks.iter().all(|t| t.tier == Role::Edge), "{toks:?}");
    // Escalation with a threshold no exit reaches (but below 1, so exits are computed):
    // the edge answers from its own exit, marked degraded.
    let p = Policy {
        default_threshold: 0.999,
        ..policy(InferMode::Escalate)
    };
    let (toks, stats) = c
        .device
        .generate_collect(request(PROMPTS[2], p, NEW))
        .await
        .unwrap();
    assert_eq!(toks.len(), NEW);
    assert!(stats.degraded_tokens > 0, "{stats:?}");
    assert!(toks.iter().all(|t| t.tier != Role::Cloud));
    // Local requests are unaffected.
    let (toks, _) = c
        .device
        .generate_collect(request(PROMPTS[0], policy(InferMode::Local), NEW))
        .await
        .unwrap();
    assert_eq!(toks.len(), NEW);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_sessions_are_batched_and_stay_exact() {
    let (dir, certs) = fixture();
    let single = single_node(
        dir.path(),
        None,
        None,
        policy(InferMode::Local),
        EngineConfig::default(),
    )
    .await
    .unwrap();
    let mut want = Vec::new();
    for p in PROMPTS {
        want.push(ids(&single
            .generate_collect(request(p, policy(InferMode::Local), NEW))
            .await
            .unwrap()
            .0));
    }
    let c = cluster(dir.path(), certs.path()).await;
    let route = Policy {
        answer_exit: Some(5),
        ..policy(InferMode::Route)
    };
    let mut tasks = Vec::new();
    for i in 0..9 {
        let dev = c.device.clone();
        let p = route.clone();
        tasks.push(tokio::spawn(async move {
            (
                i % 3,
                dev.generate_collect(request(PROMPTS[i % 3], p, NEW)).await,
            )
        }));
    }
    for t in tasks {
        let (k, r) = t.await.unwrap();
        assert_eq!(
            ids(&r.unwrap().0),
            want[k],
            "concurrent request for prompt {k}"
        );
    }
    // The cloud ran steps of several sessions in one batch at least once.
    let s = c.cloud.engine_stats().await;
    assert!(s.batched_steps > s.batches, "no cross-session batch: {s:?}");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_finishes_in_flight_and_refuses_new_requests() {
    let (dir, certs) = fixture();
    let c = cluster(dir.path(), certs.path()).await;
    let route = Policy {
        answer_exit: Some(5),
        ..policy(InferMode::Route)
    };
    let mut rx = c
        .device
        .generate(request(PROMPTS[0], route.clone(), NEW))
        .await
        .unwrap();
    let dev = c.device.clone();
    let drain = tokio::spawn(async move { dev.drain(std::time::Duration::from_secs(30)).await });
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let err = c
        .device
        .generate(request(PROMPTS[1], route, NEW))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("shutting down"), "{err}");
    let mut n = 0;
    while let Some(ev) = rx.recv().await {
        match ev {
            flow_node::GenEvent::Token { .. } => n += 1,
            flow_node::GenEvent::Done(_) => break,
            flow_node::GenEvent::Error(e) => panic!("in-flight request failed: {e}"),
        }
    }
    assert_eq!(n, NEW);
    assert_eq!(
        drain.await.unwrap(),
        0,
        "nothing left running after the drain"
    );
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parent_with_other_weights_is_refused() {
    let (dir, certs) = fixture();
    let other = tempfile::tempdir().unwrap();
    init_checkpoint(Preset::Tiny, Layout::RuyiQwen2, 22, other.path()).unwrap();
    let ca = certs.path().join("ca");
    flow_protocol::transport::certs::init_ca(&ca).unwrap();
    let sec = |name: &str, role: Role| {
        let f = flow_protocol::transport::certs::issue(&ca, name, role, &certs.path().join(name))
            .unwrap();
        flow_protocol::transport::Security::Mtls {
            ca: ca.join(flow_protocol::transport::certs::CA_CERT),
            cert: f.cert,
            key: f.key,
        }
    };
    // The cloud serves a different checkpoint (another seed) of the same layout.
    let cloud = flow_node::Agent::builder(other.path())
        .role(Role::Cloud)
        .node_id("cloud")
        .layers(3..5)
        .listen("127.0.0.1:0".parse().unwrap())
        .security(sec("cloud", Role::Cloud))
        .start()
        .await
        .unwrap();
    let err = flow_node::Agent::builder(dir.path())
        .role(Role::Edge)
        .node_id("edge")
        .layers(1..3)
        .parent(cloud.local_addr().unwrap(), "cloud")
        .security(sec("edge", Role::Edge))
        .start()
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("fingerprint"), "{err}");
    cloud.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_eviction_fails_the_evicted_request_clearly() {
    let (dir, _certs) = fixture();
    // A budget smaller than one session's cache: concurrent sessions evict each other.
    let engine = EngineConfig {
        kv_budget_bytes: 1,
        ..EngineConfig::default()
    };
    let single = single_node(dir.path(), None, None, policy(InferMode::Local), engine)
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for i in 0..4 {
        let a = single.clone();
        tasks.push(tokio::spawn(async move {
            a.generate_collect(request(PROMPTS[i % 3], policy(InferMode::Local), NEW))
                .await
        }));
    }
    let mut evicted = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok((toks, _)) => assert_eq!(toks.len(), NEW),
            Err(e) => {
                assert!(e.to_string().contains("evicted"), "{e}");
                evicted += 1;
            }
        }
    }
    assert!(evicted > 0, "no session was evicted under a 1-byte budget");
    assert!(single.engine_stats().await.evictions > 0);
    // The node keeps serving.
    single
        .generate_collect(request(PROMPTS[0], policy(InferMode::Local), NEW))
        .await
        .unwrap();
}

/// Sessions that keep an exit's KV and sessions that skip it share batches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_policies_in_one_batch_stay_exact() {
    let (dir, certs) = fixture();
    let mut want = std::collections::HashMap::new();
    for exit in [1usize, 5] {
        let single = single_node(
            dir.path(),
            None,
            Some(exit),
            policy(InferMode::Local),
            EngineConfig::default(),
        )
        .await
        .unwrap();
        for (k, p) in PROMPTS.iter().enumerate() {
            let toks = single
                .generate_collect(request(p, policy(InferMode::Local), NEW))
                .await
                .unwrap()
                .0;
            want.insert((exit, k), ids(&toks));
        }
    }
    let c = cluster(dir.path(), certs.path()).await;
    let mut tasks = Vec::new();
    for i in 0..12 {
        let dev = c.device.clone();
        let (exit, p) = if i % 2 == 0 {
            (
                5,
                Policy {
                    answer_exit: Some(5),
                    ..policy(InferMode::Route)
                },
            )
        } else {
            (1, policy(InferMode::Local))
        };
        tasks.push(tokio::spawn(async move {
            (
                exit,
                i % 3,
                dev.generate_collect(request(PROMPTS[i % 3], p, NEW)).await,
            )
        }));
    }
    for t in tasks {
        let (exit, k, r) = t.await.unwrap();
        assert_eq!(
            ids(&r.unwrap().0),
            want[&(exit, k)],
            "exit {exit} prompt {k}"
        );
    }
    c.shutdown().await;
}

/// Protocol 4: a request stream starts with one `Open` (no reply); a step before it, or a
/// second one, is refused with `Unexpected` naming what was wrong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_stream_must_start_with_one_open() {
    use flow_protocol::transport::{Endpoint, EndpointConfig, Security};
    use flow_protocol::{Continue, Encoding, ErrorCode, ErrorMsg, Message, Open, WireTensor};
    let (dir, _certs) = fixture();
    let cloud = flow_node::Agent::builder(dir.path())
        .role(Role::Cloud)
        .node_id("cloud")
        .layers(1..5)
        .listen("127.0.0.1:0".parse().unwrap())
        .start()
        .await
        .unwrap();
    // A hand-driven child: the cloud's own Hello, as an edge.
    let mut hello = cloud.hello().clone();
    hello.node_id = "edge".into();
    hello.role = Role::Edge;
    let local = "127.0.0.1:0".parse().unwrap();
    let ep = Endpoint::client(EndpointConfig::new(
        local,
        Security::InsecureLoopback,
        hello,
    ))
    .unwrap();
    let conn = ep
        .connect(cloud.local_addr().unwrap(), "cloud")
        .await
        .unwrap();
    let h = cloud.model_config().hidden_size;
    let step = |start: u32, rows: usize| {
        Message::Continue(Continue {
            start,
            hidden: WireTensor::encode(&vec![0.25; rows * h], &[rows, h], Encoding::F32).unwrap(),
            backfill: None,
            deadline_ms: None,
        })
    };
    let open = Message::Open(Open {
        request_id: 1,
        session_id: 1,
        layer: 1,
        policy: Policy::default(),
        sampling: Default::default(),
        deadline_ms: None,
    });
    let refused = |m: Option<Message>| -> ErrorMsg {
        match m {
            Some(Message::Error(e)) => e,
            other => panic!("expected an Error, got {other:?}"),
        }
    };

    let mut s = conn.open_session().await.unwrap();
    s.send(&step(0, 2)).await.unwrap();
    let e = refused(s.recv().await.unwrap());
    assert_eq!(e.code, ErrorCode::Unexpected, "{}", e.message);
    assert!(
        e.message.contains("Continue before the stream's Open"),
        "{}",
        e.message
    );

    let mut s = conn.open_session().await.unwrap();
    s.send(&open).await.unwrap();
    s.send(&open).await.unwrap();
    let e = refused(s.recv().await.unwrap());
    assert_eq!(e.code, ErrorCode::Unexpected, "{}", e.message);
    assert!(e.message.contains("second Open"), "{}", e.message);

    // Open, then steps: the Open is not answered, each step is.
    let mut s = conn.open_session().await.unwrap();
    s.send(&open).await.unwrap();
    for (start, rows) in [(0, 2), (2, 1)] {
        s.send(&step(start, rows)).await.unwrap();
        match s.recv().await.unwrap() {
            Some(Message::Tokens(t)) => {
                assert_eq!(t.tokens[0].position, start + rows as u32);
                assert_eq!(t.request_id, 1);
            }
            other => panic!("expected Tokens, got {other:?}"),
        }
    }
    cloud.shutdown().await;
}
