//! Parents verified by the cluster CA and the role in their certificate, on real agents over
//! loopback QUIC with mutual TLS: a device fails over between two edges whose certificates
//! carry their own names without being told any name (`--parent-name` is an optional pin),
//! a wrong pin is refused with a message that says what to change, and a node whose preferred
//! parent is down at start starts on the next one.

use std::path::Path;
use std::time::Duration;

use flow_node::{Agent, AgentConfig, GenEvent, GenerateRequest};
use flow_protocol::transport::{certs, ParentName, Security};
use flow_protocol::{Role, Sampling};

mod common;

const PROMPT: &[u32] = &[256, 49, 50, 43, 51, 52, 61];
const NEW: usize = 8;
/// Bound on one generation (a reply deadline and a re-dial included).
const BOUND: Duration = Duration::from_secs(30);

/// The tiny family and a directory with a cluster CA in `ca/`.
fn fixture() -> (tempfile::TempDir, tempfile::TempDir) {
    let pki = tempfile::tempdir().unwrap();
    certs::init_ca(&pki.path().join("ca")).unwrap();
    (common::tiny_family_without_eos(), pki)
}

/// `name`'s certificate (role `role`) from the cluster CA in `pki/ca`.
fn mtls(pki: &Path, name: &str, role: Role) -> Security {
    let files = certs::issue(&pki.join("ca"), name, role, &pki.join("nodes")).unwrap();
    Security::Mtls {
        ca: pki.join("ca").join(certs::CA_CERT),
        cert: files.cert,
        key: files.key,
    }
}

fn node(model: &Path, pki: &Path, role: Role, name: &str, a: usize, b: usize) -> AgentConfig {
    let mut cfg = common::node_config(model, role, name, a, b);
    cfg.security = mtls(pki, name, role);
    cfg
}

async fn start(cfg: AgentConfig) -> Agent {
    Agent::start(cfg).await.expect("agent starts")
}

/// Generate with every token escalated to the cloud; (tier, degraded) per token.
async fn generate(device: &Agent) -> Vec<(Role, bool)> {
    let run = async {
        let req = GenerateRequest {
            prompt: PROMPT.to_vec(),
            max_new_tokens: NEW,
            sampling: Sampling::default(),
            policy: Some(common::escalate_to_the_cloud()),
            stop_tokens: vec![],
        };
        let mut rx = device.generate(req).await.unwrap();
        let mut got = Vec::new();
        while let Some(ev) = rx.recv().await {
            match ev {
                GenEvent::Token { token, degraded } => got.push((token.tier, degraded)),
                GenEvent::Done(_) => {}
                GenEvent::Error(e) => panic!("the request failed: {e}"),
            }
        }
        got
    };
    tokio::time::timeout(BOUND, run)
        .await
        .expect("the request finished in time")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_fails_over_between_edges_with_their_own_names_without_pins() {
    let (model, pki) = fixture();
    let (m, p) = (model.path(), pki.path());
    let cloud = start(node(m, p, Role::Cloud, "cloud-1", 3, 5)).await;
    let mut edges = Vec::new();
    for name in ["edge-a", "edge-b"] {
        let mut e = node(m, p, Role::Edge, name, 1, 3);
        e.parent = Some((cloud.local_addr().unwrap(), ParentName::Any));
        edges.push(start(e).await);
    }
    let mut d = node(m, p, Role::Device, "device-1", 0, 1);
    d.parent = Some((edges[0].local_addr().unwrap(), ParentName::Any));
    d.fallback_parents = vec![(edges[1].local_addr().unwrap(), ParentName::Any)];
    let device = start(d).await;

    let got = generate(&device).await;
    assert_eq!(got, vec![(Role::Cloud, false); NEW], "through edge-a");

    // edge-a dies; the device continues on edge-b, whose certificate names edge-b.
    edges[0].abort().await;
    let got = generate(&device).await;
    assert_eq!(got.len(), NEW, "no token lost: {got:?}");
    assert_eq!(got.last(), Some(&(Role::Cloud, false)), "{got:?}");
    let parents = device.parents().expect("the device has parents");
    assert_eq!(parents.active().addr(), edges[1].local_addr().unwrap());
    assert!(!parents.active().is_down());

    device.shutdown().await;
    edges[1].shutdown().await;
    cloud.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_parent_name_pin_is_refused_with_the_fix() {
    let (model, pki) = fixture();
    let (m, p) = (model.path(), pki.path());
    let edge = start(node(m, p, Role::Edge, "edge-b", 1, 3)).await;
    let mut d = node(m, p, Role::Device, "device-1", 0, 1);
    d.parent = Some((edge.local_addr().unwrap(), "edge-a".into()));
    let msg = match Agent::start(d).await {
        Ok(_) => panic!("a wrong pin must be refused"),
        Err(e) => e.to_string(),
    };
    assert!(
        msg.contains("is for edge-b, not \"edge-a\" (--parent-name)"),
        "{msg}"
    );
    edge.shutdown().await;
}

/// A node restarted while its preferred parent is down still starts, on the next parent
/// that answers (the preferred one keeps being re-dialled); with no parent answering the
/// start fails with the first parent's error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_preferred_parent_is_down_at_start_uses_the_next() {
    let (model, pki) = fixture();
    let (m, p) = (model.path(), pki.path());
    let cloud = start(node(m, p, Role::Cloud, "cloud-1", 3, 5)).await;
    let mut e = node(m, p, Role::Edge, "edge-b", 1, 3);
    e.parent = Some((cloud.local_addr().unwrap(), ParentName::Any));
    let edge = start(e).await;
    // a UDP port nobody answers on: a parent that is down (its host up, its process not)
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut d = node(m, p, Role::Device, "device-1", 0, 1);
    d.parent = Some((silent.local_addr().unwrap(), ParentName::Any));
    d.fallback_parents = vec![(edge.local_addr().unwrap(), ParentName::Any)];
    let device = start(d.clone()).await;
    let parents = device.parents().expect("the device has parents");
    assert_eq!(parents.active().addr(), edge.local_addr().unwrap());
    let got = generate(&device).await;
    assert_eq!(
        got,
        vec![(Role::Cloud, false); NEW],
        "through the second edge"
    );
    device.shutdown().await;

    // no parent answers: the start fails, naming the preferred parent
    let other = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    d.fallback_parents = vec![(other.local_addr().unwrap(), ParentName::Any)];
    let msg = match Agent::start(d).await {
        Ok(_) => panic!("a node with no reachable parent must not start"),
        Err(e) => e.to_string(),
    };
    assert!(
        msg.contains(&silent.local_addr().unwrap().to_string()),
        "{msg}"
    );
    edge.shutdown().await;
    cloud.shutdown().await;
}
