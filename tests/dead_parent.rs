//! A parent that stops answering, on real agents over loopback QUIC, cut by the testbed's
//! user-space shaper (loss 1.0 both ways: no close, no reset — silence, as when an edge is
//! SIGKILLed or partitioned):
//! - the request in flight still completes, its remaining tokens answered degraded from the
//!   device's own exit (reply deadline), long before a QUIC idle timeout would notice;
//! - missed probes mark the link down, so new requests answer locally at once;
//! - when the link heals, escalation resumes: on the same connection while it lives, and
//!   through the re-dialler once the connection has timed out.

use std::path::Path;
use std::time::Duration;

use flow_node::agent::wait_until;
use flow_node::parent::{LinkHealth, ProbeConfig};
use flow_node::{Agent, AgentConfig, GenEvent, GenerateRequest};
use flow_protocol::{Role, Sampling};
use flow_testbed::shaper::{Direction, LinkChange, LinkParams, ShaperConfig, ShaperHandle};

mod common;
use common::set_loss;

const PROMPT: &[u32] = &[256, 49, 50, 43, 51, 52, 61];
/// Generous bound on every wait here (a hung request would sit at a QUIC idle timeout of
/// 30 s or at the client's own timeout).
const BOUND: Duration = Duration::from_secs(20);

fn node(dir: &Path, role: Role, name: &str, a: usize, b: usize) -> AgentConfig {
    common::node_config(dir, role, name, a, b)
}

async fn start(cfg: AgentConfig) -> Agent {
    Agent::start(cfg).await.expect("agent starts")
}

fn request(n: usize) -> GenerateRequest {
    GenerateRequest {
        prompt: PROMPT.to_vec(),
        max_new_tokens: n,
        sampling: Sampling::default(),
        policy: Some(common::escalate_to_the_cloud()),
        stop_tokens: vec![],
    }
}

struct Setup {
    _dir: tempfile::TempDir,
    cloud: Agent,
    edge: Agent,
    device: Agent,
    link: ShaperHandle,
}

/// Cloud (3..5), edge (1..3 + exit 3), and a device (0..1 + exit 1) whose link to the edge
/// runs through a shaper (2 ms each way).
async fn setup(health: LinkHealth) -> Setup {
    let dir = common::tiny_family_without_eos();
    let cloud = start(node(dir.path(), Role::Cloud, "cloud", 3, 5)).await;
    let mut e = node(dir.path(), Role::Edge, "edge", 1, 3);
    e.parent = Some((cloud.local_addr().unwrap(), "cloud".into()));
    let edge = start(e).await;
    let mut cfg = ShaperConfig::loopback(edge.local_addr().unwrap());
    cfg.up = LinkParams::with_delay(Duration::from_millis(2));
    cfg.down = cfg.up.clone();
    let link = ShaperHandle::spawn(cfg).await.expect("shaper starts");
    let mut d = node(dir.path(), Role::Device, "device", 0, 1);
    d.parent = Some((link.local_addr(), "edge".into()));
    d.probe = ProbeConfig {
        interval: Some(Duration::from_millis(200)),
        health,
        ..ProbeConfig::default()
    };
    let device = start(d).await;
    Setup {
        _dir: dir,
        cloud,
        edge,
        device,
        link,
    }
}

/// Generate `n` tokens; cut the link after `cut_after` tokens. Returns (token, degraded)
/// pairs and the degraded count of the stats; panics on an error or a hang past BOUND.
async fn generate(
    s: &Setup,
    n: usize,
    cut_after: Option<usize>,
) -> Vec<(flow_protocol::TokenOut, bool)> {
    let run = async {
        let mut rx = s.device.generate(request(n)).await.unwrap();
        let mut got = Vec::new();
        let mut stats = None;
        while let Some(ev) = rx.recv().await {
            match ev {
                GenEvent::Token { token, degraded } => {
                    got.push((token, degraded));
                    if Some(got.len()) == cut_after {
                        set_loss(&s.link, 1.0).await;
                    }
                }
                GenEvent::Done(st) => stats = Some(st),
                GenEvent::Error(e) => panic!("the request failed: {e}"),
            }
        }
        let stats = stats.expect("the request finished");
        assert_eq!(got.len(), n, "no token lost");
        assert_eq!(
            stats.degraded_tokens,
            got.iter().filter(|t| t.1).count(),
            "stats count the degraded tokens"
        );
        got
    };
    tokio::time::timeout(BOUND, run)
        .await
        .expect("the request completed instead of hanging")
}

fn all_from_the_cloud(got: &[(flow_protocol::TokenOut, bool)]) -> bool {
    got.iter().all(|(t, d)| !d && t.tier == Role::Cloud)
}

async fn shutdown(s: Setup) {
    s.device.shutdown().await;
    s.edge.shutdown().await;
    s.cloud.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_parent_degrades_in_flight_and_new_requests_until_it_answers_again() {
    // A long idle timeout: only the reply deadline and the probes can notice the cut.
    let s = setup(LinkHealth {
        keep_alive: Duration::from_secs(5),
        idle_timeout: Duration::from_secs(60),
        ..LinkHealth::default()
    })
    .await;
    let parent = s.device.parents().unwrap().active();
    assert!(all_from_the_cloud(&generate(&s, 4, None).await));

    // Cut mid-generation: the rest is answered at the device's exit, marked degraded.
    let got = generate(&s, 12, Some(3)).await;
    assert!(all_from_the_cloud(&got[..3]), "{got:?}");
    let first = got
        .iter()
        .position(|t| t.1)
        .expect("tokens after the cut are degraded");
    assert!(first >= 3, "{got:?}");
    for (t, d) in &got[first..] {
        assert!(*d && (t.tier, t.exit) == (Role::Device, 1), "{got:?}");
    }
    // The reply deadline caught the cut (unless the probes marked the link down before
    // the first escalation after it: then that one was not even tried).
    let timeouts = s.device.metrics().parent_timeouts.get();
    assert!(timeouts <= 1, "{timeouts}");

    // Missed probes take the link down; a new request then does not wait on it at all.
    assert!(
        wait_until(BOUND, || parent.is_down()).await,
        "link marked down"
    );
    let got = generate(&s, 6, None).await;
    assert!(
        got.iter()
            .all(|(t, d)| *d && (t.tier, t.exit) == (Role::Device, 1)),
        "{got:?}"
    );
    assert_eq!(
        s.device.metrics().parent_timeouts.get(),
        timeouts,
        "a down link is not tried"
    );

    // What an API client sees: every streamed token of the answer marked degraded, the
    // final stats counting them, and Prometheus' counter covering every degraded token.
    let api = common::serve_api(&s.device).await;
    let ask = r#"{"prompt":"12+34=","max_tokens":5,"temperature":0,"stream":true,
        "aiflow":{"mode":"escalate","threshold":2.0}}"#;
    let (status, sse) = common::http(api, "POST", "/v1/completions", ask).await;
    assert_eq!(status, 200, "{sse}");
    let tokens: Vec<serde_json::Value> = sse
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<serde_json::Value>(d).ok())
        .filter(|c| c["choices"][0]["finish_reason"].is_null() && c["aiflow"]["tier"].is_string())
        .collect();
    assert_eq!(tokens.len(), 5, "{sse}");
    for c in &tokens {
        assert_eq!(c["aiflow"]["degraded"], true, "{c}");
        assert_eq!(
            (c["aiflow"]["tier"].as_str(), c["aiflow"]["exit"].as_u64()),
            (Some("device"), Some(1)),
            "{c}"
        );
    }
    let (status, metrics) = common::http(api, "GET", "/metrics", "").await;
    assert_eq!(status, 200);
    let counted: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("aiflow_degraded_tokens_total "))
        .and_then(|v| v.trim().parse().ok())
        .expect("aiflow_degraded_tokens_total on /metrics");
    // after the cut: the rest of the 12, the 6 of the request above, these 5
    let degraded_so_far = ((12 - first) + got.len() + 5) as u64;
    assert_eq!(counted, degraded_so_far, "{metrics}");

    // The link heals: probes bring it back up and escalation resumes.
    set_loss(&s.link, 0.0).await;
    assert!(
        wait_until(BOUND, || !parent.is_down()).await,
        "link up again"
    );
    assert!(all_from_the_cloud(&generate(&s, 6, None).await));
    shutdown(s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_parent_connection_is_redialled_when_the_parent_is_back() {
    let s = setup(LinkHealth::default()).await;
    let parent = s.device.parents().unwrap().active();
    assert!(all_from_the_cloud(&generate(&s, 3, None).await));
    let got = generate(&s, 8, Some(2)).await;
    assert!(got[2..].iter().all(|t| t.1), "{got:?}");
    // The connection dies at its idle timeout (no packet from the parent any more).
    assert!(
        wait_until(BOUND, || parent.is_down()).await,
        "link marked down"
    );
    let t = tokio::time::timeout(BOUND, async {
        while parent.stats().await.is_some() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(t.is_ok(), "the dead connection was dropped");
    // The parent is reachable again: the re-dialler connects and escalation resumes.
    set_loss(&s.link, 0.0).await;
    assert!(wait_until(BOUND, || !parent.is_down()).await, "re-dialled");
    assert!(parent.stats().await.is_some());
    assert!(all_from_the_cloud(&generate(&s, 4, None).await));
    shutdown(s).await;
}

/// A slow link is not a dead one. At 0.25 Mbit/s the first big goodput probe — sized from
/// the 10 Mbit/s prior, ~31 KB, a second of transfer — outlives the small probe's deadline.
/// That must not count as a missed probe (it used to: the link was marked down for good,
/// since the estimate never shrank and every later big probe missed too); the link stays up
/// and the goodput estimate comes down toward the real rate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_link_stays_up_and_its_goodput_estimate_comes_down() {
    let s = setup(LinkHealth::default()).await;
    s.link
        .apply(
            Direction::Both,
            LinkChange {
                rate_mbit: Some(0.25),
                ..LinkChange::default()
            },
        )
        .await
        .expect("shaper applies the change");
    let parent = s.device.parents().unwrap().active();
    // The estimate is a time-based EWMA that starts from whatever the unshaped loopback
    // measured (tens to hundreds of Mbit/s, depending on load), so how many rounds it takes
    // to fall varies; what must hold is that it falls toward the real rate within the bound
    // while the link is never marked down.
    let before = parent.probe_rounds();
    let mut went_down = false;
    let came_down = wait_until(BOUND, || {
        went_down |= !parent.reachable();
        // A planner reads the estimate: the goodput probe is wanted (within the budget).
        let _ = parent.planning_estimate();
        parent.estimate().goodput_bps < 2e6
    })
    .await;
    let g = parent.estimate().goodput_bps;
    assert!(
        came_down,
        "goodput estimate {g} b/s did not come down toward the 0.25 Mbit/s link within {BOUND:?}"
    );
    assert!(
        !went_down && parent.reachable(),
        "a slow but live parent is not marked down"
    );
    assert!(
        parent.probe_rounds() > before,
        "probe rounds completed on the slow link"
    );
    shutdown(s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_shows_each_childs_sessions_on_its_metrics() {
    let s = setup(LinkHealth::default()).await;
    let api = common::serve_api(&s.edge).await;
    let scrape = || async { common::http(api, "GET", "/metrics", "").await.1 };
    let open = r#"aiflow_child_sessions{child="device",role="device"}"#;
    // A long request in flight: its session shows on the edge, under the device's name.
    let device = s.device.clone();
    let long = tokio::spawn(async move { device.generate_collect(request(400)).await });
    let mut seen = false;
    for _ in 0..200 {
        if scrape().await.contains(&format!("{open} 1")) {
            seen = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        seen,
        "the device's open session on the edge's /metrics: {}",
        scrape().await
    );
    let (tokens, _) = long.await.expect("joins").expect("the request completes");
    assert_eq!(tokens.len(), 400);
    // Finished: back to zero once the edge has closed the session (a moment after the
    // last token), nothing refused, the limit shown beside it.
    let mut m = scrape().await;
    for _ in 0..100 {
        if m.contains(&format!("{open} 0")) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        m = scrape().await;
    }
    assert!(m.contains(&format!("{open} 0")), "{m}");
    assert!(
        m.contains(r#"aiflow_child_sessions_refused_total{child="device",role="device"} 0"#),
        "{m}"
    );
    assert!(m.contains("aiflow_child_sessions_limit 64"), "{m}");
    shutdown(s).await;
}
