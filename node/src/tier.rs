//! Collaborative inference, one tier's view: run this node's stage for a session, decide
//! whether to answer or escalate, and talk to the parent.
//!
//! The same [`TierSession`] runs on every tier. The entry node feeds it token ids; an upper
//! tier feeds it the hidden states a child shipped in `Continue`/`Draft`. Positions a tier
//! answered itself are *owed* to its parent: their states after this stage are kept and
//! sent as a backfill with the next escalation, so the parent's KV is always exact
//! (DESIGN.md §3, step 4).

use std::sync::Arc;

use candle_core::{Device, Tensor};
use flow_familial::confidence::{Confidence, Measure};
use flow_familial::sample::{Sampler, SamplingParams};
use flow_protocol::transport::SessionStream;
use flow_protocol::{
    Backfill, ConfidenceMeasure, Continue, Draft, Encoding, InferMode, Message, Policy, Role,
    Sampling, TokenOut, Tokens, Verdict, WireTensor,
};

use crate::engine::{EngineHandle, Input, StepJob};
use crate::error::{NodeError, Result};
use crate::metrics::Metrics;
use crate::parent::ParentLink;

/// Candle tensor `[rows, hidden]` → wire tensor in `enc`.
pub fn to_wire(t: &Tensor, enc: Encoding) -> Result<WireTensor> {
    let dims = t.dims().to_vec();
    let data: Vec<f32> = t.flatten_all()?.to_vec1()?;
    Ok(WireTensor::encode(&data, &dims, enc)?)
}

/// Wire tensor → candle tensor `[rows, hidden]`, checking the width.
pub fn from_wire(w: &WireTensor, hidden: usize) -> Result<Tensor> {
    let dims = w.dims();
    if dims.len() != 2 || dims[1] != hidden {
        return Err(NodeError::Protocol(format!(
            "hidden states have shape {dims:?}, expected [rows, {hidden}]"
        )));
    }
    let data = w.decode()?;
    if let Some(i) = data.iter().position(|x| !x.is_finite()) {
        return Err(NodeError::Protocol(format!(
            "hidden state element {i} is not finite"
        )));
    }
    Ok(Tensor::from_vec(data, (dims[0], dims[1]), &Device::Cpu)?)
}

/// Token choice for `position`: greedy, or sampling seeded by (seed, position) so every
/// tier picks the same token from the same logits.
pub fn choose(row: &[f32], s: &Sampling, position: usize) -> u32 {
    let params = SamplingParams {
        temperature: s.temperature,
        top_p: s.top_p,
        top_k: s.top_k as usize,
        seed: s
            .seed
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(position as u64),
    };
    Sampler::new(params).sample(row)
}

/// What a tier decides for one position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decision {
    Answer,
    Escalate,
}

/// A step's result at this tier.
#[derive(Debug, Clone)]
pub struct StepResult {
    pub token: TokenOut,
    pub degraded: bool,
}

/// Per-request state of one tier.
pub struct TierSession {
    pub id: u64,
    pub request: u64,
    engine: EngineHandle,
    role: Role,
    parent: Option<Arc<ParentLink>>,
    upstream: Option<SessionStream>,
    policy: Policy,
    sampling: Sampling,
    /// States after this stage for positions `owed_start..` the parent has not seen.
    owed: Vec<Tensor>,
    owed_start: usize,
    metrics: Arc<Metrics>,
    /// Bytes this session shipped upward.
    pub bytes_up: u64,
    pub hops: u32,
    closed: bool,
    /// The parent failed during this request: answer locally from here on (its KV can no
    /// longer be completed, so later escalations would be wrong).
    parent_failed: bool,
}

impl std::fmt::Debug for TierSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TierSession")
            .field("id", &self.id)
            .field("role", &self.role)
            .field("policy", &self.policy)
            .finish()
    }
}

impl TierSession {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: u64,
        request: u64,
        engine: EngineHandle,
        role: Role,
        parent: Option<Arc<ParentLink>>,
        policy: Policy,
        sampling: Sampling,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            id,
            request,
            engine,
            role,
            parent,
            upstream: None,
            policy,
            sampling,
            owed: Vec::new(),
            owed_start: 0,
            metrics,
            bytes_up: 0,
            hops: 0,
            closed: false,
            parent_failed: false,
        }
    }

    fn exit_point(&self) -> Option<u32> {
        let st = self.engine.stage();
        st.exit.then_some(st.b as u32)
    }

    /// Whether the decision at this tier is fixed before computing anything.
    fn predetermined(&self) -> Option<Decision> {
        let Some(exit) = self.exit_point() else {
            return Some(Decision::Escalate);
        };
        if self.parent.is_none() || self.parent_failed {
            return Some(Decision::Answer);
        }
        match self.policy.mode {
            InferMode::Local => Some(Decision::Answer),
            InferMode::Route => match self.policy.answer_exit {
                Some(e) if e > exit => Some(Decision::Escalate),
                _ => Some(Decision::Answer),
            },
            InferMode::Escalate => {
                let th = self.policy.threshold_for(exit);
                if th > 1.0 && self.policy.measure_is_bounded() {
                    Some(Decision::Escalate)
                } else {
                    None
                }
            }
            InferMode::Speculate => None,
        }
    }

    /// Run one step for positions `start..start+rows` of `input` (plus an optional
    /// backfill of positions this stage missed) and produce the next token — here or, if
    /// this tier is not confident, from the parent.
    pub async fn step(
        &mut self,
        input: Input,
        start: usize,
        backfill: Option<(usize, Tensor)>,
    ) -> Result<StepResult> {
        let pre = self.predetermined();
        let job = StepJob {
            session: self.id,
            start,
            input,
            backfill,
            logit_rows: usize::from(pre != Some(Decision::Escalate)),
            exit_kv: pre != Some(Decision::Escalate),
        };
        let out = self.engine.step(job).await?;
        self.metrics.batch_size.observe(out.batch_size as f64);
        let rows = out.hidden.dim(0)?;
        if let Some(bf) = out.backfill_hidden {
            self.owed.push(bf);
        }
        let conf = out
            .logits
            .as_ref()
            .and_then(|l| l.last())
            .map(|row| (Confidence::of_row(row), row.clone()));
        let decision = match pre {
            Some(d) => d,
            None => match &conf {
                Some((c, _)) => {
                    let exit = self.exit_point().unwrap_or(0);
                    if c.score(measure(&self.policy)) >= self.policy.threshold_for(exit) {
                        Decision::Answer
                    } else {
                        Decision::Escalate
                    }
                }
                None => Decision::Escalate,
            },
        };
        let position = start + rows;
        if decision == Decision::Answer {
            let (c, row) =
                conf.ok_or_else(|| NodeError::Internal("no logits at an answering tier".into()))?;
            self.owed.push(out.hidden);
            return Ok(StepResult {
                token: TokenOut {
                    id: choose(&row, &self.sampling, position),
                    position: position as u32,
                    tier: self.role,
                    exit: self.exit_point().unwrap_or(0),
                    confidence: c.max_prob,
                },
                degraded: false,
            });
        }
        // Escalate: ship the owed rows as a backfill and this step's rows as the input.
        match self.escalate(start, out.hidden).await {
            Ok(r) => Ok(r),
            Err(e) => match conf {
                Some((c, row)) => {
                    tracing::warn!(session = self.id, error = %e, "parent failed; answering from the local exit (degraded)");
                    self.metrics.degraded.inc();
                    self.upstream = None;
                    self.parent_failed = true;
                    Ok(StepResult {
                        token: TokenOut {
                            id: choose(&row, &self.sampling, position),
                            position: position as u32,
                            tier: self.role,
                            exit: self.exit_point().unwrap_or(0),
                            confidence: c.max_prob,
                        },
                        degraded: true,
                    })
                }
                None => Err(e),
            },
        }
    }

    /// Take the upstream session (opening one if needed); put it back with
    /// `self.upstream = Some(..)` after a successful exchange.
    async fn take_upstream(&mut self) -> Result<SessionStream> {
        if let Some(s) = self.upstream.take() {
            return Ok(s);
        }
        let parent = self
            .parent
            .as_ref()
            .ok_or_else(|| NodeError::Internal("escalation without a parent".into()))?;
        parent.open_session().await
    }

    fn parent_addr(&self) -> String {
        self.parent
            .as_ref()
            .map(|p| p.addr().to_string())
            .unwrap_or_default()
    }

    async fn escalate(&mut self, start: usize, hidden: Tensor) -> Result<StepResult> {
        let enc = self
            .parent
            .as_ref()
            .map(|p| p.encoding())
            .unwrap_or(Encoding::F32);
        let layer = self.engine.stage().b as u32;
        let rows = hidden.dim(0)?;
        let backfill = if self.owed.is_empty() {
            None
        } else {
            let h = Tensor::cat(&self.owed, 0)?;
            let n = h.dim(0)?;
            if self.owed_start + n != start {
                return Err(NodeError::Internal(format!(
                    "owed rows {}..{} do not end at position {start}",
                    self.owed_start,
                    self.owed_start + n
                )));
            }
            Some(Backfill {
                positions: (self.owed_start as u32..start as u32).collect(),
                hidden: to_wire(&h, enc)?,
            })
        };
        let msg = Message::Continue(Continue {
            request_id: self.request,
            session_id: self.id,
            positions: (start as u32..(start + rows) as u32).collect(),
            layer,
            hidden: to_wire(&hidden, enc)?,
            backfill,
            sampling: self.sampling.clone(),
            deadline_ms: None,
            policy: self.policy.clone(),
        });
        let bytes = message_tensor_bytes(&msg);
        let addr = self.parent_addr();
        // Everything up to this step's end is now in the message for the parent.
        self.owed.clear();
        self.owed_start = start + rows;
        let mut up = self.take_upstream().await?;
        up.send(&msg).await.map_err(|e| NodeError::Parent {
            addr: addr.clone(),
            msg: e.to_string(),
        })?;
        self.bytes_up += bytes;
        self.metrics.bytes_up.add(bytes);
        self.metrics.escalations.inc();
        self.hops += 1;
        let reply = up.recv().await.map_err(|e| NodeError::Parent {
            addr: addr.clone(),
            msg: e.to_string(),
        })?;
        self.upstream = Some(up);
        match reply {
            Some(Message::Tokens(t)) => {
                let tok = t
                    .tokens
                    .into_iter()
                    .next()
                    .ok_or_else(|| NodeError::Parent {
                        addr: addr.clone(),
                        msg: "empty Tokens reply".into(),
                    })?;
                Ok(StepResult {
                    token: tok,
                    degraded: t.degraded,
                })
            }
            Some(Message::Error(e)) => Err(NodeError::Parent {
                addr,
                msg: format!("{:?}: {}", e.code, e.message),
            }),
            Some(other) => Err(NodeError::Parent {
                addr,
                msg: format!("unexpected {} in reply to Continue", other.name()),
            }),
            None => Err(NodeError::Parent {
                addr,
                msg: "closed the session".into(),
            }),
        }
    }

    /// Speculative round at a non-entry tier: run this stage over the draft rows, then
    /// verify (last tier) or relay to the parent, and roll the KV back to what was accepted.
    pub async fn draft(&mut self, d: Draft, hidden: Tensor) -> Result<Verdict> {
        let start = *d
            .positions
            .first()
            .ok_or_else(|| NodeError::Protocol("Draft without positions".into()))?
            as usize;
        let rows = hidden.dim(0)?;
        let n = d.tokens.len();
        if n == 0 || n >= rows || d.positions.len() != rows {
            return Err(NodeError::Protocol(format!(
                "Draft with {n} tokens for {rows} rows and {} positions",
                d.positions.len()
            )));
        }
        let verify = self.parent.is_none();
        let out = self
            .engine
            .step(StepJob {
                session: self.id,
                start,
                input: Input::Hidden(hidden),
                backfill: None,
                logit_rows: if verify { n + 1 } else { 0 },
                exit_kv: verify,
            })
            .await?;
        let r = rows - n;
        let verdict = if verify {
            let logits = out
                .logits
                .ok_or_else(|| NodeError::Internal("verifier without logits".into()))?;
            // logits[i] predicts position start + r + i (i = 0..=n).
            let mut accepted = 0;
            let mut next = 0;
            for (i, row) in logits.iter().enumerate() {
                let v = choose(row, &self.sampling, start + r + i);
                if i < n && v == d.tokens[i] {
                    accepted += 1;
                } else {
                    next = v;
                    break;
                }
            }
            Verdict {
                request_id: d.request_id,
                session_id: d.session_id,
                accepted: accepted as u32,
                next_token: next,
                tier: self.role,
                exit: self.exit_point().unwrap_or(0),
            }
        } else {
            let enc = self
                .parent
                .as_ref()
                .map(|p| p.encoding())
                .unwrap_or(Encoding::F32);
            let msg = Message::Draft(Draft {
                hidden: to_wire(&out.hidden, enc)?,
                layer: self.engine.stage().b as u32,
                ..d
            });
            self.exchange_draft(msg).await?
        };
        if verdict.accepted as usize > n {
            return Err(NodeError::Protocol(
                "verdict accepts more than drafted".into(),
            ));
        }
        // Keep KV for inputs that are now certain: rows up to the last accepted draft.
        self.engine
            .truncate(self.id, start + r + verdict.accepted as usize)
            .await;
        Ok(verdict)
    }

    /// Entry-node speculation: send drafted rows up and wait for the verdict.
    pub async fn verify_upstream(
        &mut self,
        start: usize,
        hidden: Tensor,
        drafts: Vec<u32>,
    ) -> Result<Verdict> {
        let enc = self
            .parent
            .as_ref()
            .map(|p| p.encoding())
            .unwrap_or(Encoding::F32);
        let rows = hidden.dim(0)?;
        let msg = Message::Draft(Draft {
            request_id: self.request,
            session_id: self.id,
            positions: (start as u32..(start + rows) as u32).collect(),
            layer: self.engine.stage().b as u32,
            tokens: drafts,
            hidden: to_wire(&hidden, enc)?,
            deadline_ms: None,
            sampling: self.sampling.clone(),
            policy: self.policy.clone(),
        });
        self.exchange_draft(msg).await
    }

    /// Send a `Draft` to the parent and wait for its `Verdict`.
    async fn exchange_draft(&mut self, msg: Message) -> Result<Verdict> {
        let bytes = message_tensor_bytes(&msg);
        self.bytes_up += bytes;
        self.metrics.bytes_up.add(bytes);
        self.hops += 1;
        let addr = self.parent_addr();
        let mut up = self.take_upstream().await?;
        up.send(&msg).await.map_err(|e| NodeError::Parent {
            addr: addr.clone(),
            msg: e.to_string(),
        })?;
        let reply = up.recv().await;
        self.upstream = Some(up);
        match reply {
            Ok(Some(Message::Verdict(v))) => Ok(v),
            Ok(Some(Message::Error(e))) => Err(NodeError::Parent {
                addr,
                msg: format!("{:?}: {}", e.code, e.message),
            }),
            Ok(other) => Err(NodeError::Parent {
                addr,
                msg: format!("unexpected reply to Draft: {other:?}"),
            }),
            Err(e) => Err(NodeError::Parent {
                addr,
                msg: e.to_string(),
            }),
        }
    }

    /// This tier's engine.
    pub fn engine(&self) -> &EngineHandle {
        &self.engine
    }

    /// Whether a parent is configured.
    pub fn has_parent(&self) -> bool {
        self.parent.is_some()
    }

    /// Build a `Tokens` reply for a child.
    pub fn tokens_reply(&self, r: &StepResult) -> Message {
        Message::Tokens(Tokens {
            request_id: self.request,
            session_id: self.id,
            tokens: vec![r.token.clone()],
            degraded: r.degraded,
        })
    }

    /// Release KV here and close the upstream session.
    pub async fn close(&mut self) {
        if self.closed {
            return;
        }
        self.closed = true;
        if let Some(mut up) = self.upstream.take() {
            let _ = up.finish();
        }
        self.engine.close(self.id).await;
    }
}

impl Drop for TierSession {
    fn drop(&mut self) {
        if !self.closed {
            self.engine.close_now(self.id);
        }
    }
}

/// The familial confidence measure named by a policy.
pub fn measure(p: &Policy) -> Measure {
    match p.measure {
        ConfidenceMeasure::MaxProb => Measure::MaxProb,
        ConfidenceMeasure::Margin => Measure::Margin,
        ConfidenceMeasure::NegEntropy => Measure::NegEntropy,
    }
}

/// Tensor payload bytes of a message (what the link carries beyond headers).
pub fn message_tensor_bytes(m: &Message) -> u64 {
    m.tensors().iter().map(|t| t.bytes().len() as u64).sum()
}
