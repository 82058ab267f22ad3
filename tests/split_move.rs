//! Moving the split point at run time, across real agents on loopback (QUIC):
//! a device that loaded layers 0..3 (exits 1 and 3) and an edge that loaded 1..5 (the
//! deepest exit). On a fast uplink the plan cuts the device at layer 1; an injected slow
//! link estimate makes the device re-plan to cut at layer 3. Requests started before the
//! re-plan keep cut 1 (one is live across it), requests after it run with cut 3, the edge
//! continues from whichever layer a request stream's `Open` names, and every output equals
//! single-node greedy generation token for token (invariant I2).

use std::ops::Range;
use std::path::Path;
use std::time::Duration;

use flow_node::agent::wait_until;
use flow_node::parent::ProbeConfig;
use flow_node::planning::PlanningConfig;
use flow_node::{Agent, GenEvent, GenerateRequest};
use flow_partition::planner::TierRole;
use flow_partition::{LinkEstimate, LinkEstimatorConfig, LinkSample, PlannerConfig};
use flow_protocol::{InferMode, Policy, Role, Sampling};

mod common;

const PROMPT: &[u32] = &[256, 49, 50, 43, 51, 52, 61];

/// Two tiers (device, edge). Made-up curves: exit 1 needs many escalations to meet the
/// target, exit 3 few; the device is slow. Fast uplink → cut at 1; slow uplink → cut at 3.
fn planning() -> PlanningConfig {
    use common::{pt, tier_spec as tier};
    common::tiny_planning(
        [
            vec![pt(0.9, 0.995, 0.8), pt(0.3, 0.975, 0.3), pt(0.0, 0.9, 0.0)],
            vec![pt(0.5, 0.99, 0.05), pt(0.0, 0.95, 0.0)],
        ],
        vec![tier(TierRole::Device, 10.0), tier(TierRole::Edge, 0.5)],
        vec![LinkEstimate::fixed(2.0, 100e6)],
        // Boundary 0 is pinned by the agent to its split points and its end.
        PlannerConfig::default(),
        200,
    )
}

/// An edge hosting `edge_layers` (and the deepest exit) and a device hosting 0..3 with
/// split points 1 and 3, planning from a link estimate that only moves when a test
/// injects samples (probing off; prior 2 ms, 100 Mbit/s).
async fn edge_and_device(dir: &Path, edge_layers: Range<usize>) -> (Agent, Agent) {
    let edge = Agent::builder(dir)
        .role(Role::Edge)
        .node_id("edge")
        .layers(edge_layers)
        .listen("127.0.0.1:0".parse().unwrap())
        .start()
        .await
        .unwrap();
    let device = Agent::builder(dir)
        .role(Role::Device)
        .node_id("device")
        .layers(0..3)
        .split_points(vec![1])
        .parent(edge.local_addr().unwrap(), "edge")
        .probe(ProbeConfig {
            interval: None,
            estimator: LinkEstimatorConfig {
                half_life_ms: 100.0,
                prior: LinkEstimate {
                    confidence: 0.0,
                    ..LinkEstimate::fixed(2.0, 100e6)
                },
                ..LinkEstimatorConfig::default()
            },
            ..ProbeConfig::default()
        })
        .planning(planning())
        .start()
        .await
        .unwrap();
    (edge, device)
}

fn request(prompt: &[u32], n: usize) -> GenerateRequest {
    GenerateRequest {
        prompt: prompt.to_vec(),
        max_new_tokens: n,
        sampling: Sampling::default(),
        // Every token from the edge's deepest exit, so outputs are comparable to a single
        // node; the cut still follows the plan.
        policy: Some(Policy {
            mode: InferMode::Escalate,
            default_threshold: 2.0,
            ..Policy::default()
        }),
        stop_tokens: vec![],
    }
}

fn ids(t: &[flow_protocol::TokenOut]) -> Vec<u32> {
    t.iter().map(|t| t.id).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replan_moves_the_cut_for_new_requests_and_every_output_stays_exact() {
    const LIVE: usize = 80; // more than the event channel holds: the request stays live
    let dir = common::tiny_family_without_eos();
    let (edge, device) = edge_and_device(dir.path(), 1..5).await;
    let before = device.applied_plan().expect("a plan is in force");
    assert_eq!(
        before.cut,
        Some(1),
        "{}",
        device.current_plan().unwrap().explain()
    );

    let single = common::single_reference(dir.path()).await;
    let (want, _) = single
        .generate_collect(GenerateRequest::greedy(PROMPT.to_vec(), LIVE))
        .await
        .unwrap();
    let want = ids(&want);

    // Request 1 with cut 1.
    let (r1, s1) = device.generate_collect(request(PROMPT, 12)).await.unwrap();
    assert_eq!(ids(&r1), want[..12].to_vec());
    assert!(r1.iter().all(|t| (t.tier, t.exit) == (Role::Edge, 5)));
    assert_eq!(s1.cut, 1);
    assert!(s1.hops > 0);

    // A session live across the re-plan: it blocks once the event channel is full.
    let mut live = device.generate(request(PROMPT, LIVE)).await.unwrap();
    let mut live_toks = Vec::new();
    for _ in 0..4 {
        match live.recv().await {
            Some(GenEvent::Token { token, .. }) => live_toks.push(token),
            other => panic!("live request: {other:?}"),
        }
    }

    // The uplink gets slow (injected estimate) → the device re-plans to cut at 3.
    let parent = device.parents().unwrap().active();
    let moved = wait_until(Duration::from_secs(15), || {
        let _ = parent.observe(LinkSample {
            at_ms: parent.now_ms(),
            rtt_ms: Some(200.0),
            goodput_bps: Some(1e6),
        });
        device.split_moves() >= 1
    })
    .await;
    assert!(
        moved,
        "no split move; estimate {:?}, plan {}",
        parent.estimate(),
        device.current_plan().unwrap().explain()
    );
    let after = device.applied_plan().unwrap();
    assert_eq!(
        after.cut,
        Some(3),
        "{}",
        device.current_plan().unwrap().explain()
    );
    assert!(device.replans() >= 1);
    assert!(device
        .planning_metrics()
        .contains("aiflow_split_moves_total 1"));

    // Request 2 runs with the new cut while the live one (cut 1) waits in the same engines.
    let (r2, s2) = device.generate_collect(request(PROMPT, 12)).await.unwrap();
    assert_eq!(ids(&r2), want[..12].to_vec(), "request 2 (cut 3) is exact");
    assert!(r2.iter().all(|t| (t.tier, t.exit) == (Role::Edge, 5)));
    assert_eq!(s2.cut, 3, "request 2 started after the move");
    assert!(s2.hops > 0);

    // The live session finishes on its own cut and stays exact.
    let mut done = None;
    while let Some(ev) = live.recv().await {
        match ev {
            GenEvent::Token { token, .. } => live_toks.push(token),
            GenEvent::Done(s) => done = Some(s),
            GenEvent::Error(e) => panic!("the live request failed: {e}"),
        }
    }
    let done = done.expect("the live request finished");
    assert_eq!(done.completion_tokens, LIVE);
    assert_eq!(done.cut, 1, "the live session kept the cut it started with");
    assert_eq!(
        ids(&live_toks),
        want,
        "the live session kept its cut exactly"
    );

    device.shutdown().await;
    edge.shutdown().await;
    single.shutdown().await;
}

/// A cut the parent has not loaded is refused with an error naming the layers (never a
/// silently wrong answer): the edge hosts 3..5, the device's plan cuts at 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parent_refuses_a_continue_from_a_layer_it_does_not_host() {
    let dir = common::tiny_family_without_eos();
    let (edge, device) = edge_and_device(dir.path(), 3..5).await;
    assert_eq!(device.applied_plan().unwrap().cut, Some(1));
    let err = device
        .generate_collect(request(PROMPT, 2))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("after layer 1") && err.contains("hosts layers 3..5"),
        "{err}"
    );
    // Split points must lie inside the entry node's layers and be exits.
    for bad in [vec![3], vec![2]] {
        let e = Agent::builder(dir.path())
            .layers(0..3)
            .split_points(bad.clone())
            .start()
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("split point"), "{bad:?}: {e}");
    }
    device.shutdown().await;
    edge.shutdown().await;
}
