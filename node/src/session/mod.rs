//! One request at one tier, as a sans-IO state machine ([`Session`]) and the thin async
//! [`Driver`] that performs what it asks for.
//!
//! The session owns the decision (answer here, escalate, or answer degraded), the owed-KV
//! bookkeeping, fail-over and deadlines, and no IO and no clock: like quinn-proto and our
//! own [`crate::delta::DeltaReceiver`], it is fed inputs and hands out [`Action`]s.
//!
//! | input | when |
//! |---|---|
//! | [`Session::entry`] / [`Session::child`] | a client's request at the entry node / a child's stream (its `Open`) |
//! | [`Session::on_continue`], [`Session::on_draft`] | a child's message (upper tiers) |
//! | [`Session::on_step_output`] | the engine finished an [`Action::Compute`] |
//! | [`Session::on_reply`] | the parent answered an [`Action::Escalate`] / [`Action::Draft`] |
//! | [`Session::on_parent_lost`] | the upstream stream failed or closed |
//! | [`Session::on_timeout`] | [`Session::poll_timeout`] passed without a reply |
//! | [`Session::on_failed_over`] | the driver performed an [`Action::FailOver`] |
//!
//! Every upstream stream the driver opens starts with [`Session::open_message`] (protocol 4:
//! the ids, layer, policy and sampling go once per stream; `Continue` and `Draft` carry a
//! start position and tensors), so a stream opened after a fail-over is opened alike.
//!
//! Time is passed in (`now`): tokio's clock in the driver, virtual time in the tests
//! (`tests.rs`, with a quinn-style `Pair` of a session and a scripted parent and engine).
//!
//! Two transition sets share the session: **stepwise** (escalate, route, local: one
//! position per step, `stepwise.rs`) and **speculative** (the entry drafts rows at its exit,
//! the top tier verifies them in one pass, `speculative.rs`; the draft length adapts to
//! acceptance and round-trip time, `draft_len.rs`). Owed states: positions this
//! tier answered itself are *owed* to its parent — their states after this stage are kept
//! and sent as a backfill with the next escalation, so the parent's KV is always exact
//! (DESIGN.md §3, step 4). With more than one parent the session keeps the states of every
//! position (`history`); after a fail-over all of them are owed to the new parent (§8).
//!
//! Degradation goes through [`flow_partition::decide`]: an unreachable parent is treated as
//! lost (answer degraded from the local exit, fail over), and a deadline the parent would
//! likely miss (the child's `Continue.deadline_ms`) is answered degraded without asking.
//! A parent that misses the reply deadline is lost: the upstream stream is reset
//! ([`Action::ResetUpstream`]) so a late reply is never read as a later step's — and a reply
//! that still arrives for an older stream is ignored here.

#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

mod draft_len;
mod driver;
mod speculative;
mod stepwise;
pub mod wire;

#[cfg(test)]
mod pair;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_speculative;

use std::collections::VecDeque;
use std::time::Duration;

use candle_core::Tensor;
use flow_partition::{DegradePolicy, DegradeReason};
use flow_protocol::{
    Backfill, Encoding, InferMode, Message, Open, Policy, Role, Sampling, TokenOut,
};
use tokio::time::Instant;

use crate::engine::{Input, Stage, StepJob, StepOut};
use crate::error::{NodeError, Result};

pub use driver::{Driver, Event};
pub use wire::{choose, from_wire, measure, message_tensor_bytes, to_wire, wire_position};

use speculative::{ChildDraft, Spec};
use stepwise::Step;

/// What is fixed for a session's life.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Session id on this tier (engine KV and the upstream stream).
    pub id: u64,
    /// End-to-end request id.
    pub request: u64,
    pub role: Role,
    /// Layers (and exit) this session runs; its KV holds exactly these.
    pub stage: Stage,
    pub policy: Policy,
    pub sampling: Sampling,
    /// Whether this node has a parent.
    pub has_parent: bool,
    /// Keep the states of every position for a parent to take over (more than one parent).
    pub keep_history: bool,
    /// Wire encoding to the parent; `None` = the link's own.
    pub encoding: Option<Encoding>,
    pub degrade: DegradePolicy,
}

/// What the session reads of the parent link in use: queried, never awaited.
pub trait Uplink {
    /// For logs and errors.
    fn name(&self) -> String;
    /// Known down (connection lost or probes missed): not worth trying.
    fn is_down(&self) -> bool;
    /// How long a step of `rows` rows waits for the reply before the session asks whether
    /// the parent is still alive ([`Session::on_timeout`] or [`Session::on_parent_heard`]).
    fn reply_deadline(&self, rows: usize) -> Duration;
    /// The longest a reply is waited for while the parent is still heard from: a slow
    /// parent (overloaded, or its own parent slow) is not a lost one.
    fn patience(&self) -> Duration;
    /// Time within which a live parent is surely heard from (keep-alives, acknowledgements):
    /// the least time between two liveness checks.
    fn liveness_window(&self) -> Duration;
    /// Expected time until a reply is back and its spread (ms), for [`flow_partition::decide`].
    fn predicted_reply_ms(&self, rows: usize) -> (f64, f64);
    /// The link's configured encoding of hidden states.
    fn encoding(&self) -> Encoding;
}

/// What the session asks its driver to do, in order ([`Session::poll_action`]).
#[derive(Debug)]
pub enum Action {
    /// Run this step on the engine; report with [`Session::on_step_output`]. A verifying
    /// tier's pass over a draft is such a step (with logits for every drafted row).
    Compute(StepJob),
    /// Keep the session's KV for positions `..len` only (rejected drafts).
    Truncate(usize),
    /// Send this `Continue` to the parent on upstream `up` (open it when needed).
    Escalate { up: u64, msg: Message },
    /// Send this `Draft` to the parent on upstream `up` (open it when needed).
    Draft { up: u64, msg: Message },
    /// Drop the upstream stream: whatever it still carries must never be read.
    ResetUpstream,
    /// The parent is lost: switch to the next one and report with
    /// [`Session::on_failed_over`]. The session re-sends its owed states there.
    FailOver,
    /// The next answer comes from the local exit, marked degraded, for this reason.
    Degrade(DegradeReason),
    /// The parent took `elapsed` to answer a step of `rows` rows.
    ObserveReply { rows: usize, elapsed: Duration },
    /// Entry node: the next token of the request.
    Token { token: TokenOut, degraded: bool },
    /// Upper tier: the answer to the child's message.
    Reply(Message),
    /// Entry node: the request is complete (`"stop"` or `"length"`).
    Done { finish_reason: &'static str },
    /// The request (entry) or the child's message (upper tier) failed.
    Fail(NodeError),
}

/// Per-session counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionStats {
    /// Tensor bytes shipped upward.
    pub bytes_up: u64,
    /// Messages sent to a parent.
    pub hops: u32,
    /// Parents this session moved to after losing one.
    pub failovers: u32,
    /// Deadlines passed with the parent still heard from: the wait went on.
    pub slow_replies: u32,
    pub drafts_proposed: usize,
    pub drafts_accepted: usize,
}

/// A client's generation request at the entry node.
#[derive(Debug, Clone)]
pub struct EntryRequest {
    pub prompt: Vec<u32>,
    pub max_new_tokens: usize,
    /// Tokens that end the request (the client's and the model's EOS).
    pub stop: Vec<u32>,
}

/// Who gets the answers.
enum Flow {
    /// A child's stream: each message is answered with [`Action::Reply`].
    Child,
    /// A client's request: tokens go out as [`Action::Token`].
    Entry {
        max_new_tokens: usize,
        stop: Vec<u32>,
        produced: usize,
        /// Speculative rounds (entry node with a parent, `speculate` policy).
        spec: Option<Box<Spec>>,
    },
}

/// Work sent to the parent, waiting for its answer.
enum Upward {
    /// An escalated step: a `Tokens` reply answers it.
    Step(Step),
    /// The entry's draft round: `hidden` are its rows, a `Verdict` answers it.
    Round { hidden: Tensor },
    /// A child's draft, relayed: a `Verdict` answers it.
    Relay(ChildDraft),
}

/// What the session waits for.
enum Wait {
    /// The next input: a child's message (or nothing: the request is over).
    Idle,
    /// The engine's output for a stepwise step.
    Step(Step),
    /// The engine's output for step `i` of the entry's draft round.
    DraftStep(usize),
    /// The engine's output over a child's draft.
    ChildDraft(ChildDraft),
    /// The parent's reply on the current upstream.
    Reply {
        what: Upward,
        sent: Instant,
        /// When the parent's liveness is checked next.
        deadline: Instant,
        /// When the reply is given up even if the parent is still heard from.
        give_up: Instant,
        /// Time between liveness checks after the first deadline.
        recheck: Duration,
        rows: usize,
    },
    /// The driver's [`Session::on_failed_over`].
    FailOver { what: Upward, err: NodeError },
}

/// How long one exchange with the parent may take ([`Session::reply_wait`]).
#[derive(Debug, Clone, Copy)]
struct ReplyWait {
    /// Until the first liveness check.
    first: Duration,
    /// Until the reply is given up, however alive the parent: what the parent is told
    /// (`deadline_ms`) as its budget.
    total: Duration,
}

/// One request at one tier (see the module docs).
pub struct Session {
    cfg: SessionConfig,
    /// Origin of the millisecond clock given to [`flow_partition::decide`].
    epoch: Instant,
    flow: Flow,
    wait: Wait,
    /// States after this stage for positions `owed_start..` the parent has not seen.
    owed: Vec<Tensor>,
    owed_start: usize,
    /// States after this stage for positions `0..` (kept with `keep_history`, and by a
    /// stepwise session that passes steps past its exit: see `Session::keeps_states`).
    history: Vec<Tensor>,
    /// Positions this tier's KV holds (a child session: where its next message starts).
    kv_len: usize,
    /// Positions `0..exit_kv_len` the exit block's KV holds (stepwise: it lags `kv_len`
    /// while steps pass the exit, and is filled from `history` when the exit must answer).
    exit_kv_len: usize,
    /// Generation of the upstream stream; replies on older ones are ignored.
    up: u64,
    /// The parent in use, for errors.
    parent_name: String,
    /// The parent is gone for this request and none took over: answer locally.
    parent_failed: bool,
    /// Speculation lost its verifier: every later token is the entry's own, degraded.
    unverified: bool,
    /// End of the time budget the child gave the current step.
    budget_until: Option<Instant>,
    /// End of the time budget the child's `Open` gave the whole request.
    request_until: Option<Instant>,
    stats: SessionStats,
    actions: VecDeque<Action>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("id", &self.cfg.id)
            .field("role", &self.cfg.role)
            .field("stage", &self.cfg.stage)
            .field("stats", &self.stats)
            .finish()
    }
}

impl Session {
    fn new(cfg: SessionConfig, flow: Flow, now: Instant) -> Self {
        Self {
            cfg,
            epoch: now,
            flow,
            wait: Wait::Idle,
            owed: Vec::new(),
            owed_start: 0,
            history: Vec::new(),
            kv_len: 0,
            exit_kv_len: 0,
            up: 0,
            parent_name: String::new(),
            parent_failed: false,
            unverified: false,
            budget_until: None,
            request_until: None,
            stats: SessionStats::default(),
            actions: VecDeque::new(),
        }
    }

    /// A session serving a child's stream, made from its `Open` (`cfg` carries the
    /// `Open`'s ids, policy and sampling; `deadline_ms` is its request budget): idle until
    /// [`Self::on_continue`] or [`Self::on_draft`].
    pub fn child(cfg: SessionConfig, deadline_ms: Option<u32>, now: Instant) -> Self {
        let mut s = Self::new(cfg, Flow::Child, now);
        s.request_until = deadline_ms.map(|ms| now + Duration::from_millis(u64::from(ms)));
        s
    }

    /// A client's request at the entry node; its first actions are queued.
    pub fn entry(cfg: SessionConfig, req: EntryRequest, now: Instant) -> Self {
        let speculate = cfg.policy.mode == InferMode::Speculate && cfg.has_parent;
        let spec =
            speculate.then(|| Box::new(Spec::new(cfg.policy.draft_len as usize, &req.prompt)));
        let mut s = Self::new(
            cfg,
            Flow::Entry {
                max_new_tokens: req.max_new_tokens,
                stop: req.stop,
                produced: 0,
                spec,
            },
            now,
        );
        if req.max_new_tokens == 0 {
            s.push(Action::Done {
                finish_reason: "length",
            });
        } else if speculate {
            s.start_round(now);
        } else {
            s.begin_step(Input::Tokens(req.prompt), 0, None);
        }
        s
    }

    /// The next thing to do, if any.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// The first message of every upstream stream (sent by the driver when it opens one,
    /// before the stream's first `Continue` or `Draft`; the parent does not answer it): this
    /// session's ids, the layer its states leave at, its policy and sampling, and what is
    /// left of the child's request budget.
    pub fn open_message(&self, now: Instant) -> Message {
        Message::Open(Open {
            request_id: self.cfg.request,
            session_id: self.cfg.id,
            layer: self.cfg.stage.b as u32,
            policy: self.cfg.policy.clone(),
            sampling: self.cfg.sampling.clone(),
            deadline_ms: self.request_until.map(|t| {
                let left = t.saturating_duration_since(now).as_millis();
                u32::try_from(left).unwrap_or(u32::MAX)
            }),
        })
    }

    /// When [`Self::on_timeout`] is due: the deadline of the reply waited for.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match &self.wait {
            Wait::Reply { deadline, .. } => Some(*deadline),
            _ => None,
        }
    }

    pub fn id(&self) -> u64 {
        self.cfg.id
    }

    pub fn stage(&self) -> Stage {
        self.cfg.stage
    }

    pub fn stats(&self) -> SessionStats {
        self.stats
    }

    /// Whether this session is waiting for nothing (a child session between messages).
    pub fn is_idle(&self) -> bool {
        matches!(self.wait, Wait::Idle)
    }

    /// The engine finished the step of the last [`Action::Compute`].
    pub fn on_step_output(&mut self, out: StepOut, now: Instant, link: Option<&dyn Uplink>) {
        let r = match std::mem::replace(&mut self.wait, Wait::Idle) {
            Wait::Step(step) => self.step_output(step, out, now, link),
            Wait::DraftStep(i) => self.draft_output(i, out, now, link),
            Wait::ChildDraft(c) => self.child_draft_output(c, out, now, link),
            other => {
                self.wait = other;
                Err(NodeError::Internal("engine output nobody asked for".into()))
            }
        };
        self.check(r);
    }

    /// The parent's reply on upstream `up`. A reply on an older upstream (reset after a
    /// missed deadline or a fail-over), or one nobody waits for, is ignored.
    pub fn on_reply(&mut self, up: u64, msg: Message, now: Instant) {
        if up != self.up {
            tracing::debug!(
                session = self.cfg.id,
                kind = msg.name(),
                "ignored a reply on a reset upstream"
            );
            return;
        }
        let Wait::Reply {
            what, sent, rows, ..
        } = std::mem::replace(&mut self.wait, Wait::Idle)
        else {
            tracing::debug!(
                session = self.cfg.id,
                kind = msg.name(),
                "ignored a reply nobody waits for"
            );
            return;
        };
        let r = match (what, msg) {
            (Upward::Step(step), Message::Tokens(t)) => {
                self.push(Action::ObserveReply {
                    rows,
                    elapsed: now.saturating_duration_since(sent),
                });
                self.step_reply(step, t)
            }
            (Upward::Round { hidden }, Message::Verdict(v)) => {
                let round_s = now.saturating_duration_since(sent).as_secs_f64();
                self.round_verdict(hidden, v, round_s, now)
            }
            (Upward::Relay(c), Message::Verdict(v)) => self.finish_child_draft(c, v),
            (what, Message::Error(e)) => {
                // A refusal of what was sent (a layer the parent does not host, a malformed
                // message) is a configuration error: it fails over, but never degrades.
                let err = if e.code.is_refusal() {
                    NodeError::Protocol(format!(
                        "parent {} refused: {}",
                        self.parent_name, e.message
                    ))
                } else {
                    self.parent_error(format!("{:?}: {}", e.code, e.message))
                };
                self.lose(what, err);
                Ok(())
            }
            (what, other) => {
                let err = self.parent_error(format!("unexpected {} in reply", other.name()));
                self.lose(what, err);
                Ok(())
            }
        };
        self.check(r);
    }

    /// Upstream `up` failed (could not be opened, a send or receive failed, or the parent
    /// closed it).
    pub fn on_parent_lost(&mut self, up: u64, err: NodeError, _now: Instant) {
        if up != self.up {
            return;
        }
        if let Wait::Reply { what, .. } = std::mem::replace(&mut self.wait, Wait::Idle) {
            self.lose(what, err);
        }
    }

    /// The reply's deadline passed but the parent was heard from since the last check
    /// (its connection carried packets: it is alive, only slow): wait on until the next
    /// check, at most until the give-up time; past that it is lost as on
    /// [`Self::on_timeout`]. Before the deadline this does nothing.
    pub fn on_parent_heard(&mut self, now: Instant) {
        let Wait::Reply {
            deadline,
            give_up,
            recheck,
            ..
        } = &mut self.wait
        else {
            return;
        };
        if now < *deadline {
            return;
        }
        if now < *give_up {
            *deadline = (now + *recheck).min(*give_up);
            self.stats.slow_replies += 1;
            tracing::debug!(
                session = self.cfg.id,
                parent = %self.parent_name,
                "the parent is slow but alive; waiting on"
            );
            return;
        }
        self.on_timeout(now);
    }

    /// Time passed; a reply not back by its deadline loses the parent (the driver found
    /// it silent since the last check, or waited as long as the session allows).
    pub fn on_timeout(&mut self, now: Instant) {
        let due = matches!(&self.wait, Wait::Reply { deadline, .. } if now >= *deadline);
        if !due {
            return;
        }
        if let Wait::Reply {
            what,
            sent,
            deadline,
            ..
        } = std::mem::replace(&mut self.wait, Wait::Idle)
        {
            let ms = deadline.saturating_duration_since(sent).as_millis();
            let err = self.parent_error(format!("no reply within the {ms} ms deadline"));
            self.lose(what, err);
        }
    }

    /// The driver performed [`Action::FailOver`]: `link` is the parent that takes over, or
    /// `None` when there is none.
    pub fn on_failed_over(&mut self, now: Instant, link: Option<&dyn Uplink>) {
        let Wait::FailOver { what, err } = std::mem::replace(&mut self.wait, Wait::Idle) else {
            return;
        };
        let switched = link.is_some() && self.cfg.keep_history;
        if switched {
            self.stats.failovers += 1;
        }
        let r = match what {
            Upward::Step(step) => self.step_after_loss(step, switched, err, now, link),
            Upward::Round { hidden } => self.round_after_loss(hidden, switched, err, now, link),
            Upward::Relay(c) => self.relay_after_loss(c, switched, err, now, link),
        };
        self.check(r);
    }

    // ----- shared transitions -------------------------------------------------------------

    fn push(&mut self, a: Action) {
        self.actions.push_back(a);
    }

    fn check(&mut self, r: Result<()>) {
        if let Err(e) = r {
            self.wait = Wait::Idle;
            self.push(Action::Fail(e));
        }
    }

    /// A child's message while the last one is still being answered: fail it.
    fn busy(&mut self, kind: &str) -> bool {
        if self.is_idle() {
            return false;
        }
        let e = format!("a {kind} before the previous message was answered");
        self.check(Err(NodeError::Protocol(e)));
        true
    }

    fn parent_error(&self, msg: String) -> NodeError {
        NodeError::Parent {
            addr: self.parent_name.clone(),
            msg,
        }
    }

    /// The parent failed `what`: reset the upstream and fail over; a relayed draft with no
    /// history to move (a single parent) fails instead (the child decides).
    fn lose(&mut self, what: Upward, err: NodeError) {
        tracing::warn!(session = self.cfg.id, error = %err, "parent lost");
        self.push(Action::ResetUpstream);
        self.up += 1;
        if let (Upward::Relay(_), false) = (&what, self.cfg.keep_history) {
            self.check(Err(err));
            return;
        }
        self.push(Action::FailOver);
        self.wait = Wait::FailOver { what, err };
    }

    /// Send `msg` (a `Continue` when `escalate`, else a `Draft`) carrying `rows` rows, and
    /// wait up to `wait` for the reply.
    fn send(
        &mut self,
        what: Upward,
        msg: Message,
        rows: usize,
        wait: ReplyWait,
        now: Instant,
        link: &dyn Uplink,
    ) {
        self.stats.bytes_up += message_tensor_bytes(&msg);
        self.stats.hops += 1;
        self.parent_name = link.name();
        let up = self.up;
        self.push(if matches!(msg, Message::Continue(_)) {
            Action::Escalate { up, msg }
        } else {
            Action::Draft { up, msg }
        });
        self.wait = Wait::Reply {
            what,
            sent: now,
            deadline: now + wait.first,
            give_up: now + wait.total,
            recheck: wait.first.max(link.liveness_window()),
            rows,
        };
    }

    /// How long a step of `rows` rows may wait for the parent: the link's deadline before
    /// the first liveness check and its patience in all, within the child's budget (a
    /// tenth of what is left kept for the reply's way back).
    fn reply_wait(&self, link: &dyn Uplink, rows: usize, now: Instant) -> ReplyWait {
        let first = link.reply_deadline(rows);
        let total = link.patience().max(first);
        let within = |d: Duration| match self.budget_until {
            Some(until) => {
                let left = until.saturating_duration_since(now);
                d.min(left.saturating_sub(left / 10))
            }
            None => d,
        };
        ReplyWait {
            first: within(first),
            total: within(total),
        }
    }

    /// End of a child's step given `deadline_ms` from now, within the request's budget.
    fn step_budget(&self, deadline_ms: Option<u32>, now: Instant) -> Option<Instant> {
        let step = deadline_ms.map(|ms| now + Duration::from_millis(u64::from(ms)));
        match (step, self.request_until) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn encoding(&self, link: &dyn Uplink) -> Encoding {
        self.cfg.encoding.unwrap_or_else(|| link.encoding())
    }

    fn ms(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_millis() as u64
    }

    /// The owed states as the backfill of a step starting at `start`; afterwards nothing
    /// up to `end` is owed.
    fn take_owed(&mut self, start: usize, end: usize, enc: Encoding) -> Result<Option<Backfill>> {
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
                start: wire_position(self.owed_start)?,
                hidden: to_wire(&h, enc)?,
            })
        };
        self.owed.clear();
        self.owed_start = end;
        Ok(backfill)
    }

    /// Exit point of this stage, if it hosts one.
    fn exit_point(&self) -> Option<u32> {
        let st = self.cfg.stage;
        st.exit.then_some(st.b as u32)
    }
}
