//! Camera → edge over the real protocol: QUIC on loopback (insecure-loopback and mutual
//! TLS), flow-protocol sessions, the shipped vision family. No assertion is about speed.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use flow_protocol::transport::{certs, Security};
use flow_protocol::Role;
use flow_traffic::controller::Approach;
use flow_traffic::dataset::{generate, DatasetSpec, Sample};
use flow_traffic::edge::{EdgeService, RemoteDetector};
use flow_traffic::scene::Camera;
use flow_traffic::sumo::Detector;
use flow_traffic::vision::{ModelDetector, VisionConfig, VisionFamily};

fn model() -> VisionFamily {
    let dir = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/traffic"));
    VisionFamily::load(dir).unwrap()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn local() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// Frames from every hard condition plus clear, half with an emergency vehicle.
fn frames() -> Vec<Sample> {
    generate(&DatasetSpec {
        samples: 24,
        seed: 911,
        conditions: vec![
            "clear".into(),
            "fog".into(),
            "night".into(),
            "glare".into(),
            "night-fog".into(),
        ],
        emergency_rate: 0.5,
        ..DatasetSpec::default()
    })
    .unwrap()
}

fn start_edge(rt: &tokio::runtime::Runtime, security: Security) -> EdgeService {
    rt.block_on(EdgeService::start(
        Arc::new(model()),
        security,
        local(),
        "edge-1",
    ))
    .unwrap()
}

#[test]
fn split_over_quic_equals_single_process_exactly() {
    let rt = runtime();
    let edge = start_edge(&rt, Security::InsecureLoopback);
    let mut cams = RemoteDetector::connect(
        rt.handle().clone(),
        model(),
        0.9,
        Security::InsecureLoopback,
        edge.addr(),
        "edge-1",
        "cameras",
    )
    .unwrap();
    let whole = model();
    let mut local_split = ModelDetector {
        model: model(),
        threshold: 0.9,
    };
    let samples = frames();
    let mut escalated = 0;
    for (i, s) in samples.iter().enumerate() {
        let a = Approach::ALL[i % 4];
        // Every frame escalated by hand: the edge's answer is bit-identical to running the
        // edge blocks in this process on the same hidden state.
        let (_, hidden) = whole.device(&[&s.frame]).unwrap();
        let here = whole.edge(&hidden).unwrap();
        let (there, bytes) = cams.escalate(a, &hidden).unwrap();
        assert_eq!(there.p_emergency.to_bits(), here.p_emergency[0].to_bits());
        assert_eq!(there.congestion.to_bits(), here.congestion[0].to_bits());
        assert_eq!(there.tier, Role::Edge);
        // [65, 48] f32 = 12480 bytes of hidden state plus framing.
        let raw = (whole.tokens() * whole.cfg.dim * 4) as u64;
        assert!(bytes > raw && bytes < raw + 1024, "{bytes} bytes");
        // The detector as the SUMO loop uses it (device exit, escalating below 0.9).
        let remote = cams.detect(a, &s.frame).unwrap();
        let single = local_split.detect(a, &s.frame).unwrap();
        assert_eq!(remote.emergency, single.emergency);
        assert_eq!(remote.escalated, single.escalated);
        assert_eq!(remote.congestion.to_bits(), single.congestion.to_bits());
        escalated += remote.escalated as usize;
        assert_eq!(remote.shipped_bytes > 0, remote.escalated);
    }
    eprintln!("{escalated} of {} frames escalated at 0.9", samples.len());
    edge.close();
}

#[test]
fn edge_refuses_malformed_hidden_states_and_keeps_serving() {
    let rt = runtime();
    let edge = start_edge(&rt, Security::InsecureLoopback);
    let mut cams = RemoteDetector::connect(
        rt.handle().clone(),
        model(),
        0.9,
        Security::InsecureLoopback,
        edge.addr(),
        "edge-1",
        "cameras",
    )
    .unwrap();
    let m = model();
    let (t, d) = (m.tokens(), m.cfg.dim);
    // Too few rows (a truncated frame).
    let short = Tensor::zeros((1, 10, d), candle_core::DType::F32, &Device::Cpu).unwrap();
    let e = cams
        .escalate(Approach::North, &short)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("Malformed") && e.contains(&format!("expected [{t}, {d}]")),
        "{e}"
    );
    // Wrong width.
    let wide = Tensor::zeros((1, t, d + 1), candle_core::DType::F32, &Device::Cpu).unwrap();
    let e = cams
        .escalate(Approach::East, &wide)
        .unwrap_err()
        .to_string();
    assert!(e.contains("expected"), "{e}");
    // Non-finite values.
    let mut v = vec![0.1f32; t * d];
    v[7] = f32::NAN;
    let nan = Tensor::from_vec(v, (1, t, d), &Device::Cpu).unwrap();
    let e = cams
        .escalate(Approach::North, &nan)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("non-finite") || e.contains("NaN") || e.contains("finite"),
        "{e}"
    );
    // The service is still up: a good frame on a fresh session is answered.
    let s = &frames()[0];
    let (_, hidden) = m.device(&[&s.frame]).unwrap();
    let (c, _) = cams.escalate(Approach::North, &hidden).unwrap();
    assert_eq!(
        c.p_emergency.to_bits(),
        m.edge(&hidden).unwrap().p_emergency[0].to_bits()
    );
    edge.close();
}

#[test]
fn mutual_tls_and_model_fingerprint_are_checked() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    certs::init_ca(&root.join("ca")).unwrap();
    certs::issue(&root.join("ca"), "edge-1", Role::Edge, &root.join("nodes")).unwrap();
    certs::issue(&root.join("ca"), "cam-1", Role::Device, &root.join("nodes")).unwrap();
    let mtls = |name: &str| Security::Mtls {
        ca: root.join("ca").join(certs::CA_CERT),
        cert: root.join("nodes").join(format!("{name}.pem")),
        key: root.join("nodes").join(format!("{name}.key")),
    };
    let edge = start_edge(&rt, mtls("edge-1"));
    let mut cams = RemoteDetector::connect(
        rt.handle().clone(),
        model(),
        1.0,
        mtls("cam-1"),
        edge.addr(),
        "edge-1",
        "cam-1",
    )
    .unwrap();
    let s = &frames()[1];
    let d = cams.detect(Approach::South, &s.frame).unwrap();
    assert!(d.escalated && d.shipped_bytes > 0);
    // A camera with different weights is refused at the Hello.
    let other = VisionFamily::new(VisionConfig::small(&Camera::default())).unwrap();
    let e = RemoteDetector::connect(
        rt.handle().clone(),
        other,
        1.0,
        mtls("cam-1"),
        edge.addr(),
        "edge-1",
        "cam-1",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("fingerprint"), "{e}");
    edge.close();
}
