//! Serving children: the accept loop, one task per child connection, and one session per
//! request stream a child opens (or an operator's fleet request from this host).

use std::sync::Arc;

use flow_protocol::transport::{PeerConnection, SessionStream};
use flow_protocol::{ErrorCode, Message, Open};
use tokio::time::Instant;

use super::Agent;
use crate::engine::Stage;
use crate::error::{NodeError, Result};
use crate::parent::answer_probes;
use crate::session::{Driver, Event, Session};

impl Agent {
    pub(super) async fn accept_loop(self) {
        let Some(server) = self.inner.server.as_ref() else {
            return;
        };
        while let Some(conn) = server.accept().await {
            match conn {
                Ok(c) => {
                    tracing::info!(child = %c.peer_hello().node_id, role = %c.peer_hello().role, addr = %c.remote_address(), "child connected");
                    if let Some(control) = c.take_control() {
                        tokio::spawn(answer_probes(
                            control,
                            server.config().codec.limits,
                            c.peer_hello().protocol_version,
                            self.inner.upstream.clone(),
                        ));
                    }
                    let me = self.clone();
                    let c = Arc::new(c);
                    self.inner.fleet.add_child(&c);
                    tokio::spawn(async move { me.serve_connection(c).await });
                }
                Err(e) => tracing::warn!(error = %e, "refused a child connection"),
            }
        }
    }

    async fn serve_connection(self, conn: Arc<PeerConnection>) {
        loop {
            match conn.accept_session().await {
                Ok(stream) => {
                    let me = self.clone();
                    let local = conn.remote_address().ip().is_loopback();
                    tokio::spawn(async move { me.serve_session(stream, local).await });
                }
                Err(e) => {
                    tracing::info!(child = %conn.peer_hello().node_id, reason = %e, "child connection ended");
                    return;
                }
            }
        }
    }

    /// Serves one child session. `from_loopback`: the child connected from this host;
    /// only such a peer may send operator requests (`flow-node fleet` push, rollback,
    /// round), since a child's certificate cannot tell an operator from a device.
    async fn serve_session(self, mut stream: SessionStream, from_loopback: bool) {
        let Ok(_guard) = self.enter() else {
            let _ = stream
                .send(&Message::error(
                    ErrorCode::Overloaded,
                    "this node is shutting down",
                    None,
                ))
                .await;
            return;
        };
        self.inner.metrics.sessions_served.inc();
        let mut tier: Option<Driver> = None;
        let hidden = self.inner.model_cfg.hidden_size;
        loop {
            let msg = match stream.recv().await {
                Ok(Some(m)) => m,
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!(error = %e, "child session ended");
                    break;
                }
            };
            let reply = match msg {
                // The stream's first message: it makes the session and is not answered.
                Message::Open(o) if tier.is_none() => match self.child_session(&o) {
                    Ok(t) => {
                        tier = Some(t);
                        continue;
                    }
                    Err(e) => Err(e),
                },
                Message::Open(_) => Err(NodeError::Unexpected(
                    "a second Open on this request stream: a stream carries one request; \
                     open a new stream for another"
                        .into(),
                )),
                Message::Continue(c) => match tier.as_mut() {
                    Some(t) => {
                        t.session_mut().on_continue(c, hidden, Instant::now());
                        child_reply(t).await
                    }
                    None => Err(before_open("Continue")),
                },
                Message::Draft(d) => match tier.as_mut() {
                    Some(t) => {
                        t.session_mut().on_draft(d, hidden, Instant::now());
                        child_reply(t).await
                    }
                    None => Err(before_open("Draft")),
                },
                Message::Cancel(_) | Message::Done(_) => break,
                Message::Heartbeat(_) => continue,
                // An operator's push, rollback or round request (`flow-node fleet`).
                m @ (Message::DeltaOffer(_)
                | Message::DeltaRollback(_)
                | Message::RoundUpdate(_))
                    if tier.is_none() =>
                {
                    if !from_loopback {
                        tracing::warn!(
                            kind = m.name(),
                            "refused an operator request from another host"
                        );
                        let _ = stream
                            .send(&Message::error(
                                ErrorCode::Unauthorized,
                                "operator requests (fleet push, rollback, round) are accepted only \
                                 from this node's own host: run `flow-node fleet` on it (e.g. \
                                 `docker exec`) against its loopback address",
                                None,
                            ))
                            .await;
                        return;
                    }
                    return crate::fleet::serve_fleet_session(self.clone(), m, stream).await;
                }
                other => Err(NodeError::Protocol(format!(
                    "unexpected {} on a request session",
                    other.name()
                ))),
            };
            let out = match reply {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(error = %e, "child request failed");
                    Message::error(e.code(), e.to_string(), None)
                }
            };
            let is_err = matches!(out, Message::Error(_));
            if let Err(e) = stream.send(&out).await {
                tracing::debug!(error = %e, "could not reply to child");
                break;
            }
            if is_err {
                break;
            }
        }
        if let Some(mut t) = tier {
            t.close().await;
        }
        let _ = stream.finish();
    }

    /// The session of a child's request stream, made from the stream's `Open`: starting
    /// at its `layer` (anywhere inside the hosted layers: the child's cut may have moved;
    /// every later message of the stream continues from there), with its policy, sampling
    /// and request budget.
    fn child_session(&self, open: &Open) -> Result<Driver> {
        let hosted = self.inner.cfg.stage;
        let layer = open.layer as usize;
        if layer < hosted.a || layer > hosted.b || (layer == hosted.b && !hosted.exit) {
            return Err(NodeError::Protocol(format!(
                "hidden states after layer {layer}, but this node hosts layers {}..{}",
                hosted.a, hosted.b
            )));
        }
        if layer == 0 {
            return Err(NodeError::Protocol(
                "hidden states after layer 0 are embeddings; send tokens to the entry node".into(),
            ));
        }
        let stage = Stage { a: layer, ..hosted };
        let cfg = self.session_config(
            open.request_id,
            open.policy.clone(),
            open.sampling.clone(),
            stage,
        );
        Ok(self.driver(Session::child(cfg, open.deadline_ms, Instant::now())))
    }
}

/// A step message on a stream whose `Open` has not come.
fn before_open(kind: &str) -> NodeError {
    NodeError::Unexpected(format!(
        "{kind} before the stream's Open: a request stream starts with one Open (protocol 4) \
         naming the request, layer, policy and sampling"
    ))
}

/// Run a child's message through its session: the reply for the child.
async fn child_reply(d: &mut Driver) -> Result<Message> {
    match d.next().await? {
        Event::Reply(m) => Ok(*m),
        other => Err(NodeError::Internal(format!(
            "a child session produced {other:?} instead of a reply"
        ))),
    }
}
