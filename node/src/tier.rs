//! Collaborative inference, one tier's view: run this node's stage for a session, decide
//! whether to answer or escalate, and talk to the parent.
//!
//! The same [`TierSession`] runs on every tier. The entry node feeds it token ids; an upper
//! tier feeds it the hidden states a child shipped in `Continue`/`Draft`. Positions a tier
//! answered itself are *owed* to its parent: their states after this stage are kept and
//! sent as a backfill with the next escalation, so the parent's KV is always exact
//! (DESIGN.md §3, step 4).
//!
//! Fail-over: when the parent fails mid-request, the step is answered from the local exit
//! (marked `degraded`) and, if another parent is configured, the session continues there.
//! A tier with several parents keeps the states after its stage for every position of the
//! session (`history`); on fail-over all of them become owed, so the first escalation to
//! the new parent carries them as a backfill and the new parent's KV (and, through its own
//! backfill, its parent's) is exact again.
//!
//! Every exchange with the parent is bounded by a reply deadline
//! ([`crate::parent::ParentLink::reply_deadline`], shortened to the request's own time
//! budget when the child sent one in `Continue.deadline_ms`). A parent that misses it is
//! treated like one that failed: the step is answered degraded (or fails over), the
//! upstream session is dropped so a late reply can never be read as a later step's, and the
//! tier answers locally for the rest of the request — tokens it would have escalated are
//! marked degraded. A parent link that is down (see [`crate::parent`]) is not tried.

use std::sync::Arc;
use std::time::Duration;

use candle_core::{Device, Tensor};
use flow_familial::confidence::{Confidence, Measure};
use flow_familial::sample::{Sampler, SamplingParams};
use flow_protocol::transport::SessionStream;
use flow_protocol::{
    Backfill, ConfidenceMeasure, Continue, Draft, Encoding, InferMode, Message, Policy, Role,
    Sampling, TokenOut, Tokens, Verdict, WireTensor,
};

use crate::engine::{EngineHandle, Input, Stage, StepJob};
use crate::error::{NodeError, Result};
use crate::metrics::Metrics;
use crate::parent::{ParentLink, Parents};

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
    /// Layers (and exit) this session runs: the engine's loaded stage or, when the split
    /// moved, a sub-range of it. Fixed for the session's life.
    stage: Stage,
    role: Role,
    parent: Option<Arc<ParentLink>>,
    parents: Option<Arc<Parents>>,
    /// States after this stage for positions `0..`, kept when there is a parent to fail
    /// over to.
    history: Vec<Tensor>,
    /// Fail-overs during this session.
    pub failovers: u32,
    /// Wire encoding of hidden states to the parent (the plan's choice for this link).
    encoding: Option<Encoding>,
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
    /// End of the time budget the child gave the current step (`Continue.deadline_ms`).
    budget_until: Option<tokio::time::Instant>,
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
        parents: Option<Arc<Parents>>,
        policy: Policy,
        sampling: Sampling,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            id,
            request,
            stage: engine.stage(),
            engine,
            role,
            parent: parents.as_ref().map(|p| p.pick()),
            parents,
            history: Vec::new(),
            failovers: 0,
            encoding: None,
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
            budget_until: None,
        }
    }

    /// The child gave the next step `budget` to answer (`Continue.deadline_ms`): waits for
    /// this tier's parent end before it (with a tenth left for the reply's way back).
    pub fn set_step_budget(&mut self, budget: Option<Duration>) {
        self.budget_until = budget.map(|b| tokio::time::Instant::now() + b);
    }

    /// How long to wait for the parent's reply to a step of `rows` rows.
    fn reply_deadline(&self, rows: usize) -> Duration {
        let link = self
            .parent
            .as_ref()
            .map(|p| p.reply_deadline(rows))
            .unwrap_or(Duration::from_secs(5));
        match self.budget_until {
            Some(until) => {
                let left = until.saturating_duration_since(tokio::time::Instant::now());
                link.min(left.saturating_sub(left / 10))
            }
            None => link,
        }
    }

    /// Use `enc` for hidden states sent to the parent in this session (instead of the
    /// link's configured encoding).
    pub fn set_encoding(&mut self, enc: Encoding) {
        self.encoding = Some(enc);
    }

    /// Run `stage` (a sub-range of the engine's loaded layers) in this session instead
    /// of the whole loaded stage. Call before the first step; the engine refuses a range
    /// it has not loaded.
    pub fn set_stage(&mut self, stage: Stage) {
        self.stage = stage;
    }

    /// The layers (and exit) this session runs.
    pub fn stage(&self) -> Stage {
        self.stage
    }

    fn keeps_history(&self) -> bool {
        self.parents.as_ref().is_some_and(|p| p.all().len() > 1)
    }

    fn wire_encoding(&self) -> Encoding {
        self.encoding
            .or_else(|| self.parent.as_ref().map(|p| p.encoding()))
            .unwrap_or(Encoding::F32)
    }

    fn exit_point(&self) -> Option<u32> {
        let st = self.stage;
        st.exit.then_some(st.b as u32)
    }

    /// Whether the decision at this tier is fixed before computing anything.
    fn predetermined(&self) -> Option<Decision> {
        let Some(exit) = self.exit_point() else {
            return Some(Decision::Escalate);
        };
        if self.parent.is_none() {
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
        // After the parent failed, this tier answers whatever it would have escalated.
        let local =
            pre != Some(Decision::Escalate) || (self.parent_failed && self.exit_point().is_some());
        let job = StepJob {
            session: self.id,
            start,
            input,
            backfill,
            logit_rows: usize::from(local),
            exit_kv: local,
            stage: Some(self.stage),
        };
        let out = self.engine.step(job).await?;
        self.metrics.batch_size.observe(out.batch_size as f64);
        let rows = out.hidden.dim(0)?;
        if let Some(bf) = out.backfill_hidden {
            if self.keeps_history() {
                self.history.push(bf.clone());
            }
            self.owed.push(bf);
        }
        if self.keeps_history() {
            self.history.push(out.hidden.clone());
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
            return Ok(self.local_answer(&c, &row, position, false));
        }
        if self.parent_failed {
            if let Some((c, row)) = conf {
                // The parent is gone for this request: answer from the local exit.
                self.metrics.degraded.inc();
                self.owed.push(out.hidden);
                return Ok(self.local_answer(&c, &row, position, true));
            }
        }
        // Escalate: ship the owed rows as a backfill and this step's rows as the input.
        let step_rows = out.hidden.clone();
        match self.escalate(start, out.hidden).await {
            Ok(r) => Ok(r),
            Err(e) => match conf {
                Some((c, row)) => {
                    tracing::warn!(session = self.id, error = %e, "parent failed; answering from the local exit (degraded)");
                    self.metrics.degraded.inc();
                    self.upstream = None;
                    self.fail_over();
                    Ok(self.local_answer(&c, &row, position, true))
                }
                // No local exit here: the step can only be answered above. Retry it once
                // on another parent, with every earlier state as its backfill.
                None => {
                    self.upstream = None;
                    self.fail_over();
                    if self.parent_failed || self.failovers == 0 {
                        return Err(e);
                    }
                    tracing::warn!(session = self.id, error = %e, "parent failed on a step this tier cannot answer; retrying it on the next parent");
                    // The step's own rows travel as the input, not in the backfill.
                    self.owed.pop();
                    self.escalate(start, step_rows).await
                }
            },
        }
    }

    /// The token for `position` from this tier's exit (`row` = its logits).
    fn local_answer(
        &self,
        c: &Confidence,
        row: &[f32],
        position: usize,
        degraded: bool,
    ) -> StepResult {
        StepResult {
            token: TokenOut {
                id: choose(row, &self.sampling, position),
                position: position as u32,
                tier: self.role,
                exit: self.exit_point().unwrap_or(0),
                confidence: c.max_prob,
            },
            degraded,
        }
    }

    /// The parent failed: switch to another one (every kept state becomes owed to it), or
    /// answer locally for the rest of the request when there is none.
    fn fail_over(&mut self) {
        let next = match (&self.parents, &self.parent) {
            (Some(set), Some(cur)) => set.fail_over(cur),
            _ => None,
        };
        match next {
            Some(p) if self.keeps_history() => {
                tracing::warn!(session = self.id, parent = %p.addr(), positions = self.history.iter().map(|t| t.dim(0).unwrap_or(0)).sum::<usize>(), "continuing the session on another parent; its states are re-sent as a backfill");
                self.parent = Some(p);
                self.owed = self.history.clone();
                self.owed_start = 0;
                self.failovers += 1;
            }
            _ => self.parent_failed = true,
        }
    }

    /// Take the upstream session (opening one if needed); put it back with
    /// `self.upstream = Some(..)` after a successful exchange.
    async fn take_upstream(&mut self) -> Result<SessionStream> {
        let parent = self
            .parent
            .as_ref()
            .ok_or_else(|| NodeError::Internal("escalation without a parent".into()))?;
        if parent.is_down() {
            self.upstream = None;
            return Err(NodeError::Parent {
                addr: parent.addr().to_string(),
                msg: "the parent link is down (connection lost or probes missed)".into(),
            });
        }
        if let Some(s) = self.upstream.take() {
            return Ok(s);
        }
        parent.open_session().await
    }

    /// The error for a reply that did not come within `wait`.
    fn missed_deadline(&self, wait: Duration) -> NodeError {
        self.metrics.parent_timeouts.inc();
        NodeError::Parent {
            addr: self.parent_addr(),
            msg: format!("no reply within the {} ms deadline", wait.as_millis()),
        }
    }

    fn parent_addr(&self) -> String {
        self.parent
            .as_ref()
            .map(|p| p.addr().to_string())
            .unwrap_or_default()
    }

    async fn escalate(&mut self, start: usize, hidden: Tensor) -> Result<StepResult> {
        let enc = self.wire_encoding();
        let layer = self.stage.b as u32;
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
        let backfill_rows = backfill.as_ref().map_or(0, |b| b.positions.len());
        let wait = self.reply_deadline(rows + backfill_rows);
        let msg = Message::Continue(Continue {
            request_id: self.request,
            session_id: self.id,
            positions: (start as u32..(start + rows) as u32).collect(),
            layer,
            hidden: to_wire(&hidden, enc)?,
            backfill,
            sampling: self.sampling.clone(),
            deadline_ms: Some(u32::try_from(wait.as_millis()).unwrap_or(u32::MAX)),
            policy: self.policy.clone(),
        });
        let bytes = message_tensor_bytes(&msg);
        let addr = self.parent_addr();
        // Everything up to this step's end is now in the message for the parent.
        self.owed.clear();
        self.owed_start = start + rows;
        let t0 = tokio::time::Instant::now();
        let mut up = self.take_upstream().await?;
        self.bytes_up += bytes;
        self.metrics.bytes_up.add(bytes);
        self.metrics.escalations.inc();
        self.hops += 1;
        let exchange = async {
            up.send(&msg).await?;
            up.recv().await
        };
        // On a miss `up` is dropped with the future's borrow: the session is reset, so
        // a late reply is never read.
        let reply = match tokio::time::timeout(wait.saturating_sub(t0.elapsed()), exchange).await {
            Ok(r) => r.map_err(|e| NodeError::Parent {
                addr: addr.clone(),
                msg: e.to_string(),
            })?,
            Err(_) => return Err(self.missed_deadline(wait)),
        };
        if let Some(p) = &self.parent {
            p.observe_reply(rows + backfill_rows, t0.elapsed());
        }
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
                stage: Some(self.stage),
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
            let enc = self.wire_encoding();
            let msg = Message::Draft(Draft {
                hidden: to_wire(&out.hidden, enc)?,
                layer: self.stage.b as u32,
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
        let enc = self.wire_encoding();
        let rows = hidden.dim(0)?;
        let msg = Message::Draft(Draft {
            request_id: self.request,
            session_id: self.id,
            positions: (start as u32..(start + rows) as u32).collect(),
            layer: self.stage.b as u32,
            tokens: drafts,
            hidden: to_wire(&hidden, enc)?,
            deadline_ms: None,
            sampling: self.sampling.clone(),
            policy: self.policy.clone(),
        });
        self.exchange_draft(msg).await
    }

    /// Speculate mode at the entry node: [`Self::verify_upstream`]; when the parent fails
    /// and another is configured, the session continues there like escalate's fail-over:
    /// the same draft goes to the next parent from position 0 with `history` (the rows of
    /// every accepted position before `start`, in order) in front, so the new parent
    /// rebuilds the session's KV before it verifies. Without another parent, the error.
    pub async fn verify_or_fail_over(
        &mut self,
        start: usize,
        hidden: Tensor,
        drafts: Vec<u32>,
        history: &[Tensor],
    ) -> Result<Verdict> {
        let err = match self
            .verify_upstream(start, hidden.clone(), drafts.clone())
            .await
        {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        self.upstream = None;
        let next = match (&self.parents, &self.parent) {
            (Some(set), Some(cur)) => set.fail_over(cur),
            _ => None,
        };
        let Some(p) = next else {
            return Err(err);
        };
        tracing::warn!(session = self.id, error = %err, parent = %p.addr(), positions = start, "speculation continues on another parent; the accepted states are re-sent");
        self.parent = Some(p);
        self.failovers += 1;
        let mut rows = history.to_vec();
        rows.push(hidden);
        self.verify_upstream(0, Tensor::cat(&rows, 0)?, drafts)
            .await
    }

    /// Send a `Draft` to the parent and wait for its `Verdict`.
    async fn exchange_draft(&mut self, msg: Message) -> Result<Verdict> {
        let bytes = message_tensor_bytes(&msg);
        self.bytes_up += bytes;
        self.metrics.bytes_up.add(bytes);
        self.hops += 1;
        let addr = self.parent_addr();
        let rows = match &msg {
            Message::Draft(d) => d.positions.len(),
            _ => 1,
        };
        let wait = self.reply_deadline(rows);
        let mut up = self.take_upstream().await?;
        let exchange = async {
            up.send(&msg).await?;
            up.recv().await
        };
        let reply = match tokio::time::timeout(wait, exchange).await {
            Ok(r) => r,
            Err(_) => return Err(self.missed_deadline(wait)),
        };
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
