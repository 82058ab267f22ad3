//! Speculation and routing when the top tier is gone, on real agents over loopback QUIC:
//! the cloud (the verifier) goes silent while a `speculate` request streams (the testbed's
//! user-space shaper drops everything between edge and cloud, as a SIGKILL or a partition
//! would).
//! - `speculate`: the edge can no longer relay the drafts, so the device answers from its
//!   own exit and marks every such token degraded; nothing is lost and the request does
//!   not fail. New requests after the loss degrade the same way.
//! - `route` to the cloud's exit: the edge answers from its own exit (the deepest one still
//!   reachable, its KV kept complete for this), every such token degraded.

use std::time::Duration;

use flow_node::{Agent, GenEvent};
use flow_protocol::{InferMode, Policy, Role, TokenOut};
use flow_testbed::shaper::{Direction, LinkChange, LinkParams, ShaperConfig, ShaperHandle};

mod common;

const PROMPT: &[u32] = &[256, 49, 50, 43, 51, 52, 61];
const BOUND: Duration = Duration::from_secs(20);

fn speculate() -> Policy {
    Policy {
        mode: InferMode::Speculate,
        draft_len: 3,
        ..Policy::default()
    }
}

/// Generate `n` tokens; run `at_k` after the k-th token. Returns (token, degraded).
async fn generate<F, Fut>(
    device: &Agent,
    policy: Policy,
    n: usize,
    k: usize,
    at_k: F,
) -> Vec<(TokenOut, bool)>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let run = async {
        let mut rx = device
            .generate(common::request(PROMPT, policy, n))
            .await
            .expect("request accepted");
        let (mut got, mut stats, mut hook) = (Vec::new(), None, Some(at_k));
        while let Some(ev) = rx.recv().await {
            match ev {
                GenEvent::Token { token, degraded } => {
                    got.push((token, degraded));
                    if got.len() == k {
                        if let Some(h) = hook.take() {
                            h().await;
                        }
                    }
                }
                GenEvent::Done(s) => stats = Some(s),
                GenEvent::Error(e) => panic!("the request failed: {e}"),
            }
        }
        let stats = stats.expect("the request finished");
        assert_eq!(got.len(), n, "no token lost");
        assert_eq!(stats.degraded_tokens, got.iter().filter(|t| t.1).count());
        got
    };
    tokio::time::timeout(BOUND, run)
        .await
        .expect("the request completed instead of hanging")
}

struct Tiers {
    _dir: tempfile::TempDir,
    cloud: Agent,
    edge: Agent,
    device: Agent,
    link: ShaperHandle,
}

/// Cloud (3..5), edge (1..3), device (0..1) of the tiny family; edge → cloud through a
/// shaper, 5 ms each way, so a round outlasts the cut's setup.
async fn tiers() -> Tiers {
    let dir = common::tiny_family_without_eos();
    let cloud = Agent::start(common::node_config(dir.path(), Role::Cloud, "cloud", 3, 5))
        .await
        .expect("cloud starts");
    let mut cfg = ShaperConfig::loopback(cloud.local_addr().expect("listening"));
    cfg.up = LinkParams::with_delay(Duration::from_millis(5));
    cfg.down = cfg.up.clone();
    let link = ShaperHandle::spawn(cfg).await.expect("shaper starts");
    let mut e = common::node_config(dir.path(), Role::Edge, "edge", 1, 3);
    e.parent = Some((link.local_addr(), "cloud".into()));
    let edge = Agent::start(e).await.expect("edge starts");
    let mut d = common::node_config(dir.path(), Role::Device, "device", 0, 1);
    d.parent = Some((edge.local_addr().expect("listening"), "edge".into()));
    let device = Agent::start(d).await.expect("device starts");
    Tiers {
        _dir: dir,
        cloud,
        edge,
        device,
        link,
    }
}

async fn cut(link: &ShaperHandle) {
    link.apply(
        Direction::Both,
        LinkChange {
            loss: Some(1.0),
            ..LinkChange::default()
        },
    )
    .await
    .expect("shaper applies the cut");
}

impl Tiers {
    async fn shutdown(self) {
        self.device.shutdown().await;
        self.edge.shutdown().await;
        self.cloud.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn speculation_degrades_to_the_device_exit_when_the_cloud_is_gone() {
    let t = tiers().await;
    let device = &t.device;

    // Undisturbed: every token verified above, none degraded.
    let before = generate(device, speculate(), 8, usize::MAX, || async {}).await;
    assert!(before.iter().all(|t| !t.1), "{before:?}");
    assert!(before.iter().any(|t| t.0.tier == Role::Cloud));

    // The cloud goes silent after the second token.
    let got = generate(device, speculate(), 40, 2, || cut(&t.link)).await;
    assert!(
        got[..2].iter().all(|t| !t.1),
        "tokens before the loss were verified"
    );
    let first = got
        .iter()
        .position(|t| t.1)
        .unwrap_or_else(|| panic!("tokens after the loss are degraded: {got:?}"));
    assert!(
        got[first..].iter().all(|t| t.1 && t.0.tier == Role::Device),
        "{got:?}"
    );
    let positions: Vec<u32> = got.iter().map(|t| t.0.position).collect();
    let want: Vec<u32> = (PROMPT.len() as u32..).take(40).collect();
    assert_eq!(positions, want, "every position exactly once");

    // A new request with the cloud gone: answered, all degraded, from the device.
    let after = generate(device, speculate(), 6, usize::MAX, || async {}).await;
    assert!(
        after.iter().all(|t| t.1 && t.0.tier == Role::Device),
        "{after:?}"
    );
    t.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_to_the_cloud_answers_from_the_edge_exit_when_the_cloud_is_gone() {
    let t = tiers().await;
    let route = Policy {
        mode: InferMode::Route,
        answer_exit: Some(5),
        ..Policy::default()
    };
    let before = generate(&t.device, route.clone(), 6, usize::MAX, || async {}).await;
    assert!(
        before.iter().all(|t| !t.1 && t.0.tier == Role::Cloud),
        "{before:?}"
    );

    let got = generate(&t.device, route.clone(), 30, 2, || cut(&t.link)).await;
    assert!(got[..2].iter().all(|t| !t.1 && t.0.tier == Role::Cloud));
    let first = got
        .iter()
        .position(|t| t.1)
        .unwrap_or_else(|| panic!("tokens after the loss are degraded: {got:?}"));
    assert!(
        got[first..]
            .iter()
            .all(|t| t.1 && t.0.tier == Role::Edge && t.0.exit == 3),
        "the deepest exit still reachable answers: {got:?}"
    );
    let positions: Vec<u32> = got.iter().map(|t| t.0.position).collect();
    let want: Vec<u32> = (PROMPT.len() as u32..).take(30).collect();
    assert_eq!(positions, want, "every position exactly once");
    t.shutdown().await;
}
