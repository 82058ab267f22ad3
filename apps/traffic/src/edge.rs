//! Camera → edge over the real aiflow protocol (QUIC, flow-protocol sessions).
//!
//! Each camera is a device tier: it runs the vision family's embedding and blocks up to the
//! device exit ([`VisionFamily::device`]). A frame whose device-exit confidence is below the
//! threshold escalates: the camera ships the frame's hidden state (class token + patch
//! tokens, `[tokens, dim]`, lossless f32) as a [`Continue`] over a QUIC session (one per
//! approach, opened with an [`Open`] naming block `exits[0]` and the session's request id)
//! to the [`EdgeService`], which runs the remaining blocks and answers with a
//! [`Classification`] (emergency-vehicle probability and congestion index from the edge
//! exit). Both ends authenticate as the LM agents do: mutual TLS against the cluster CA
//! (`flow-node certs`), or `--insecure-loopback` for one-machine runs, and the `Hello`
//! exchange checks that both load the same vision family (digest of its weights).
//!
//! Entry points: [`EdgeService::start`] (the edge, a tokio task set on the caller's runtime)
//! and [`RemoteDetector::connect`] (the cameras' side, a [`Detector`] for [`crate::sumo::run`]
//! that drives its async link with `Handle::block_on`, so call it from outside the runtime).
//!
//! The edge checks every `Continue` before it touches the model: the session's `Open` must
//! have come and name the family's device exit, the hidden state be `[patches + 1, dim]`
//! with positions `0..patches+1`, and every value finite. Anything else gets an `Error` frame (`Malformed`) naming what was
//! wrong and what was expected; the session ends, the connection and the service stay up.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use candle_core::{Device, Tensor};
use flow_protocol::transport::{Endpoint, EndpointConfig, PeerConnection, Security, SessionStream};
use flow_protocol::{
    Capacity, Classification, Codec, Continue, Encoding, ErrorCode, Hello, HostedLayers, Message,
    ModelFingerprint, Open, Role, Sampling, WireTensor, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
};
use tokio::runtime::Handle;

use crate::controller::Approach;
use crate::render::Frame;
use crate::sumo::{Detection, Detector};
use crate::vision::VisionFamily;
use crate::{Error, Result};

/// Family name in the `Hello` of both ends.
pub const FAMILY: &str = "flow-traffic-vision";
/// How long a camera waits for the edge's answer to one frame.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(20);

impl From<flow_protocol::Error> for Error {
    fn from(e: flow_protocol::Error) -> Self {
        Error::Link(e.to_string())
    }
}

fn hello(node_id: &str, role: Role, model: &VisionFamily, digest: [u8; 32]) -> Hello {
    let (start, end) = match role {
        Role::Device => (0, model.cfg.exits[0]),
        _ => (model.cfg.exits[0], model.cfg.layers),
    };
    Hello {
        node_id: node_id.into(),
        role,
        protocol_version: PROTOCOL_VERSION,
        min_protocol_version: MIN_PROTOCOL_VERSION,
        model: ModelFingerprint {
            family: FAMILY.into(),
            digest,
        },
        hosted: vec![HostedLayers {
            start: start as u32,
            end: end as u32,
            digest,
        }],
        capacity: Capacity::default(),
    }
}

/// The edge: accepts camera connections and classifies escalated frames.
#[derive(Debug)]
pub struct EdgeService {
    endpoint: Arc<Endpoint>,
    addr: SocketAddr,
}

impl EdgeService {
    /// Bind `bind` (e.g. `127.0.0.1:0`) and serve `model`'s edge part until [`close`](Self::close)
    /// or the runtime ends. Must be called inside a tokio runtime.
    pub async fn start(
        model: Arc<VisionFamily>,
        security: Security,
        bind: SocketAddr,
        node_id: &str,
    ) -> Result<EdgeService> {
        let digest = model.digest()?;
        let cfg = EndpointConfig::new(bind, security, hello(node_id, Role::Edge, &model, digest));
        let endpoint = Arc::new(Endpoint::server(cfg)?);
        let addr = endpoint.local_addr()?;
        let ep = endpoint.clone();
        tokio::spawn(async move {
            while let Some(conn) = ep.accept().await {
                match conn {
                    Ok(conn) => {
                        tokio::spawn(serve_connection(conn, model.clone()));
                    }
                    Err(e) => tracing::warn!(error = %e, "refused a camera"),
                }
            }
        });
        tracing::info!(%addr, "traffic edge listening");
        Ok(EdgeService { endpoint, addr })
    }

    /// The address cameras connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stop accepting and close every connection.
    pub fn close(&self) {
        self.endpoint.close();
    }
}

async fn serve_connection(conn: PeerConnection, model: Arc<VisionFamily>) {
    let peer = conn.peer_hello().node_id.clone();
    loop {
        match conn.accept_session().await {
            Ok(s) => {
                tokio::spawn(serve_session(s, model.clone(), peer.clone()));
            }
            Err(e) => {
                tracing::debug!(peer, error = %e, "camera connection ended");
                return;
            }
        }
    }
}

async fn serve_session(mut s: SessionStream, model: Arc<VisionFamily>, peer: String) {
    let mut open: Option<Open> = None;
    loop {
        let msg = match s.recv().await {
            Ok(Some(m)) => m,
            Ok(None) => return,
            Err(e @ (flow_protocol::Error::Quic(_) | flow_protocol::Error::Closed(_))) => {
                // The camera went away (end of a run, or its connection dropped).
                tracing::debug!(peer, error = %e, "camera session closed");
                return;
            }
            Err(e) => {
                tracing::warn!(peer, error = %e, "camera session failed");
                return;
            }
        };
        let reply = match msg {
            // The session's first message: no answer.
            Message::Open(o) if open.is_none() => {
                open = Some(o);
                continue;
            }
            Message::Open(_) => Message::error(
                ErrorCode::Unexpected,
                "a second Open on this session: one Open starts a session",
                None,
            ),
            Message::Continue(c) => match open.clone() {
                None => Message::error(
                    ErrorCode::Unexpected,
                    "a Continue before the session's Open (naming the layer and request)",
                    None,
                ),
                Some(o) => {
                    let m = model.clone();
                    let request_id = o.request_id;
                    match tokio::task::spawn_blocking(move || classify(&m, &o, &c)).await {
                        Ok(Ok(r)) => Message::Classification(r),
                        Ok(Err(e)) => Message::error(ErrorCode::Malformed, e, Some(request_id)),
                        Err(e) => {
                            Message::error(ErrorCode::Internal, e.to_string(), Some(request_id))
                        }
                    }
                }
            },
            other => Message::error(
                ErrorCode::Unexpected,
                format!(
                    "the traffic edge takes Continue frames (hidden states), not {}",
                    other.name()
                ),
                None,
            ),
        };
        let refused = matches!(reply, Message::Error(_));
        if let Message::Error(e) = &reply {
            tracing::warn!(peer, error = %e.message, "refused a frame");
        }
        if let Err(e) = s.send(&reply).await {
            tracing::warn!(peer, error = %e, "could not answer a camera");
            return;
        }
        if refused {
            let _ = s.finish();
            return;
        }
    }
}

/// Check a `Continue` (on a session opened with `open`) against the family and run the edge
/// part. Errors are for the peer.
fn classify(
    model: &VisionFamily,
    open: &Open,
    c: &Continue,
) -> std::result::Result<Classification, String> {
    let (tokens, dim, from) = (model.tokens(), model.cfg.dim, model.cfg.exits[0]);
    if open.layer as usize != from {
        return Err(format!(
            "hidden state is from block {}, this edge continues from block {from} (the device exit)",
            open.layer
        ));
    }
    if c.hidden.dims() != [tokens, dim] {
        return Err(format!(
            "hidden state is {:?}, expected [{tokens}, {dim}] (class token + patches, model width)",
            c.hidden.shape()
        ));
    }
    if c.start != 0 {
        return Err(format!(
            "positions must be 0..{tokens}, got a start at {}",
            c.start
        ));
    }
    if c.backfill.is_some() {
        return Err("a vision frame has no earlier positions: backfill must be empty".into());
    }
    c.hidden
        .check_finite("continue.hidden")
        .map_err(|e| e.to_string())?;
    let run = || -> Result<Classification> {
        let data = c.hidden.decode()?;
        let x = Tensor::from_vec(data, (1, tokens, dim), &Device::Cpu)?;
        let out = model.edge(&x)?;
        Ok(Classification {
            request_id: open.request_id,
            session_id: open.session_id,
            tier: Role::Edge,
            exit: model.cfg.layers as u32,
            p_emergency: out.p_emergency[0],
            congestion: out.congestion[0],
        })
    };
    run().map_err(|e| e.to_string())
}

/// The cameras' side: device exit locally, escalation over QUIC to an [`EdgeService`].
/// One connection (the camera node) with one session per approach (camera).
pub struct RemoteDetector {
    model: VisionFamily,
    /// Device confidence below this escalates (1.0: always, 0.0: never).
    pub threshold: f32,
    handle: Handle,
    _endpoint: Endpoint,
    conn: PeerConnection,
    /// Each approach's session and the request id its `Open` named.
    sessions: [Option<(SessionStream, u64)>; 4],
    codec: Codec,
    next_request: u64,
}

impl std::fmt::Debug for RemoteDetector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteDetector")
            .field("threshold", &self.threshold)
            .field("edge", &self.conn.remote_address())
            .finish()
    }
}

impl RemoteDetector {
    /// Connect to the edge at `edge` (its certificate names `edge_name` under mTLS). Uses
    /// `handle`'s runtime for the link; call from outside that runtime.
    pub fn connect(
        handle: Handle,
        model: VisionFamily,
        threshold: f32,
        security: Security,
        edge: SocketAddr,
        edge_name: &str,
        node_id: &str,
    ) -> Result<RemoteDetector> {
        let digest = model.digest()?;
        let bind: SocketAddr = if edge.is_ipv6() {
            "[::1]:0"
        } else if edge.ip().is_loopback() {
            "127.0.0.1:0"
        } else {
            "0.0.0.0:0"
        }
        .parse()
        .map_err(|e| Error::Config(format!("bind address: {e}")))?;
        let mut cfg =
            EndpointConfig::new(bind, security, hello(node_id, Role::Device, &model, digest));
        cfg.parent_roles = vec![Role::Edge];
        let codec = cfg.codec;
        let (endpoint, conn) = handle.block_on(async {
            let ep = Endpoint::client(cfg)?;
            let conn = ep.connect(edge, edge_name).await?;
            Ok::<_, Error>((ep, conn))
        })?;
        Ok(RemoteDetector {
            model,
            threshold,
            handle,
            _endpoint: endpoint,
            conn,
            sessions: [None, None, None, None],
            codec,
            next_request: 1,
        })
    }

    /// The device part of the family (for comparisons).
    pub fn model(&self) -> &VisionFamily {
        &self.model
    }

    /// Ship one frame's device hidden state (`[1, tokens, dim]`) to the edge on `approach`'s
    /// session; returns the edge's answer and the bytes of the `Continue` frame sent.
    pub fn escalate(
        &mut self,
        approach: Approach,
        hidden: &Tensor,
    ) -> Result<(Classification, u64)> {
        let (_, tokens, dim) = hidden.dims3()?;
        let data = hidden.flatten_all()?.to_vec1::<f32>()?;
        let msg = Message::Continue(Continue {
            start: 0,
            hidden: WireTensor::encode(&data, &[tokens, dim], Encoding::F32)?,
            backfill: None,
            deadline_ms: Some(REPLY_TIMEOUT.as_millis() as u32),
        });
        let bytes: u64 = self
            .codec
            .encode_chunks(&msg)?
            .iter()
            .map(|c| c.len() as u64)
            .sum();
        let (reply, request_id) = self.exchange(approach, &msg)?;
        if !matches!(&reply, Message::Classification(c) if c.request_id == request_id) {
            // The edge ends a session after refusing a frame: the next frame opens a new one.
            self.sessions[approach.index()] = None;
        }
        match reply {
            Message::Classification(c) if c.request_id == request_id => Ok((c, bytes)),
            Message::Classification(c) => Err(Error::Link(format!(
                "edge answered request {} while {request_id} was waiting",
                c.request_id
            ))),
            Message::Error(e) => Err(Error::Link(format!(
                "edge refused the frame ({:?}): {}",
                e.code, e.message
            ))),
            other => Err(Error::Link(format!(
                "edge answered with {} instead of Classification",
                other.name()
            ))),
        }
    }

    /// Send `msg` on `approach`'s session (opening it with an `Open` when needed): the
    /// reply and the session's request id.
    fn exchange(&mut self, approach: Approach, msg: &Message) -> Result<(Message, u64)> {
        let open = self.sessions[approach.index()].is_none().then(|| {
            self.next_request += 1;
            Open {
                request_id: self.next_request - 1,
                session_id: approach.index() as u64,
                layer: self.model.cfg.exits[0] as u32,
                policy: Default::default(),
                sampling: Sampling::default(),
                deadline_ms: None,
            }
        });
        let slot = &mut self.sessions[approach.index()];
        let conn = &self.conn;
        let out = self.handle.block_on(async {
            if let Some(open) = open {
                let mut s = conn.open_session().await?;
                let id = open.request_id;
                s.send(&Message::Open(open)).await?;
                *slot = Some((s, id));
            }
            let (s, id) = slot
                .as_mut()
                .ok_or_else(|| Error::Link("no session".into()))?;
            let id = *id;
            s.send(msg).await?;
            match tokio::time::timeout(REPLY_TIMEOUT, s.recv()).await {
                Err(_) => Err(Error::Link(format!(
                    "edge did not answer within {} s",
                    REPLY_TIMEOUT.as_secs()
                ))),
                Ok(r) => r?
                    .map(|m| (m, id))
                    .ok_or_else(|| Error::Link("edge closed the session".into())),
            }
        });
        if out.is_err() {
            // The session is in an unknown state: the next frame opens a fresh one.
            *slot = None;
        }
        out
    }
}

impl Detector for RemoteDetector {
    fn detect(&mut self, approach: Approach, frame: &Frame) -> Result<Detection> {
        let (dev, hidden) = self.model.device(&[frame])?;
        if dev.confidence(0) >= self.threshold {
            return Ok(dev.detection(0));
        }
        let (c, bytes) = self.escalate(approach, &hidden)?;
        Ok(Detection {
            congestion: c.congestion,
            emergency: c.p_emergency >= 0.5,
            escalated: true,
            shipped_bytes: bytes,
        })
    }

    fn name(&self) -> String {
        format!("vit-quic@{:.2}", self.threshold)
    }
}
