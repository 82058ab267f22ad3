//! Helpers shared by the root integration tests.

use flow_familial::init::{init_checkpoint, Preset};
use flow_familial::Layout;

/// The tiny family (6 layers, exits 1/3/5, seed 21) with no eos in its config, so
/// generation always runs to length and every position is compared.
#[allow(dead_code)]
pub fn tiny_family_without_eos() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    init_checkpoint(Preset::Tiny, Layout::RuyiQwen2, 21, dir.path()).unwrap();
    let cfg_path = dir.path().join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    v.as_object_mut().unwrap().remove("eos_token_id");
    std::fs::write(&cfg_path, v.to_string()).unwrap();
    dir
}

/// A point of an exit's accuracy curve (made-up planner inputs).
#[allow(dead_code)]
pub fn pt(threshold: f64, agreement: f64, escalation: f64) -> flow_partition::CurvePoint {
    flow_partition::CurvePoint {
        threshold,
        agreement,
        escalation,
    }
}

/// Made-up tiny-family profile (exit depths 1, 3, 6): every block costs `ms` per decoded
/// token.
#[allow(dead_code)]
pub fn profile(ms: f64) -> flow_partition::profile::NodeProfile {
    use flow_partition::profile::{BlockCost, Linear, NodeProfile, ProfileKey};
    let block = BlockCost {
        prefill: Linear { a: ms, b: 0.1 * ms },
        decode: Linear { a: ms, b: 0.0 },
        weight_bytes: 1 << 20,
        kv_bytes_per_token: 1024,
    };
    NodeProfile::uniform(
        ProfileKey {
            model_fingerprint: "tiny".into(),
            cpu: format!("made-up {ms} ms"),
        },
        6,
        block,
        &[1, 3, 6],
        block,
        block,
    )
}

/// A planner tier with [`profile`]`(ms)` and 1 GiB of memory.
#[allow(dead_code)]
pub fn tier_spec(
    role: flow_partition::planner::TierRole,
    ms: f64,
) -> flow_partition::planner::TierSpec {
    flow_partition::planner::TierSpec {
        role,
        profile: profile(ms),
        memory_limit_bytes: 1 << 30,
        load_factor: 1.0,
        compute_power_w: 0.0,
        radio_power_w: 0.0,
    }
}

/// One node holding the whole family, answering from the deepest exit: the reference
/// every collaborative output must equal (invariant I2).
#[allow(dead_code)]
pub async fn single_reference(dir: &std::path::Path) -> flow_node::Agent {
    flow_node::cluster::single_node(
        dir,
        None,
        None,
        flow_protocol::Policy {
            mode: flow_protocol::InferMode::Local,
            ..flow_protocol::Policy::default()
        },
        flow_node::EngineConfig::default(),
    )
    .await
    .unwrap()
}

/// Device, edge and cloud on loopback with mTLS over the tiny family in `dir` (exits 1, 3
/// and the deepest), default policy, f32 on the wire.
#[allow(dead_code)]
pub async fn tiny_cluster(
    dir: &std::path::Path,
    certs: &std::path::Path,
) -> flow_node::cluster::LocalCluster {
    flow_node::cluster::LocalCluster::start(flow_node::cluster::ClusterSpec {
        model_dir: dir.to_path_buf(),
        declare_exits: None,
        device_exit: 1,
        edge_exit: 3,
        certs_dir: certs.to_path_buf(),
        policy: flow_protocol::Policy::default(),
        encoding: flow_protocol::Encoding::F32,
        engine: flow_node::EngineConfig::default(),
    })
    .await
    .expect("cluster starts")
}

/// Run-time planning for the tiny family (exit depths 1, 3, 6; exit points 1, 3, 5) with
/// made-up accuracy `curves` for exits 1 and 3, checked every 50 ms with `hold_ms` of
/// hysteresis hold.
#[allow(dead_code)]
pub fn tiny_planning(
    curves: [Vec<flow_partition::CurvePoint>; 2],
    tiers: Vec<flow_partition::planner::TierSpec>,
    links: Vec<flow_partition::LinkEstimate>,
    config: flow_partition::PlannerConfig,
    hold_ms: u64,
) -> flow_node::planning::PlanningConfig {
    use flow_partition::planner::{ExitSpec, ModelShape};
    let [exit1, exit3] = curves;
    flow_node::planning::PlanningConfig {
        input: flow_partition::PlanInput {
            model: ModelShape {
                num_layers: 6,
                hidden_size: 64,
                token_id_bytes: 4,
                exits: vec![
                    ExitSpec {
                        depth: 1,
                        curve: exit1,
                    },
                    ExitSpec {
                        depth: 3,
                        curve: exit3,
                    },
                    ExitSpec {
                        depth: 6,
                        curve: vec![],
                    },
                ],
            },
            tiers,
            links,
            config,
        },
        exit_depths: vec![(1, 1), (3, 3), (5, 6)],
        replan: flow_partition::ReplanConfig {
            hold_ms,
            ..flow_partition::ReplanConfig::default()
        },
        check_interval: std::time::Duration::from_millis(50),
        measure: flow_protocol::ConfidenceMeasure::MaxProb,
    }
}

/// Policy for a device (exit 1) → edge (exit 3) → cloud chain where every token is answered
/// by the cloud's deepest exit unless a tier fails: the device computes its exit (threshold
/// 1.0 is never reached), the edge always forwards.
#[allow(dead_code)] // not every test file that includes `common` uses it
pub fn escalate_to_the_cloud() -> flow_protocol::Policy {
    use flow_protocol::{ExitThreshold, InferMode, Policy};
    Policy {
        mode: InferMode::Escalate,
        thresholds: vec![
            ExitThreshold {
                exit: 1,
                threshold: 1.0,
            },
            ExitThreshold {
                exit: 3,
                threshold: 2.0,
            },
        ],
        default_threshold: 2.0,
        ..Policy::default()
    }
}

/// Config of a node hosting trunk layers `a..b` (+ the exit at `b`) of the family in `dir`;
/// upper tiers listen on an ephemeral loopback port.
#[allow(dead_code)] // not every test file that includes `common` uses it
pub fn node_config(
    dir: &std::path::Path,
    role: flow_protocol::Role,
    name: &str,
    a: usize,
    b: usize,
) -> flow_node::AgentConfig {
    let mut cfg = flow_node::Agent::builder(dir)
        .role(role)
        .node_id(name)
        .layers(a..b)
        .config()
        .unwrap();
    cfg.listen = (role != flow_protocol::Role::Device).then(|| "127.0.0.1:0".parse().unwrap());
    cfg
}

/// A policy of `mode` with every other field at its default.
#[allow(dead_code)]
pub fn policy(mode: flow_protocol::InferMode) -> flow_protocol::Policy {
    flow_protocol::Policy {
        mode,
        ..flow_protocol::Policy::default()
    }
}

/// A greedy request for exactly `new` tokens (no stop token, so every position counts).
#[allow(dead_code)]
pub fn request(prompt: &[u32], p: flow_protocol::Policy, new: usize) -> flow_node::GenerateRequest {
    flow_node::GenerateRequest {
        prompt: prompt.to_vec(),
        max_new_tokens: new,
        sampling: flow_protocol::Sampling::default(),
        policy: Some(p),
        stop_tokens: vec![],
    }
}

/// The token ids of generated tokens.
#[allow(dead_code)]
pub fn ids(t: &[flow_protocol::TokenOut]) -> Vec<u32> {
    t.iter().map(|t| t.id).collect()
}

/// One HTTP/1.1 request on a fresh connection, read to its end: (status, body as sent,
/// chunked framing included for a stream).
#[allow(dead_code)]
pub async fn http(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    body: &str,
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.expect("write");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.expect("read");
    let raw = String::from_utf8(raw).expect("utf-8 reply");
    let (head, body) = raw.split_once("\r\n\r\n").expect("a header block");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status line");
    (status, body.to_string())
}

/// Drop this share of the packets both ways on `link` (1.0: silence, as a SIGKILLed host or
/// a partition looks from the other end; 0.0: healed).
#[allow(dead_code)]
pub async fn set_loss(link: &flow_testbed::shaper::ShaperHandle, loss: f64) {
    use flow_testbed::shaper::{Direction, LinkChange};
    link.apply(
        Direction::Both,
        LinkChange {
            loss: Some(loss),
            ..LinkChange::default()
        },
    )
    .await
    .expect("shaper applies the change");
}

/// The OpenAI-style API of `agent` on a loopback port (default options), served until the
/// test's runtime ends; its address.
#[allow(dead_code)]
pub async fn serve_api(agent: &flow_node::Agent) -> std::net::SocketAddr {
    let (addr, _server, ready) = flow_node::http::serve_loading(
        "127.0.0.1:0".parse().unwrap(),
        &flow_node::http::ApiOptions::default(),
    )
    .await
    .expect("the API binds");
    ready.set(agent.clone());
    addr
}
