//! QUIC transport: quinn 0.11 + rustls 0.23 (ring provider only), TLS 1.3, ALPN `aiflow/1`.
//!
//! The only module of the crate that uses tokio. It drives the sans-IO [`Codec`] over
//! QUIC streams:
//!
//! - [`Endpoint::server`] / [`Endpoint::client`] build an endpoint from an
//!   [`EndpointConfig`] ([`Security::Mtls`] against a cluster CA, or
//!   [`Security::InsecureLoopback`] for one-machine runs, which refuses non-loopback
//!   addresses).
//! - [`Endpoint::connect`] and [`Endpoint::accept`] return a [`PeerConnection`] after the
//!   `Hello` exchange on the control stream (the first bidirectional stream, opened by the
//!   client). A parent is accepted when its certificate chains to the cluster CA, is within
//!   its validity period and carries one of `parent_roles` ([`verify`]); its DNS name is
//!   checked only when pinned ([`ParentName::Pinned`], `--parent-name`). A child's
//!   certificate must chain to the CA and carry one of `accept_roles`. Both sides check
//!   that the peer's `Hello.role` is the role in its certificate ([`certs::role_of`]), and
//!   the protocol version and model fingerprint ([`crate::handshake::negotiate`]). A
//!   refusal is an `Error` frame naming what did not match, then the connection closes.
//! - This node's certificate and key are re-read when their files change (time, size or
//!   inode; checked before each handshake): `flow-node certs issue` into the same
//!   directory rotates them without a restart. A pair that does not load keeps the previous
//!   one in use. The CA file is read once.
//! - [`PeerConnection::open_session`] / [`PeerConnection::accept_session`]: one
//!   bidirectional stream per request session ([`SessionStream::send`] /
//!   [`SessionStream::recv`]). Streams have independent flow control, so a stuck session
//!   never blocks the others. At most `Limits::max_sessions_per_peer` sessions are accepted
//!   per connection; extra streams get an `Error` frame (`TooManySessions`) and are closed
//!   while the connection stays up. A frame that breaks the receiver's [`Limits`] ends only
//!   its session, with an `Error` frame to the sender.
//! - [`PeerConnection::stats`]: RTT, congestion window, bytes, losses ([`ConnStats`]).

pub mod certs;
mod close;
mod identity;
pub mod stats;
pub mod verify;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, VarInt};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

use close::{conn_err, read_err, write_err};
use identity::NodeIdentity;
use verify::{Diagnosis, ParentVerifier};

use crate::codec::{Codec, FrameDecoder};
use crate::error::{Error, Result};
use crate::handshake::negotiate;
use crate::limits::Limits;
use crate::message::{ErrorCode, Hello, Message, Role};
/// The quinn version this transport is built on (for benchmarks comparing against raw quinn).
pub use quinn;
pub use stats::ConnStats;
pub use verify::ParentName;

/// ALPN protocol id.
pub const ALPN: &[u8] = b"aiflow/1";

/// QUIC application close code used when a peer is refused during the Hello exchange.
pub const CLOSE_REFUSED: u32 = 1;
/// QUIC application close code for an orderly shutdown.
pub const CLOSE_NORMAL: u32 = 0;
/// Stream stop/reset code used after a protocol violation on a session stream.
pub const STREAM_PROTOCOL_ERROR: u32 = 2;

/// How this endpoint authenticates.
#[derive(Debug, Clone)]
pub enum Security {
    /// Mutual TLS against a cluster CA (files from `flow-node certs init/issue`).
    Mtls {
        /// CA certificate (`ca.pem`).
        ca: PathBuf,
        /// This node's certificate (`NODE.pem`).
        cert: PathBuf,
        /// This node's key (`NODE.key`).
        key: PathBuf,
    },
    /// Client only: verify the server against the CA but present no certificate. Useful to
    /// check that servers refuse such clients; real nodes use [`Security::Mtls`].
    ServerAuthOnly {
        /// CA certificate.
        ca: PathBuf,
    },
    /// `--insecure-loopback`: TLS with a throwaway self-signed certificate, no client
    /// authentication, no certificate role checks. Every bind, connect and accept address
    /// must be loopback, otherwise [`Error::NotLoopback`].
    InsecureLoopback,
}

/// Everything an [`Endpoint`] needs. Build with [`EndpointConfig::new`] and adjust fields.
#[derive(Debug, Clone)]
pub struct EndpointConfig {
    /// Local address to bind (`127.0.0.1:0` for an ephemeral port).
    pub bind: SocketAddr,
    /// Authentication mode.
    pub security: Security,
    /// Our `Hello`.
    pub hello: Hello,
    /// Limits and compression for frames on this endpoint.
    pub codec: Codec,
    /// Roles accepted from clients that connect to us (empty = any). Default: the children
    /// of our role ([`Role::default_children`]).
    pub accept_roles: Vec<Role>,
    /// Roles accepted from servers we connect to (empty = any).
    pub parent_roles: Vec<Role>,
    /// QUIC keep-alive interval (keeps NAT bindings and detects dead peers).
    pub keep_alive: Duration,
    /// Connection closes after this long without packets.
    pub idle_timeout: Duration,
    /// Time allowed for TLS + Hello exchange.
    pub handshake_timeout: Duration,
    /// Per-stream receive window (bytes a session may have in flight unread).
    pub stream_receive_window: u32,
    /// Per-connection receive window (all sessions together).
    pub connection_receive_window: u32,
    /// Per-connection send buffer.
    pub send_window: u64,
}

impl EndpointConfig {
    /// Defaults: keep-alive 5 s, idle timeout 30 s, handshake 10 s, 16 MiB stream window,
    /// 256 MiB connection window (so one stuck stream cannot exhaust it), 64 MiB send window.
    pub fn new(bind: SocketAddr, security: Security, hello: Hello) -> Self {
        EndpointConfig {
            bind,
            security,
            accept_roles: hello.role.default_children().to_vec(),
            parent_roles: Vec::new(),
            hello,
            codec: Codec::new(Limits::default()),
            keep_alive: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(30),
            handshake_timeout: Duration::from_secs(10),
            stream_receive_window: 16 << 20,
            connection_receive_window: 256 << 20,
            send_window: 64 << 20,
        }
    }

    /// The quinn server configuration this endpoint uses (TLS + transport settings), for
    /// baselines such as raw-quinn benchmarks.
    pub fn quinn_server_config(&self) -> Result<quinn::ServerConfig> {
        self.server_config(&ClientTls::new(&self.security)?, self.transport()?)
    }

    fn server_config(
        &self,
        tls: &ClientTls,
        transport: Arc<quinn::TransportConfig>,
    ) -> Result<quinn::ServerConfig> {
        let crypto = QuicServerConfig::try_from(server_crypto(&self.security, tls)?)
            .map_err(|e| Error::Tls(e.to_string()))?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        server.transport_config(transport);
        Ok(server)
    }

    /// The quinn client configuration this endpoint uses by default: the server's name is
    /// checked (pinned) and its role is not (`Endpoint::connect` checks roles and makes the
    /// name optional).
    pub fn quinn_client_config(&self) -> Result<quinn::ClientConfig> {
        let tls = ClientTls::new(&self.security)?;
        let (config, _) = tls.quinn_config(self.transport()?, &ParentCheck::default())?;
        Ok(config)
    }

    fn transport(&self) -> Result<Arc<quinn::TransportConfig>> {
        let mut t = quinn::TransportConfig::default();
        t.keep_alive_interval(Some(self.keep_alive));
        t.max_idle_timeout(Some(
            IdleTimeout::try_from(self.idle_timeout)
                .map_err(|e| Error::invalid("idle_timeout", e.to_string()))?,
        ));
        t.stream_receive_window(VarInt::from_u32(self.stream_receive_window));
        t.receive_window(VarInt::from_u32(self.connection_receive_window));
        t.send_window(self.send_window);
        // Room for the control stream and for over-limit streams, which get an Error frame.
        let bidi = self.codec.limits.max_sessions_per_peer.saturating_add(9);
        t.max_concurrent_bidi_streams(VarInt::from_u32(u32::try_from(bidi).unwrap_or(u32::MAX)));
        t.max_concurrent_uni_streams(VarInt::from_u32(0));
        Ok(Arc::new(t))
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls_err(what: &'static str) -> impl Fn(rustls::Error) -> Error {
    move |e| Error::Tls(format!("{what}: {e}"))
}

fn roots(ca: &std::path::Path) -> Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for c in certs::load_certs(ca)? {
        roots.add(c).map_err(tls_err("CA certificate"))?;
    }
    Ok(roots)
}

fn self_signed() -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])
        .map_err(|e| Error::Tls(format!("self-signed certificate: {e}")))?;
    let key = PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into());
    Ok((vec![ck.cert.der().clone()], key))
}

/// This node's TLS material, loaded once per endpoint: the CA roots (`None` in
/// insecure-loopback mode) and the certificate and key ([`NodeIdentity`], re-read when the
/// files change; `None` when this node presents none).
#[derive(Debug)]
struct ClientTls {
    provider: Arc<rustls::crypto::CryptoProvider>,
    roots: Option<Arc<RootCertStore>>,
    identity: Option<Arc<NodeIdentity>>,
}

/// How one outgoing connection checks its server.
#[derive(Debug, Default)]
struct ParentCheck {
    /// `None`: the name rustls is given is checked; `Some(Any)`: no name check.
    name: Option<ParentName>,
    /// Accepted roles (empty = any).
    roles: Vec<Role>,
    /// For messages.
    addr: Option<SocketAddr>,
}

impl ClientTls {
    fn new(security: &Security) -> Result<Self> {
        let provider = provider();
        let (roots, identity) = match security {
            Security::Mtls { ca, cert, key } => (
                Some(Arc::new(roots(ca)?)),
                Some(Arc::new(NodeIdentity::load(cert, key, provider.clone())?)),
            ),
            Security::ServerAuthOnly { ca } => (Some(Arc::new(roots(ca)?)), None),
            Security::InsecureLoopback => (None, None),
        };
        Ok(ClientTls {
            provider,
            roots,
            identity,
        })
    }

    /// A quinn client configuration for `check`, and where its verifier explains a refusal
    /// (`None` in insecure-loopback mode).
    fn quinn_config(
        &self,
        transport: Arc<quinn::TransportConfig>,
        check: &ParentCheck,
    ) -> Result<(quinn::ClientConfig, Option<Diagnosis>)> {
        let builder = rustls::ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls_err("TLS versions"))?;
        let (builder, diagnosis) = match &self.roots {
            Some(roots) => {
                let verifier = ParentVerifier::new(
                    roots.clone(),
                    self.provider.clone(),
                    !matches!(check.name, Some(ParentName::Any)),
                    check.roles.clone(),
                    check.addr,
                )?;
                let diagnosis = verifier.diagnosis();
                let builder = builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(verifier));
                (builder, Some(diagnosis))
            }
            None => (
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(AcceptAnyServer(
                        self.provider.clone(),
                    ))),
                None,
            ),
        };
        let mut cfg = match &self.identity {
            Some(id) => builder.with_client_cert_resolver(id.clone()),
            None => builder.with_no_client_auth(),
        };
        cfg.alpn_protocols = vec![ALPN.to_vec()];
        let crypto = QuicClientConfig::try_from(cfg).map_err(|e| Error::Tls(e.to_string()))?;
        let mut c = quinn::ClientConfig::new(Arc::new(crypto));
        c.transport_config(transport);
        Ok((c, diagnosis))
    }
}

fn server_crypto(security: &Security, tls: &ClientTls) -> Result<rustls::ServerConfig> {
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err("TLS versions"))?;
    let mut cfg = match (security, &tls.roots, &tls.identity) {
        (Security::Mtls { .. }, Some(roots), Some(identity)) => {
            let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
                .build()
                .map_err(|e| Error::Tls(format!("client verifier: {e}")))?;
            builder
                .with_client_cert_verifier(verifier)
                .with_cert_resolver(identity.clone())
        }
        (Security::InsecureLoopback, _, _) => {
            let (chain, key) = self_signed()?;
            builder
                .with_no_client_auth()
                .with_single_cert(chain, key)
                .map_err(tls_err("self-signed"))?
        }
        _ => {
            return Err(Error::invalid(
                "security",
                "ServerAuthOnly is for clients; a server needs Mtls",
            ))
        }
    };
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    Ok(cfg)
}

/// Insecure-loopback only: accepts any server certificate but still checks handshake
/// signatures (so the TLS session is at least bound to the presented key).
#[derive(Debug)]
struct AcceptAnyServer(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A QUIC endpoint that speaks the aiflow protocol. One endpoint can both accept (as a
/// parent) and connect (as a child), e.g. an edge node.
#[derive(Debug)]
pub struct Endpoint {
    inner: quinn::Endpoint,
    cfg: Arc<EndpointConfig>,
    tls: Arc<ClientTls>,
    transport: Arc<quinn::TransportConfig>,
}

impl Endpoint {
    fn check_loopback(cfg: &EndpointConfig, addr: SocketAddr) -> Result<()> {
        if matches!(cfg.security, Security::InsecureLoopback) && !addr.ip().is_loopback() {
            return Err(Error::NotLoopback(addr));
        }
        Ok(())
    }

    /// Bind a server (that can also connect out) on `cfg.bind`.
    pub fn server(cfg: EndpointConfig) -> Result<Self> {
        Self::check_loopback(&cfg, cfg.bind)?;
        let tls = Arc::new(ClientTls::new(&cfg.security)?);
        let transport = cfg.transport()?;
        let inner = quinn::Endpoint::server(cfg.server_config(&tls, transport.clone())?, cfg.bind)?;
        Ok(Endpoint {
            inner,
            cfg: Arc::new(cfg),
            tls,
            transport,
        })
    }

    /// Bind a client-only endpoint on `cfg.bind`.
    pub fn client(cfg: EndpointConfig) -> Result<Self> {
        Self::check_loopback(&cfg, cfg.bind)?;
        let tls = Arc::new(ClientTls::new(&cfg.security)?);
        let transport = cfg.transport()?;
        let inner = quinn::Endpoint::client(cfg.bind)?;
        Ok(Endpoint {
            inner,
            cfg: Arc::new(cfg),
            tls,
            transport,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.inner.local_addr()?)
    }

    /// The configuration.
    pub fn config(&self) -> &EndpointConfig {
        &self.cfg
    }

    /// Connect to a parent at `addr`, then exchange `Hello`s. Under mTLS the parent's
    /// certificate must chain to the cluster CA, be within its validity period and carry
    /// one of `parent_roles`; its DNS name must be `name` when pinned
    /// ([`ParentName::Pinned`], e.g. `connect(addr, "edge-1")`) and is not checked for
    /// [`ParentName::Any`]. Errors say why a refusal happened and what to fix (TLS, role,
    /// version, model).
    pub async fn connect(
        &self,
        addr: SocketAddr,
        name: impl Into<ParentName>,
    ) -> Result<PeerConnection> {
        let name = name.into();
        let cfg = self.cfg.clone();
        Self::check_loopback(&cfg, addr)?;
        // Unpinned: the address as the server name, so no SNI is sent and the verifier
        // skips the name.
        let server_name = match &name {
            ParentName::Pinned(n) => {
                ServerName::try_from(n.as_str()).map_err(|_| {
                    Error::invalid(
                        "parent name",
                        format!("{n:?} is not a DNS name (it must be the name in the parent's certificate, e.g. edge-1)"),
                    )
                })?;
                n.clone()
            }
            ParentName::Any => addr.ip().to_string(),
        };
        let check = ParentCheck {
            name: Some(name),
            roles: cfg.parent_roles.clone(),
            addr: Some(addr),
        };
        let (client_config, diagnosis) = self.tls.quinn_config(self.transport.clone(), &check)?;
        let fut = async {
            let connecting = self
                .inner
                .connect_with(client_config, addr, &server_name)
                .map_err(|e| Error::Quic(e.to_string()))?;
            let conn = match connecting.await {
                Ok(c) => c,
                Err(e) => {
                    let explained = diagnosis
                        .as_ref()
                        .and_then(|d| d.lock().unwrap_or_else(|p| p.into_inner()).take());
                    return Err(explained.unwrap_or_else(|| conn_err(e)));
                }
            };
            let cert_role = peer_cert_role(&conn, &cfg.security)?;
            let (send, recv) = conn.open_bi().await.map_err(conn_err)?;
            let mut control = SessionStream::new(send, recv, cfg.codec, None);
            control.send(&Message::Hello(cfg.hello.clone())).await?;
            let reply = control.recv().await?;
            let peer = match reply {
                Some(Message::Hello(h)) => h,
                Some(Message::Error(e)) => {
                    return Err(Error::Refused {
                        code: e.code,
                        message: e.message,
                    });
                }
                Some(other) => {
                    return Err(Error::malformed(
                        "hello",
                        format!("expected Hello, got {}", other.name()),
                    ));
                }
                None => {
                    return Err(Error::Closed(
                        "server closed the control stream before Hello".into(),
                    ))
                }
            };
            let version = match check_peer(&cfg, &peer, cert_role, &cfg.parent_roles) {
                Ok(v) => v,
                Err(e) => {
                    let _ = control
                        .send(&Message::error(e.code(), e.to_string(), None))
                        .await;
                    conn.close(VarInt::from_u32(CLOSE_REFUSED), e.to_string().as_bytes());
                    return Err(e);
                }
            };
            Ok(PeerConnection::new(
                conn, peer, cert_role, version, cfg.codec, control,
            ))
        };
        tokio::time::timeout(cfg.handshake_timeout, fut)
            .await
            .map_err(|_| Error::Timeout("connect + Hello"))?
    }

    /// Wait for the next incoming connection; complete it with [`Incoming::establish`]
    /// (typically in its own task so a slow client does not delay others).
    /// `None` when the endpoint is closed.
    pub async fn accept_incoming(&self) -> Option<Incoming> {
        self.inner.accept().await.map(|inner| Incoming {
            inner,
            cfg: self.cfg.clone(),
        })
    }

    /// Accept the next connection and run the Hello exchange. `None` when the endpoint is
    /// closed; `Some(Err)` for a refused or failed peer (keep calling).
    pub async fn accept(&self) -> Option<Result<PeerConnection>> {
        let incoming = self.accept_incoming().await?;
        Some(incoming.establish().await)
    }

    /// Close all connections and stop accepting.
    pub fn close(&self) {
        self.inner
            .close(VarInt::from_u32(CLOSE_NORMAL), b"endpoint closed");
    }

    /// Wait until all connections are closed and their packets flushed.
    pub async fn wait_idle(&self) {
        self.inner.wait_idle().await;
    }
}

/// An incoming connection not yet authenticated at the protocol level.
#[derive(Debug)]
pub struct Incoming {
    inner: quinn::Incoming,
    cfg: Arc<EndpointConfig>,
}

impl Incoming {
    /// The client's address.
    pub fn remote_address(&self) -> SocketAddr {
        self.inner.remote_address()
    }

    /// Finish TLS, check the client's certificate role, and exchange `Hello`s.
    pub async fn establish(self) -> Result<PeerConnection> {
        let cfg = self.cfg;
        let remote = self.inner.remote_address();
        if let Err(e) = Endpoint::check_loopback(&cfg, remote) {
            self.inner.refuse();
            return Err(e);
        }
        let inner = self.inner;
        let fut = async {
            let conn = inner.await.map_err(conn_err)?;
            let (send, recv) = conn.accept_bi().await.map_err(conn_err)?;
            let mut control = SessionStream::new(send, recv, cfg.codec, None);
            let checked: Result<(Hello, Option<Role>, u16)> = async {
                let cert_role = peer_cert_role(&conn, &cfg.security)?;
                let peer = match control.recv().await? {
                    Some(Message::Hello(h)) => h,
                    Some(other) => {
                        return Err(Error::malformed(
                            "hello",
                            format!("expected Hello, got {}", other.name()),
                        ))
                    }
                    None => {
                        return Err(Error::Closed(
                            "client closed the control stream before Hello".into(),
                        ))
                    }
                };
                let v = check_peer(&cfg, &peer, cert_role, &cfg.accept_roles)?;
                Ok((peer, cert_role, v))
            }
            .await;
            match checked {
                Ok((peer, cert_role, version)) => {
                    control.send(&Message::Hello(cfg.hello.clone())).await?;
                    Ok(PeerConnection::new(
                        conn, peer, cert_role, version, cfg.codec, control,
                    ))
                }
                Err(e) => {
                    let _ = control
                        .send(&Message::error(e.code(), e.to_string(), None))
                        .await;
                    let _ = control.finish();
                    // Give the Error frame a moment to arrive before closing.
                    let _ = tokio::time::timeout(Duration::from_millis(500), conn.closed()).await;
                    conn.close(VarInt::from_u32(CLOSE_REFUSED), e.to_string().as_bytes());
                    Err(e)
                }
            }
        };
        tokio::time::timeout(cfg.handshake_timeout, fut)
            .await
            .map_err(|_| Error::Timeout("accept + Hello"))?
    }
}

/// Role from the peer's certificate under mTLS (`None` in insecure-loopback mode).
fn peer_cert_role(conn: &quinn::Connection, security: &Security) -> Result<Option<Role>> {
    if matches!(security, Security::InsecureLoopback) {
        return Ok(None);
    }
    let identity = conn
        .peer_identity()
        .ok_or_else(|| Error::Role("peer presented no certificate".into()))?;
    let chain = identity
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| Error::Role("peer identity is not an X.509 chain".into()))?;
    let leaf = chain
        .first()
        .ok_or_else(|| Error::Role("peer presented an empty certificate chain".into()))?;
    certs::role_of(leaf).map(Some)
}

/// Role checks (certificate role allowed, Hello role = certificate role) + negotiation.
fn check_peer(
    cfg: &EndpointConfig,
    peer: &Hello,
    cert_role: Option<Role>,
    allowed: &[Role],
) -> Result<u16> {
    if let Some(role) = cert_role {
        if !allowed.is_empty() && !allowed.contains(&role) {
            return Err(Error::Refused {
                code: ErrorCode::RoleMismatch,
                message: format!(
                    "{} ({}) accepts {:?} peers, but {}'s certificate is for role {role}",
                    cfg.hello.node_id, cfg.hello.role, allowed, peer.node_id
                ),
            });
        }
        if peer.role != role {
            return Err(Error::Refused {
                code: ErrorCode::RoleMismatch,
                message: format!(
                    "{} claims role {} in Hello but its certificate is for role {role}",
                    peer.node_id, peer.role
                ),
            });
        }
    }
    negotiate(&cfg.hello, peer, allowed)
}

/// Counts sessions on one connection; a permit is held by each accepted [`SessionStream`].
#[derive(Debug)]
struct SessionPermit(Arc<AtomicUsize>);

impl Drop for SessionPermit {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn try_permit(count: &Arc<AtomicUsize>, max: usize) -> Option<SessionPermit> {
    count
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            if n < max {
                Some(n + 1)
            } else {
                None
            }
        })
        .ok()
        .map(|_| SessionPermit(count.clone()))
}

/// An authenticated, negotiated connection to one peer.
#[derive(Debug)]
pub struct PeerConnection {
    conn: quinn::Connection,
    peer: Hello,
    cert_role: Option<Role>,
    version: u16,
    codec: Codec,
    control: Mutex<Option<SessionStream>>,
    sessions: Arc<AtomicUsize>,
    /// Sessions refused for going over `Limits::max_sessions_per_peer`.
    refused: AtomicU64,
}

impl PeerConnection {
    fn new(
        conn: quinn::Connection,
        peer: Hello,
        cert_role: Option<Role>,
        version: u16,
        codec: Codec,
        control: SessionStream,
    ) -> Self {
        PeerConnection {
            conn,
            peer,
            cert_role,
            version,
            codec,
            control: Mutex::new(Some(control)),
            sessions: Arc::new(AtomicUsize::new(0)),
            refused: AtomicU64::new(0),
        }
    }

    /// The peer's `Hello`.
    pub fn peer_hello(&self) -> &Hello {
        &self.peer
    }

    /// The role in the peer's certificate (`None` in insecure-loopback mode).
    pub fn peer_cert_role(&self) -> Option<Role> {
        self.cert_role
    }

    /// Negotiated protocol version.
    pub fn version(&self) -> u16 {
        self.version
    }

    /// The peer's address.
    pub fn remote_address(&self) -> SocketAddr {
        self.conn.remote_address()
    }

    /// Take the control stream (Hello already done) to drive heartbeats and probes.
    /// Returns `None` after the first call.
    pub fn take_control(&self) -> Option<SessionStream> {
        self.control.lock().ok().and_then(|mut c| c.take())
    }

    /// Open a new request session (a bidirectional stream). The peer sees it when the
    /// first frame is sent.
    pub async fn open_session(&self) -> Result<SessionStream> {
        let (send, recv) = self.conn.open_bi().await.map_err(conn_err)?;
        Ok(SessionStream::new(send, recv, self.codec, None))
    }

    /// Accept the next session the peer opened. Sessions beyond
    /// `Limits::max_sessions_per_peer` are answered with an `Error` frame
    /// (`TooManySessions`) and closed without blocking; this call keeps waiting for one
    /// that fits. Errors when the connection ends.
    pub async fn accept_session(&self) -> Result<SessionStream> {
        let max = self.codec.limits.max_sessions_per_peer;
        loop {
            let (send, recv) = self.conn.accept_bi().await.map_err(conn_err)?;
            if let Some(permit) = try_permit(&self.sessions, max) {
                return Ok(SessionStream::new(send, recv, self.codec, Some(permit)));
            }
            self.refused.fetch_add(1, Ordering::Relaxed);
            let mut extra = SessionStream::new(send, recv, self.codec, None);
            let err = Error::LimitExceeded {
                field: "sessions",
                got: max as u64 + 1,
                limit: max as u64,
            };
            tokio::spawn(async move {
                extra.reject(&err).await;
            });
        }
    }

    /// Sessions currently accepted and not yet dropped.
    pub fn active_sessions(&self) -> usize {
        self.sessions.load(Ordering::Acquire)
    }

    /// Sessions refused so far on this connection for going over the per-peer limit.
    pub fn refused_sessions(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// The per-peer session limit ([`Limits::max_sessions_per_peer`]).
    pub fn session_limit(&self) -> usize {
        self.codec.limits.max_sessions_per_peer
    }

    /// RTT, congestion window, bytes and losses of this connection.
    pub fn stats(&self) -> ConnStats {
        let mut s = ConnStats::from(&self.conn.stats());
        s.rtt = self.conn.rtt();
        s
    }

    /// Close the connection with a reason.
    pub fn close(&self, reason: &str) {
        self.conn
            .close(VarInt::from_u32(CLOSE_NORMAL), reason.as_bytes());
    }

    /// Wait until the connection is closed; returns why.
    pub async fn closed(&self) -> Error {
        conn_err(self.conn.closed().await)
    }

    /// The underlying quinn connection (escape hatch).
    pub fn quic(&self) -> &quinn::Connection {
        &self.conn
    }
}

/// Read chunk size for session streams.
const READ_CHUNK: usize = 256 << 10;

/// One bidirectional stream carrying frames: a request session or the control stream.
#[derive(Debug)]
pub struct SessionStream {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    decoder: FrameDecoder,
    codec: Codec,
    _permit: Option<SessionPermit>,
}

impl SessionStream {
    fn new(
        send: quinn::SendStream,
        recv: quinn::RecvStream,
        codec: Codec,
        permit: Option<SessionPermit>,
    ) -> Self {
        SessionStream {
            send,
            recv,
            decoder: codec.decoder(),
            codec,
            _permit: permit,
        }
    }

    /// QUIC stream id (for logs).
    pub fn id(&self) -> u64 {
        self.send.id().index()
    }

    /// Encode and send one message (tensor bytes are written without copying).
    pub async fn send(&mut self, msg: &Message) -> Result<()> {
        let mut chunks = self.codec.encode_chunks(msg)?;
        self.send
            .write_all_chunks(&mut chunks)
            .await
            .map_err(write_err)
    }

    /// Send pre-encoded bytes as they are (tests and benchmarks; no validation).
    pub async fn send_raw(&mut self, bytes: Bytes) -> Result<()> {
        self.send.write_chunk(bytes).await.map_err(write_err)
    }

    /// Receive the next message; `Ok(None)` when the peer finished the stream cleanly.
    ///
    /// A frame that breaks our [`Limits`] (or does not parse) ends this session: the peer
    /// gets an `Error` frame naming the problem, the stream is closed, and the error is
    /// returned. The connection and other sessions are unaffected.
    pub async fn recv(&mut self) -> Result<Option<Message>> {
        loop {
            match self.decoder.next_message() {
                Ok(Some(m)) => return Ok(Some(m)),
                Ok(None) => {}
                Err(e) => {
                    self.reject(&e).await;
                    return Err(e);
                }
            }
            match self.recv.read_chunk(READ_CHUNK, true).await {
                Ok(Some(chunk)) => self.decoder.push(&chunk.bytes),
                Ok(None) => {
                    return if self.decoder.buffered() == 0 {
                        Ok(None)
                    } else {
                        Err(Error::malformed(
                            "stream",
                            format!(
                                "ended inside a frame ({} bytes short)",
                                self.decoder.needed()
                            ),
                        ))
                    };
                }
                Err(e) => return Err(read_err(e)),
            }
        }
    }

    /// Send an `Error` frame for `err`, finish our side and stop reading.
    async fn reject(&mut self, err: &Error) {
        let msg = Message::error(err.code(), err.to_string(), None);
        if let Ok(mut chunks) = self.codec.encode_chunks(&msg) {
            let _ = self.send.write_all_chunks(&mut chunks).await;
        }
        let _ = self.send.finish();
        let _ = self.recv.stop(VarInt::from_u32(STREAM_PROTOCOL_ERROR));
    }

    /// Finish our sending side (the peer's `recv` returns `Ok(None)` after the last frame).
    pub fn finish(&mut self) -> Result<()> {
        self.send.finish().map_err(|e| Error::Quic(e.to_string()))
    }

    /// Wait until the peer has received everything we sent and the stream is finished or
    /// stopped.
    pub async fn stopped(&mut self) -> Result<()> {
        self.send
            .stopped()
            .await
            .map(|_| ())
            .map_err(|e| Error::Quic(e.to_string()))
    }
}
