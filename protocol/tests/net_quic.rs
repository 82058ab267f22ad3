#![cfg(feature = "transport")]
//! Loopback QUIC tests: real quinn, real mutual TLS, 127.0.0.1.
//!
//! Every test runs under a timeout so nothing can hang; no assertion is about speed.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use flow_protocol::transport::{
    certs, quinn, Endpoint, EndpointConfig, ParentName, PeerConnection, Security,
};
use flow_protocol::{
    Capacity, Continue, Encoding, Error, ErrorCode, Hello, Limits, Message, ModelFingerprint, Role,
    WireTensor, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
};
use tokio::sync::mpsc;
use tokio::time::timeout;

const T: Duration = Duration::from_secs(30);

fn hello(id: &str, role: Role, digest: u8) -> Hello {
    Hello {
        node_id: id.into(),
        role,
        protocol_version: PROTOCOL_VERSION,
        min_protocol_version: MIN_PROTOCOL_VERSION,
        model: ModelFingerprint {
            family: "test-family".into(),
            digest: [digest; 32],
        },
        hosted: vec![],
        capacity: Capacity::default(),
    }
}

struct Pki {
    _dir: tempfile::TempDir,
    root: PathBuf,
}

impl Pki {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        certs::init_ca(&root.join("ca")).unwrap();
        certs::init_ca(&root.join("other-ca")).unwrap();
        for (name, role) in [
            ("edge-1", Role::Edge),
            ("dev-1", Role::Device),
            ("cloud-1", Role::Cloud),
        ] {
            certs::issue(&root.join("ca"), name, role, &root.join("nodes")).unwrap();
        }
        certs::issue(
            &root.join("other-ca"),
            "dev-x",
            Role::Device,
            &root.join("foreign"),
        )
        .unwrap();
        Pki { _dir: dir, root }
    }

    fn mtls(&self, name: &str) -> Security {
        self.mtls_in("ca", "nodes", name)
    }

    fn mtls_in(&self, ca: &str, dir: &str, name: &str) -> Security {
        let d: &Path = &self.root;
        Security::Mtls {
            ca: d.join(ca).join(certs::CA_CERT),
            cert: d.join(dir).join(format!("{name}.pem")),
            key: d.join(dir).join(format!("{name}.key")),
        }
    }
}

fn local() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// Echo server: every session echoes each message back. A `Continue` starting at 666
/// makes its session stop reading forever (a stuck session). Handshake results go to `events`.
async fn spawn_server(
    cfg: EndpointConfig,
) -> (SocketAddr, mpsc::Receiver<Result<(), Error>>, Arc<Endpoint>) {
    let ep = Arc::new(Endpoint::server(cfg).unwrap());
    let addr = ep.local_addr().unwrap();
    let (tx, rx) = mpsc::channel(16);
    let server = ep.clone();
    tokio::spawn(async move {
        while let Some(incoming) = server.accept_incoming().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                match incoming.establish().await {
                    Ok(conn) => {
                        let _ = tx.send(Ok(())).await;
                        serve(Arc::new(conn)).await;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                    }
                }
            });
        }
    });
    (addr, rx, ep)
}

async fn serve(conn: Arc<PeerConnection>) {
    while let Ok(mut s) = conn.accept_session().await {
        tokio::spawn(async move {
            while let Ok(Some(m)) = s.recv().await {
                if let Message::Continue(c) = &m {
                    if c.start == 666 {
                        // Stuck: hold the stream open without reading.
                        std::future::pending::<()>().await;
                    }
                }
                if s.send(&m).await.is_err() {
                    break;
                }
            }
        });
    }
}

fn cont(request_id: u64, rows: usize, cols: usize, enc: Encoding) -> Message {
    let data: Vec<f32> = (0..rows * cols)
        .map(|i| ((i as f32) * 0.618).sin() * 3.0 + f32::EPSILON * i as f32)
        .collect();
    // The request id travels as the start position (the echo server's only handle on it).
    Message::Continue(Continue {
        start: request_id as u32,
        hidden: WireTensor::encode(&data, &[rows, cols], enc).unwrap(),
        backfill: None,
        deadline_ms: Some(1000),
    })
}

fn edge_server(pki: &Pki) -> EndpointConfig {
    EndpointConfig::new(local(), pki.mtls("edge-1"), hello("edge-1", Role::Edge, 7))
}

fn device_client(pki: &Pki) -> EndpointConfig {
    let mut c = EndpointConfig::new(local(), pki.mtls("dev-1"), hello("dev-1", Role::Device, 7));
    c.parent_roles = vec![Role::Edge];
    c
}

#[tokio::test]
async fn tensor_round_trips_bit_exact_over_mtls() {
    timeout(T, async {
        let pki = Pki::new();
        let (addr, mut events, _ep) = spawn_server(edge_server(&pki)).await;
        let client = Endpoint::client(device_client(&pki)).unwrap();
        let conn = client.connect(addr, "edge-1").await.unwrap();
        assert!(events.recv().await.unwrap().is_ok());
        assert_eq!(conn.peer_hello().node_id, "edge-1");
        assert_eq!(conn.peer_cert_role(), Some(Role::Edge));
        let mut s = conn.open_session().await.unwrap();
        for enc in Encoding::ALL {
            let msg = cont(1, 16, 896, enc);
            s.send(&msg).await.unwrap();
            let back = s.recv().await.unwrap().unwrap();
            assert_eq!(back, msg, "{enc}");
            if let (Message::Continue(a), Message::Continue(b)) = (&msg, &back) {
                assert_eq!(a.hidden.bytes(), b.hidden.bytes());
                let (x, y) = (a.hidden.decode().unwrap(), b.hidden.decode().unwrap());
                assert!(x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()));
            }
        }
        let stats = conn.stats();
        assert!(stats.bytes_sent > 16 * 896 * 4, "{stats:?}");
        assert!(stats.bytes_received > 16 * 896 * 4, "{stats:?}");
        assert!(stats.cwnd > 0 && stats.rtt > Duration::ZERO, "{stats:?}");
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn control_stream_carries_heartbeats() {
    timeout(T, async {
        let pki = Pki::new();
        let ep = Arc::new(Endpoint::server(edge_server(&pki)).unwrap());
        let addr = ep.local_addr().unwrap();
        let server = ep.clone();
        let srv = tokio::spawn(async move {
            let conn = server.accept().await.unwrap().unwrap();
            let mut ctl = conn.take_control().unwrap();
            assert!(conn.take_control().is_none());
            let m = ctl.recv().await.unwrap().unwrap();
            ctl.send(&m).await.unwrap();
            ctl.recv().await.unwrap() // wait for the client to finish
        });
        let client = Endpoint::client(device_client(&pki)).unwrap();
        let conn = client.connect(addr, "edge-1").await.unwrap();
        let mut ctl = conn.take_control().unwrap();
        let hb = Message::Heartbeat(flow_protocol::Heartbeat {
            seq: 9,
            load: Default::default(),
        });
        ctl.send(&hb).await.unwrap();
        assert_eq!(ctl.recv().await.unwrap(), Some(hb));
        ctl.finish().unwrap();
        assert_eq!(srv.await.unwrap(), None);
    })
    .await
    .expect("test timed out");
}

async fn expect_refused(
    server: EndpointConfig,
    client: EndpointConfig,
    server_name: &str,
) -> (Error, Error) {
    let (addr, mut events, _ep) = spawn_server(server).await;
    let client = Endpoint::client(client).unwrap();
    let client_err = match client.connect(addr, server_name).await {
        Ok(conn) => {
            // TLS 1.3: the client may finish its handshake before the server rejects its
            // certificate; the refusal then shows up on first use.
            let mut s = conn.open_session().await.unwrap();
            let _ = s.send(&cont(1, 1, 4, Encoding::F32)).await;
            match s.recv().await {
                Err(e) => e,
                Ok(m) => panic!("expected refusal, got {m:?}"),
            }
        }
        Err(e) => e,
    };
    let server_err = events
        .recv()
        .await
        .unwrap()
        .expect_err("server must refuse");
    (client_err, server_err)
}

#[tokio::test]
async fn client_without_certificate_is_refused() {
    timeout(T, async {
        let pki = Pki::new();
        let mut c = device_client(&pki);
        c.security = Security::ServerAuthOnly {
            ca: pki.root.join("ca").join(certs::CA_CERT),
        };
        let (client_err, server_err) = expect_refused(edge_server(&pki), c, "edge-1").await;
        eprintln!("client: {client_err}\nserver: {server_err}");
        assert!(
            client_err
                .to_string()
                .to_lowercase()
                .contains("certificate"),
            "{client_err}"
        );
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn client_with_certificate_from_another_ca_is_refused() {
    timeout(T, async {
        let pki = Pki::new();
        let mut c = device_client(&pki);
        c.security = pki.mtls_in("ca", "foreign", "dev-x");
        let (client_err, server_err) = expect_refused(edge_server(&pki), c, "edge-1").await;
        eprintln!("client: {client_err}\nserver: {server_err}");
        let text = format!("{client_err} {server_err}").to_lowercase();
        assert!(
            text.contains("certificate") || text.contains("issuer"),
            "{text}"
        );
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn server_with_certificate_from_another_ca_is_refused() {
    timeout(T, async {
        let pki = Pki::new();
        let mut s = edge_server(&pki);
        s.security = pki.mtls_in("other-ca", "foreign", "dev-x");
        s.accept_roles = vec![];
        let (addr, _events, _ep) = spawn_server(s).await;
        let client = Endpoint::client(device_client(&pki)).unwrap();
        let err = client.connect(addr, "dev-x").await.unwrap_err();
        assert!(matches!(err, Error::Tls(_)), "{err}");
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn device_certificate_cannot_register_as_edge() {
    timeout(T, async {
        let pki = Pki::new();
        // A cloud accepts edges; a device certificate is refused even if its Hello says edge.
        let cloud = EndpointConfig::new(local(), pki.mtls("cloud-1"), hello("cloud-1", Role::Cloud, 7));
        let mut c = device_client(&pki);
        c.hello.role = Role::Edge;
        c.parent_roles = vec![Role::Cloud];
        let (client_err, server_err) = expect_refused(cloud, c, "cloud-1").await;
        assert!(
            matches!(&client_err, Error::Refused { code: ErrorCode::RoleMismatch, message } if message.contains("role device")),
            "{client_err}"
        );
        assert!(matches!(server_err, Error::Refused { code: ErrorCode::RoleMismatch, .. }), "{server_err}");
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn hello_role_must_match_certificate_role() {
    timeout(T, async {
        let pki = Pki::new();
        let mut s = edge_server(&pki);
        s.accept_roles = vec![Role::Device, Role::Edge];
        let mut c = device_client(&pki);
        c.hello.role = Role::Edge; // lies: its certificate says device
        let (client_err, _) = expect_refused(s, c, "edge-1").await;
        assert!(
            client_err.to_string().contains("claims role edge"),
            "{client_err}"
        );
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn client_checks_server_role() {
    timeout(T, async {
        let pki = Pki::new();
        let mut cloud = EndpointConfig::new(
            local(),
            pki.mtls("cloud-1"),
            hello("cloud-1", Role::Cloud, 7),
        );
        cloud.accept_roles = vec![];
        let (addr, _events, _ep) = spawn_server(cloud).await;
        let client = Endpoint::client(device_client(&pki)).unwrap(); // expects an edge parent
        let err = client.connect(addr, "cloud-1").await.unwrap_err();
        assert!(
            matches!(&err, Error::Role(m) if m.contains("cloud certificate")),
            "{err}"
        );
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn mismatched_protocol_version_is_refused() {
    timeout(T, async {
        let pki = Pki::new();
        let mut c = device_client(&pki);
        c.hello.protocol_version = PROTOCOL_VERSION + 5;
        c.hello.min_protocol_version = PROTOCOL_VERSION + 1;
        let (client_err, server_err) = expect_refused(edge_server(&pki), c, "edge-1").await;
        assert!(
            matches!(&client_err, Error::Refused { code: ErrorCode::VersionMismatch, message } if message.contains("protocol version mismatch")),
            "{client_err}"
        );
        assert!(matches!(server_err, Error::Refused { code: ErrorCode::VersionMismatch, .. }));
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn mismatched_model_fingerprint_is_refused() {
    timeout(T, async {
        let pki = Pki::new();
        let mut c = device_client(&pki);
        c.hello.model.digest = [8; 32];
        let (client_err, _) = expect_refused(edge_server(&pki), c, "edge-1").await;
        assert!(
            matches!(&client_err, Error::Refused { code: ErrorCode::ModelMismatch, message } if message.contains("model fingerprint mismatch")),
            "{client_err}"
        );
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn over_limit_frame_gets_error_frame_and_other_sessions_continue() {
    timeout(T, async {
        let pki = Pki::new();
        let mut s = edge_server(&pki);
        s.codec.limits = Limits {
            max_frame_bytes: 1 << 20,
            ..Limits::default()
        };
        let (addr, _events, _ep) = spawn_server(s).await;
        let client = Endpoint::client(device_client(&pki)).unwrap();
        let conn = client.connect(addr, "edge-1").await.unwrap();
        let mut a = conn.open_session().await.unwrap();
        let mut b = conn.open_session().await.unwrap();
        let small = cont(1, 1, 896, Encoding::F32);
        a.send(&small).await.unwrap();
        assert_eq!(a.recv().await.unwrap().as_ref(), Some(&small));

        b.send(&cont(2, 512, 896, Encoding::F32)).await.unwrap(); // ~1.8 MB > 1 MiB
        match b.recv().await.unwrap() {
            Some(Message::Error(e)) => {
                assert_eq!(e.code, ErrorCode::FrameTooLarge);
                assert!(e.message.contains("payload_len"), "{}", e.message);
            }
            other => panic!("expected an Error frame, got {other:?}"),
        }
        // Session A and new sessions still work on the same connection.
        for i in 0..3 {
            let m = cont(10 + i, 2, 896, Encoding::F16);
            a.send(&m).await.unwrap();
            assert_eq!(a.recv().await.unwrap(), Some(m));
        }
        let mut c = conn.open_session().await.unwrap();
        c.send(&small).await.unwrap();
        assert_eq!(c.recv().await.unwrap(), Some(small));
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn sessions_beyond_the_limit_get_an_error_frame() {
    timeout(T, async {
        let pki = Pki::new();
        let mut s = edge_server(&pki);
        s.codec.limits.max_sessions_per_peer = 2;
        let (addr, _events, _ep) = spawn_server(s).await;
        let client = Endpoint::client(device_client(&pki)).unwrap();
        let conn = client.connect(addr, "edge-1").await.unwrap();
        let m = cont(1, 1, 8, Encoding::F32);
        let mut open = Vec::new();
        for _ in 0..2 {
            let mut s = conn.open_session().await.unwrap();
            s.send(&m).await.unwrap();
            assert_eq!(s.recv().await.unwrap().as_ref(), Some(&m));
            open.push(s);
        }
        let mut third = conn.open_session().await.unwrap();
        third.send(&m).await.unwrap();
        match third.recv().await.unwrap() {
            Some(Message::Error(e)) => {
                assert_eq!(e.code, ErrorCode::TooManySessions, "{}", e.message)
            }
            other => panic!("expected TooManySessions, got {other:?}"),
        }
        // The first two still work.
        for s in &mut open {
            s.send(&m).await.unwrap();
            assert_eq!(s.recv().await.unwrap().as_ref(), Some(&m));
        }
        // Closing one frees a slot.
        let mut first = open.remove(0);
        first.finish().unwrap();
        assert_eq!(first.recv().await.unwrap(), None);
        drop(first);
        let mut again = None;
        for _ in 0..50 {
            let mut s = conn.open_session().await.unwrap();
            s.send(&m).await.unwrap();
            match s.recv().await.unwrap() {
                Some(Message::Continue(_)) => {
                    again = Some(s);
                    break;
                }
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
        assert!(again.is_some(), "a freed slot must be reusable");
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn stuck_session_does_not_block_others() {
    timeout(T, async {
        let pki = Pki::new();
        let (addr, _events, _ep) = spawn_server(edge_server(&pki)).await;
        let client = Endpoint::client(device_client(&pki)).unwrap();
        let conn = Arc::new(client.connect(addr, "edge-1").await.unwrap());
        let mut stuck = conn.open_session().await.unwrap();
        stuck.send(&cont(666, 1, 8, Encoding::F32)).await.unwrap();
        // 24 MiB more than the 16 MiB stream window: this writer blocks on flow control.
        let big = cont(667, 2048, 3072, Encoding::F32);
        let writer = tokio::spawn(async move {
            let _ = stuck.send(&big).await;
            stuck
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut other = conn.open_session().await.unwrap();
        for i in 0..20 {
            let m = cont(i, 4, 896, Encoding::Bf16);
            other.send(&m).await.unwrap();
            assert_eq!(other.recv().await.unwrap(), Some(m));
        }
        assert!(
            !writer.is_finished(),
            "the stuck session's writer should still be blocked"
        );
        writer.abort();
    })
    .await
    .expect("test timed out: a stuck session blocked another");
}

#[tokio::test]
async fn insecure_loopback_works_and_refuses_other_addresses() {
    timeout(T, async {
        let s = EndpointConfig::new(
            local(),
            Security::InsecureLoopback,
            hello("edge-1", Role::Edge, 7),
        );
        let (addr, _events, _ep) = spawn_server(s).await;
        let c = EndpointConfig::new(
            local(),
            Security::InsecureLoopback,
            hello("dev-1", Role::Device, 7),
        );
        let client = Endpoint::client(c.clone()).unwrap();
        let conn = client.connect(addr, "localhost").await.unwrap();
        assert_eq!(conn.peer_cert_role(), None);
        let mut s = conn.open_session().await.unwrap();
        let m = cont(1, 2, 16, Encoding::Int8);
        s.send(&m).await.unwrap();
        assert_eq!(s.recv().await.unwrap(), Some(m));

        let err = client
            .connect("10.1.2.3:4433".parse().unwrap(), "x")
            .await
            .unwrap_err();
        assert!(matches!(err, Error::NotLoopback(_)), "{err}");
        assert!(err.to_string().contains("insecure-loopback"), "{err}");
        let mut bad = c;
        bad.bind = "0.0.0.0:0".parse().unwrap();
        assert!(matches!(Endpoint::server(bad), Err(Error::NotLoopback(_))));
    })
    .await
    .expect("test timed out");
}

// Parent verification: the cluster CA and the role in the certificate; the name is an
// optional pin.

/// A parent endpoint (edge, or cloud with `role`) presenting `dir/name.pem` from CA `ca`.
fn parent_server(pki: &Pki, ca: &str, dir: &str, name: &str, role: Role) -> EndpointConfig {
    let mut s = EndpointConfig::new(local(), pki.mtls_in(ca, dir, name), hello(name, role, 7));
    s.accept_roles = vec![];
    s
}

/// Connect a device (expects an edge or cloud parent, like a real one) to `server`.
async fn device_connects(
    pki: &Pki,
    server: EndpointConfig,
    name: impl Into<ParentName>,
) -> Result<PeerConnection, Error> {
    let (addr, _events, _ep) = spawn_server(server).await;
    let mut c = device_client(pki);
    c.parent_roles = vec![Role::Edge, Role::Cloud];
    let client = Endpoint::client(c).unwrap();
    let r = client.connect(addr, name).await;
    if let Err(e) = &r {
        eprintln!("refused: {e}");
    }
    r
}

/// `err` says every one of `parts` (what went wrong and what to do about it).
fn assert_says(err: &Error, parts: &[&str]) {
    let m = err.to_string();
    for p in parts {
        assert!(m.contains(p), "{m:?} does not say {p:?}");
    }
}

fn leaf(conn: &PeerConnection) -> Vec<u8> {
    let id = conn.quic().peer_identity().expect("a peer certificate");
    let chain = id
        .downcast::<Vec<quinn::rustls::pki_types::CertificateDer<'static>>>()
        .expect("an X.509 chain");
    chain[0].as_ref().to_vec()
}

#[tokio::test]
async fn a_parent_with_its_own_name_is_accepted_without_a_pin() {
    timeout(T, async {
        let pki = Pki::new();
        certs::issue(
            &pki.root.join("ca"),
            "edge-2",
            Role::Edge,
            &pki.root.join("nodes"),
        )
        .unwrap();
        let edge2 = || parent_server(&pki, "ca", "nodes", "edge-2", Role::Edge);
        let conn = device_connects(&pki, edge2(), ParentName::Any)
            .await
            .unwrap();
        assert_eq!(conn.peer_cert_role(), Some(Role::Edge));
        assert_eq!(conn.peer_hello().node_id, "edge-2");
        // Pinned to its own name: accepted too.
        device_connects(&pki, edge2(), "edge-2").await.unwrap();
        // Pinned to another name: refused, and the message says what to change.
        let err = device_connects(&pki, edge2(), "edge-1").await.unwrap_err();
        assert!(matches!(err, Error::Tls(_)), "{err}");
        assert_says(
            &err,
            &[
                "is for edge-2, not \"edge-1\" (--parent-name)",
                "leave --parent-name out",
            ],
        );
        // A pin that cannot be a certificate name is refused before dialling.
        let err = device_connects(&pki, edge2(), "not a name")
            .await
            .unwrap_err();
        assert_says(&err, &["not a DNS name"]);
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn a_device_certificate_cannot_serve_as_an_edge() {
    timeout(T, async {
        let pki = Pki::new();
        // dev-1's certificate, a Hello that claims edge: the certificate decides.
        let fake = parent_server(&pki, "ca", "nodes", "dev-1", Role::Edge);
        let err = device_connects(&pki, fake, ParentName::Any)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Role(_)), "{err}");
        assert_says(
            &err,
            &[
                "presented a device certificate (aiflow:role:device)",
                "an edge or cloud certificate is required",
                "`flow-node certs issue --role edge`",
            ],
        );
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn an_edge_cannot_present_the_cloud_role() {
    timeout(T, async {
        let pki = Pki::new();
        let fake_cloud = parent_server(&pki, "ca", "nodes", "edge-1", Role::Cloud);
        let (addr, _events, _ep) = spawn_server(fake_cloud).await;
        // An edge expects a cloud parent.
        let mut c = EndpointConfig::new(local(), pki.mtls("edge-1"), hello("edge-1", Role::Edge, 7));
        c.parent_roles = vec![Role::Cloud];
        let client = Endpoint::client(c).unwrap();
        let err = client.connect(addr, ParentName::Any).await.unwrap_err();
        assert!(matches!(err, Error::Role(_)), "{err}");
        assert_says(
            &err,
            &[
                &format!("parent {addr} presented an edge certificate (aiflow:role:edge)"),
                "a cloud certificate is required; issue one with `flow-node certs issue --role cloud`",
            ],
        );
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn a_parent_certificate_from_another_ca_is_refused() {
    timeout(T, async {
        let pki = Pki::new();
        certs::issue(
            &pki.root.join("other-ca"),
            "edge-x",
            Role::Edge,
            &pki.root.join("foreign"),
        )
        .unwrap();
        let foreign = || parent_server(&pki, "other-ca", "foreign", "edge-x", Role::Edge);
        for name in [ParentName::Any, "edge-x".into()] {
            let err = device_connects(&pki, foreign(), name).await.unwrap_err();
            assert!(matches!(err, Error::Tls(_)), "{err}");
            assert_says(
                &err,
                &[
                    "is not signed by this cluster's CA (unknown issuer)",
                    "was it issued with another `--ca` dir?",
                ],
            );
        }
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn an_expired_parent_certificate_is_refused() {
    timeout(T, async {
        let pki = Pki::new();
        let day = |d: u64| std::time::UNIX_EPOCH + Duration::from_secs(d * 86_400);
        // 2020-01-01 .. 2021-01-01
        let validity = certs::Validity {
            not_before: day(18_262),
            not_after: day(18_628),
        };
        certs::issue_with_validity(
            &pki.root.join("ca"),
            "edge-old",
            Role::Edge,
            &pki.root.join("nodes"),
            validity,
        )
        .unwrap();
        let old = parent_server(&pki, "ca", "nodes", "edge-old", Role::Edge);
        let err = device_connects(&pki, old, ParentName::Any)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Tls(_)), "{err}");
        assert_says(
            &err,
            &[
                "(edge-old) expired on 2021-01-01 UTC",
                "reissue it with `flow-node certs issue`",
            ],
        );
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn a_reissued_certificate_is_used_without_a_restart() {
    timeout(T, async {
        let pki = Pki::new();
        let ep = Arc::new(Endpoint::server(edge_server(&pki)).unwrap());
        let addr = ep.local_addr().unwrap();
        let (tx, mut client_leaves) = mpsc::channel(4);
        let server = ep.clone();
        tokio::spawn(async move {
            while let Some(Ok(conn)) = server.accept().await {
                let _ = tx.send(leaf(&conn)).await;
                tokio::spawn(serve(Arc::new(conn)));
            }
        });
        let client = Endpoint::client(device_client(&pki)).unwrap();
        let before = client.connect(addr, ParentName::Any).await.unwrap();
        let client_before = client_leaves.recv().await.unwrap();
        // `flow-node certs issue` again for both nodes, into the same directories.
        for (name, role) in [("edge-1", Role::Edge), ("dev-1", Role::Device)] {
            certs::issue(&pki.root.join("ca"), name, role, &pki.root.join("nodes")).unwrap();
        }
        let after = client.connect(addr, "edge-1").await.unwrap();
        assert_ne!(
            leaf(&after),
            leaf(&before),
            "the parent presents its new certificate"
        );
        assert_ne!(
            client_leaves.recv().await.unwrap(),
            client_before,
            "and the child its new one"
        );
        // The connection made before the rotation is still up.
        let mut s = before.open_session().await.unwrap();
        let m = cont(1, 1, 4, Encoding::F32);
        s.send(&m).await.unwrap();
        assert_eq!(s.recv().await.unwrap(), Some(m));
    })
    .await
    .expect("test timed out");
}
