//! The async side of a [`Session`]: performs its actions on the engine and the parent
//! link, with tokio's clock.

use std::sync::Arc;
use std::time::Duration;

use flow_protocol::transport::SessionStream;
use flow_protocol::{Encoding, Message, TokenOut};
use tokio::time::Instant;

use super::{message_tensor_bytes, Action, Session, Uplink};
use crate::engine::EngineHandle;
use crate::error::{NodeError, Result};
use crate::metrics::Metrics;
use crate::parent::{ParentLink, Parents};

/// What a session hands to its owner.
#[derive(Debug)]
pub enum Event {
    /// Entry node: the next token for the client.
    Token { token: TokenOut, degraded: bool },
    /// Upper tier: the answer to the child's message.
    Reply(Box<Message>),
    /// Entry node: the request is complete.
    Done(&'static str),
}

impl Uplink for ParentLink {
    fn name(&self) -> String {
        self.addr().to_string()
    }
    fn is_down(&self) -> bool {
        ParentLink::is_down(self)
    }
    fn reply_deadline(&self, rows: usize) -> Duration {
        ParentLink::reply_deadline(self, rows)
    }
    fn patience(&self) -> Duration {
        self.health().reply_cap
    }
    fn liveness_window(&self) -> Duration {
        // A live parent acknowledges our keep-alive (sent after `keep_alive` of silence)
        // within QUIC's ack delay (25 ms); the rest is room for a loaded machine. Kept
        // short: a parent killed right after acknowledging a request is lost one window
        // after the first deadline (250 ms + 600 ms on a LAN: fail-over within 1 s).
        self.health().keep_alive + Duration::from_millis(100)
    }
    fn predicted_reply_ms(&self, _rows: usize) -> (f64, f64) {
        // The measured round trip alone (the parent's service time stays inside the
        // link): a budget shorter than that is missed for sure. No sample yet (the prior):
        // no prediction, the reply deadline decides.
        let e = self.estimate();
        if e.confidence > 0.0 {
            (e.rtt_ms.max(0.0), e.rtt_std_ms.max(0.0))
        } else {
            (0.0, 0.0)
        }
    }
    fn encoding(&self) -> Encoding {
        ParentLink::encoding(self)
    }
}

/// A [`Session`] with the engine, the parent in use and its upstream stream.
pub struct Driver {
    session: Session,
    engine: EngineHandle,
    parents: Option<Arc<Parents>>,
    parent: Option<Arc<ParentLink>>,
    upstream: Option<SessionStream>,
    metrics: Arc<Metrics>,
    closed: bool,
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.session.fmt(f)
    }
}

impl Driver {
    /// Drive `session` on `engine`, escalating to the parent `parents` picks.
    pub fn new(
        session: Session,
        engine: EngineHandle,
        parents: Option<Arc<Parents>>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            parent: parents.as_ref().map(|p| p.pick()),
            session,
            engine,
            parents,
            upstream: None,
            metrics,
            closed: false,
        }
    }

    pub fn session(&self) -> &Session {
        &self.session
    }

    pub fn session_mut(&mut self) -> &mut Session {
        &mut self.session
    }

    /// Perform actions until the session has something for its owner.
    pub async fn next(&mut self) -> Result<Event> {
        loop {
            let action = self.session.poll_action().ok_or_else(|| {
                NodeError::Internal("the session has nothing to do and nothing to say".into())
            })?;
            match action {
                Action::Compute(job) => {
                    let out = self.engine.step(job).await?;
                    self.metrics.batch_size.observe(out.batch_size as f64);
                    let link = self.parent.as_deref().map(|p| p as &dyn Uplink);
                    self.session.on_step_output(out, Instant::now(), link);
                }
                Action::Truncate(len) => self.engine.truncate(self.session.id(), len).await,
                Action::Escalate { up, msg } | Action::Draft { up, msg } => {
                    self.exchange(up, msg).await
                }
                Action::ResetUpstream => self.upstream = None,
                Action::FailOver => {
                    let next = match (&self.parents, &self.parent) {
                        (Some(set), Some(cur)) => set.fail_over(cur),
                        _ => None,
                    };
                    if let Some(p) = &next {
                        self.parent = Some(p.clone());
                    }
                    let link = next.as_deref().map(|p| p as &dyn Uplink);
                    self.session.on_failed_over(Instant::now(), link);
                }
                Action::Degrade(reason) => {
                    tracing::debug!(session = self.session.id(), ?reason, "answering degraded");
                    self.metrics.degraded.inc();
                }
                Action::ObserveReply { rows, elapsed } => {
                    if let Some(p) = &self.parent {
                        p.observe_reply(rows, elapsed);
                    }
                }
                Action::Token { token, degraded } => return Ok(Event::Token { token, degraded }),
                Action::Reply(m) => return Ok(Event::Reply(Box::new(m))),
                Action::Done { finish_reason } => return Ok(Event::Done(finish_reason)),
                Action::Fail(e) => return Err(e),
            }
        }
    }

    /// Send `msg` on upstream `up` (opening it with the session's `Open` when needed) and
    /// hand the reply, the failure or the missed deadline to the session. On a miss the
    /// stream is dropped with the exchange: a late reply is never read.
    async fn exchange(&mut self, up: u64, msg: Message) {
        let Some(parent) = self.parent.clone() else {
            let err = NodeError::Internal("escalation without a parent".into());
            return self.session.on_parent_lost(up, err, Instant::now());
        };
        let bytes = message_tensor_bytes(&msg);
        self.metrics.bytes_up.add(bytes);
        if let Message::Continue(c) = &msg {
            self.metrics.escalations.inc();
            if let Some(b) = &c.backfill {
                self.metrics
                    .backfill_bytes
                    .add(b.hidden.bytes().len() as u64);
            }
        }
        let stream = self.upstream.take();
        // A new stream starts with the session's Open (no reply comes for it).
        let open = stream
            .is_none()
            .then(|| self.session.open_message(Instant::now()));
        let addr = parent.addr().to_string();
        let perr = |e: flow_protocol::Error| NodeError::Parent {
            addr: addr.clone(),
            msg: e.to_string(),
        };
        let started = Instant::now();
        let mut heard = parent.packets_received().await;
        let exchange = async {
            let mut s = match stream {
                Some(s) => s,
                None => parent.open_session().await?,
            };
            if let Some(open) = &open {
                s.send(open).await.map_err(perr)?;
            }
            s.send(&msg).await.map_err(perr)?;
            let reply = s.recv().await.map_err(perr)?;
            Ok::<_, NodeError>((s, reply))
        };
        // Past each deadline the parent is asked nothing: QUIC's counters say whether it
        // was heard from since (acknowledgements, keep-alive answers). Heard: slow, wait on
        // (within the session's patience); silent: lost.
        let res = {
            tokio::pin!(exchange);
            loop {
                let Some(at) = self.session.poll_timeout() else {
                    break Ok((&mut exchange).await);
                };
                match tokio::time::timeout_at(at, &mut exchange).await {
                    Ok(r) => break Ok(r),
                    Err(_) => {
                        let now = Instant::now();
                        let count = parent.packets_received().await;
                        if count > heard {
                            heard = count;
                            self.metrics.parent_slow_replies.inc();
                            self.session.on_parent_heard(now);
                        } else {
                            self.session.on_timeout(now);
                        }
                        if self.session.poll_timeout().is_none() {
                            break Err(());
                        }
                    }
                }
            }
        };
        let now = Instant::now();
        match res {
            Err(()) => self.metrics.parent_timeouts.inc(),
            Ok(Ok((s, Some(reply)))) => {
                // A lower bound on goodput from the request itself (the link's budget
                // then needs fewer probes).
                parent.observe_transfer(bytes, now.saturating_duration_since(started));
                self.upstream = Some(s);
                self.session.on_reply(up, reply, now);
            }
            Ok(Ok((_, None))) => {
                let err = NodeError::Parent {
                    addr,
                    msg: "closed the session".into(),
                };
                self.session.on_parent_lost(up, err, now);
            }
            Ok(Err(e)) => {
                let err = match e {
                    e @ NodeError::Parent { .. } => e,
                    e => NodeError::Parent {
                        addr,
                        msg: e.to_string(),
                    },
                };
                self.session.on_parent_lost(up, err, now);
            }
        }
    }

    /// Release the KV here and close the upstream stream.
    pub async fn close(&mut self) {
        if self.closed {
            return;
        }
        self.closed = true;
        if let Some(mut up) = self.upstream.take() {
            let _ = up.finish();
        }
        self.engine.close(self.session.id()).await;
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        if !self.closed {
            self.engine.close_now(self.session.id());
        }
    }
}
