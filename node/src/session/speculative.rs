//! Speculative transitions: the entry node drafts rows at its exit and sends them up in one
//! `Draft`; the top tier verifies them in one batched pass (tiers between relay them) and
//! answers with a `Verdict`; every tier keeps the KV of what was accepted.

use candle_core::Tensor;
use flow_partition::DegradeReason;
use flow_protocol::{Draft, Message, TokenOut, Verdict};
use tokio::time::Instant;

use super::draft_len::DraftLen;
use super::wire::wire_position;
use super::{choose, from_wire, to_wire, Action, Flow, Session, Uplink, Upward, Wait};
use crate::engine::{Input, StepJob, StepOut};
use crate::error::{NodeError, Result};

/// The entry node's speculation state.
pub(super) struct Spec {
    /// Tokens drafted per round (adaptive, at most the policy's `draft_len`).
    len: DraftLen,
    /// Accepted tokens the verifier has not processed yet, from position `s`.
    pending: Vec<u32>,
    s: usize,
    round: Round,
}

/// One draft round: `pending` plus `drafts_n` drafted tokens, row by row.
#[derive(Default)]
struct Round {
    drafts_n: usize,
    rows: Vec<Tensor>,
    drafts: Vec<u32>,
    /// Position of the next input.
    pos: usize,
    feed: Vec<u32>,
    /// When the round started and how long its drafting took (seconds).
    started: Option<Instant>,
    draft_s: f64,
}

impl Spec {
    pub(super) fn new(n: usize, prompt: &[u32]) -> Self {
        Self {
            len: DraftLen::new(n),
            pending: prompt.to_vec(),
            s: 0,
            round: Round::default(),
        }
    }
}

/// A drafted token of the entry node (no verified log-probability).
fn draft_token(id: u32, position: usize, tier: flow_protocol::Role, exit: u32) -> TokenOut {
    TokenOut {
        id,
        position: position as u32,
        tier,
        exit,
        confidence: 1.0,
        logprob: f32::NAN,
        top_logprobs: Vec::new(),
    }
}

/// A child's draft at this tier: positions `start..start + r + n`, the last `n` drafted.
pub(super) struct ChildDraft {
    draft: Draft,
    start: usize,
    n: usize,
    r: usize,
    /// This stage's rows for the draft, once relayed (kept to move the session to
    /// another parent).
    out: Option<Tensor>,
}

impl Session {
    fn spec_mut(&mut self) -> Result<&mut Spec> {
        match &mut self.flow {
            Flow::Entry { spec: Some(s), .. } => Ok(&mut **s),
            _ => Err(NodeError::Internal("no speculation in this session".into())),
        }
    }

    /// Start a round: the controller's draft length, as far as the request still has room
    /// (at least one).
    pub(super) fn start_round(&mut self, now: Instant) {
        let r = (|| {
            let left = match &self.flow {
                Flow::Entry {
                    max_new_tokens,
                    produced,
                    ..
                } => max_new_tokens.saturating_sub(*produced),
                Flow::Child => 0,
            };
            let spec = self.spec_mut()?;
            let n = spec.len.get();
            let drafts_n = left.min(n + 1).saturating_sub(1).clamp(1, n);
            spec.round = Round {
                drafts_n,
                rows: Vec::with_capacity(drafts_n + 1),
                drafts: Vec::with_capacity(drafts_n),
                pos: spec.s,
                feed: spec.pending.clone(),
                started: Some(now),
                draft_s: 0.0,
            };
            self.draft_step(0)
        })();
        self.check(r);
    }

    /// Run step `i` of the round: the pending rows (`i == 0`) or the last draft.
    fn draft_step(&mut self, i: usize) -> Result<()> {
        let (session, stage) = (self.cfg.id, self.cfg.stage);
        let round = &self.spec_mut()?.round;
        let job = StepJob {
            session,
            start: round.pos,
            input: Input::Tokens(round.feed.clone()),
            backfill: None,
            logit_rows: usize::from(i < round.drafts_n),
            exit_kv: true,
            exit_backfill: None,
            stage: Some(stage),
        };
        self.push(Action::Compute(job));
        self.wait = Wait::DraftStep(i);
        Ok(())
    }

    pub(super) fn draft_output(
        &mut self,
        i: usize,
        out: StepOut,
        now: Instant,
        link: Option<&dyn Uplink>,
    ) -> Result<()> {
        let sampling = self.cfg.sampling.clone();
        let spec = self.spec_mut()?;
        let round = &mut spec.round;
        round.pos += round.feed.len();
        round.rows.push(out.hidden);
        if i < round.drafts_n {
            let row = out
                .logits
                .as_ref()
                .and_then(|l| l.last())
                .ok_or_else(|| NodeError::Internal("draft without logits".into()))?;
            let d = choose(row, &sampling, round.pos);
            round.drafts.push(d);
            round.feed = vec![d];
            return self.draft_step(i + 1);
        }
        let hidden = Tensor::cat(&round.rows, 0)?;
        round.draft_s = round
            .started
            .map_or(0.0, |t| now.saturating_duration_since(t).as_secs_f64());
        let (s, drafts) = (spec.s, round.drafts.clone());
        self.stats.drafts_proposed += drafts.len();
        self.send_round(s, hidden.clone(), hidden, drafts, now, link)
    }

    /// Send rows `start..` (`send`, ending with the round's rows `hidden`) for verification.
    fn send_round(
        &mut self,
        start: usize,
        send: Tensor,
        hidden: Tensor,
        drafts: Vec<u32>,
        now: Instant,
        link: Option<&dyn Uplink>,
    ) -> Result<()> {
        let link =
            link.ok_or_else(|| NodeError::Internal("speculation without a parent".into()))?;
        if link.is_down() {
            self.parent_name = link.name();
            let err = self.parent_error("the parent link is down".into());
            self.lose(Upward::Round { hidden }, err);
            return Ok(());
        }
        let enc = self.encoding(link);
        let rows = send.dim(0)?;
        let msg = Message::Draft(Draft {
            start: wire_position(start)?,
            tokens: drafts,
            hidden: to_wire(&send, enc)?,
            deadline_ms: None,
        });
        let wait = self.reply_wait(link, rows, now);
        self.send(Upward::Round { hidden }, msg, rows, wait, now, link);
        Ok(())
    }

    /// The verdict on the round (`round_s` after the draft was sent): keep the KV of the
    /// accepted rows, emit the accepted drafts and the verifier's token, adapt the draft
    /// length and start the next round.
    pub(super) fn round_verdict(
        &mut self,
        hidden: Tensor,
        v: Verdict,
        round_s: f64,
        now: Instant,
    ) -> Result<()> {
        let (role, exit) = (self.cfg.role, self.cfg.stage.b as u32);
        let spec = self.spec_mut()?;
        let drafts = std::mem::take(&mut spec.round.drafts);
        let a = (v.accepted as usize).min(drafts.len());
        spec.len
            .observe(drafts.len(), a, spec.round.draft_s, round_s);
        let (s, r) = (spec.s, spec.pending.len());
        spec.s += r + a;
        spec.pending = vec![v.next_token];
        self.stats.drafts_accepted += a;
        if self.cfg.keep_history {
            self.history.push(hidden.narrow(0, 0, r + a)?);
        }
        self.push(Action::Truncate(s + r + a));
        let accepted = drafts[..a]
            .iter()
            .enumerate()
            .map(|(i, &d)| draft_token(d, s + r + i, role, exit));
        let verified = TokenOut {
            id: v.next_token,
            position: (s + r + a) as u32,
            tier: v.tier,
            exit: v.exit,
            confidence: 1.0,
            logprob: f32::NAN,
            top_logprobs: Vec::new(),
        };
        for t in accepted
            .chain(std::iter::once(verified))
            .collect::<Vec<_>>()
        {
            if !self.emit(t, false) {
                return Ok(());
            }
        }
        self.start_round(now);
        Ok(())
    }

    /// The round's parent was lost: on the new parent, the session starts over from
    /// position 0 with the rows of every accepted position in front of the round's.
    pub(super) fn round_after_loss(
        &mut self,
        hidden: Tensor,
        switched: bool,
        err: NodeError,
        now: Instant,
        link: Option<&dyn Uplink>,
    ) -> Result<()> {
        if !switched {
            if !matches!(err, NodeError::Parent { .. }) {
                return Err(err);
            }
            return self.round_unverified(hidden, err);
        }
        let drafts = self.spec_mut()?.round.drafts.clone();
        tracing::warn!(session = self.cfg.id, error = %err, "speculation continues on another parent; the accepted states are re-sent");
        let mut rows = self.history.clone();
        rows.push(hidden.clone());
        let all = Tensor::cat(&rows, 0)?;
        self.send_round(0, all, hidden, drafts, now, link)
    }

    /// No parent can verify any more (the last one was lost, or the tiers above it are
    /// gone): the round's drafts are answered as they are, marked degraded, and the rest of
    /// the request is generated from this node's exit, every token degraded — the deepest
    /// exit the entry node still reaches. Nothing already streamed changes.
    fn round_unverified(&mut self, hidden: Tensor, err: NodeError) -> Result<()> {
        tracing::warn!(session = self.cfg.id, error = %err, "no parent can verify; answering from this node's exit, degraded");
        let (role, exit) = (self.cfg.role, self.cfg.stage.b as u32);
        let spec = match &mut self.flow {
            Flow::Entry { spec, .. } => spec
                .take()
                .ok_or_else(|| NodeError::Internal("no speculation in this session".into()))?,
            Flow::Child => return Err(err),
        };
        let (s, r, drafts) = (spec.s, spec.pending.len(), spec.round.drafts);
        self.parent_failed = true;
        self.unverified = true;
        if self.cfg.keep_history {
            self.history.push(hidden);
        }
        let Some((&last, _)) = drafts.split_last() else {
            return Err(err);
        };
        for (i, &d) in drafts.iter().enumerate() {
            self.push(Action::Degrade(DegradeReason::ParentUnreachable));
            if !self.emit(draft_token(d, s + r + i, role, exit), true) {
                return Ok(());
            }
        }
        // The last draft's row is in the KV without logits: run it again for the next token.
        let at = s + r + drafts.len() - 1;
        self.push(Action::Truncate(at));
        self.kv_len = at;
        if self.cfg.keep_history {
            let total: usize = self.history.iter().map(|t| t.dim(0).unwrap_or(0)).sum();
            if let Some(h) = self.history.pop() {
                let keep = h.dim(0)? - (total - at);
                if keep > 0 {
                    self.history.push(h.narrow(0, 0, keep)?);
                }
            }
        }
        // The drafter ran its exit on every row: the exit's KV holds `0..at` too.
        self.exit_kv_len = at;
        self.begin_step(Input::Tokens(vec![last]), at, None);
        Ok(())
    }

    /// A child's `Draft`: run this stage over its rows, then verify (no parent) or relay.
    pub fn on_draft(&mut self, d: Draft, hidden_size: usize, now: Instant) {
        if self.busy("Draft") {
            return;
        }
        let r = (|| {
            d.validate().map_err(flow_protocol::Error::from)?;
            let start = d.start as usize;
            let hidden = from_wire(&d.hidden, hidden_size)?;
            let (rows, n) = (d.rows(), d.tokens.len());
            if start != self.kv_len {
                return Err(NodeError::Protocol(format!(
                    "Draft starts at position {start}, but this session holds positions 0..{}",
                    self.kv_len
                )));
            }
            Ok((start, hidden, rows, n))
        })();
        let (start, hidden, rows, n) = match r {
            Ok(x) => x,
            Err(e) => return self.check(Err(e)),
        };
        self.budget_until = self.step_budget(d.deadline_ms, now);
        let verify = !self.cfg.has_parent;
        self.push(Action::Compute(StepJob {
            session: self.cfg.id,
            start,
            input: Input::Hidden(hidden),
            backfill: None,
            logit_rows: if verify { n + 1 } else { 0 },
            exit_kv: verify,
            exit_backfill: None,
            stage: Some(self.cfg.stage),
        }));
        self.wait = Wait::ChildDraft(ChildDraft {
            draft: d,
            start,
            n,
            r: rows - n,
            out: None,
        });
    }

    pub(super) fn child_draft_output(
        &mut self,
        c: ChildDraft,
        out: StepOut,
        now: Instant,
        link: Option<&dyn Uplink>,
    ) -> Result<()> {
        if !self.cfg.has_parent {
            let logits = out
                .logits
                .ok_or_else(|| NodeError::Internal("verifier without logits".into()))?;
            // logits[i] predicts position start + r + i (i = 0..=n).
            let (mut accepted, mut next) = (0, 0);
            for (i, row) in logits.iter().enumerate() {
                let v = choose(row, &self.cfg.sampling, c.start + c.r + i);
                if i < c.n && v == c.draft.tokens[i] {
                    accepted += 1;
                } else {
                    next = v;
                    break;
                }
            }
            let v = Verdict {
                request_id: self.cfg.request,
                session_id: self.cfg.id,
                accepted,
                next_token: next,
                tier: self.cfg.role,
                exit: self.exit_point().unwrap_or(0),
            };
            return self.finish_child_draft(c, v);
        }
        let link = link.ok_or_else(|| NodeError::Internal("relay without a parent".into()))?;
        self.parent_name = link.name();
        let mut c = c;
        c.out = Some(out.hidden.clone());
        if link.is_down() {
            let err = self.parent_error("the parent link is down".into());
            self.lose(Upward::Relay(c), err);
            return Ok(());
        }
        let enc = self.encoding(link);
        let rows = out.hidden.dim(0)?;
        let d = &c.draft;
        let msg = Message::Draft(Draft {
            start: d.start,
            tokens: d.tokens.clone(),
            hidden: to_wire(&out.hidden, enc)?,
            deadline_ms: d.deadline_ms,
        });
        let wait = self.reply_wait(link, rows, now);
        self.send(Upward::Relay(c), msg, rows, wait, now, link);
        Ok(())
    }

    /// Keep the KV of the rows up to the last accepted draft and answer the child.
    pub(super) fn finish_child_draft(&mut self, c: ChildDraft, v: Verdict) -> Result<()> {
        if v.accepted as usize > c.n {
            return Err(NodeError::Protocol(
                "verdict accepts more than drafted".into(),
            ));
        }
        let len = c.start + c.r + v.accepted as usize;
        if let (true, Some(out)) = (self.cfg.keep_history, &c.out) {
            self.history
                .push(out.narrow(0, 0, c.r + v.accepted as usize)?);
        }
        self.kv_len = len;
        self.push(Action::Truncate(len));
        self.push(Action::Reply(Message::Verdict(v)));
        Ok(())
    }
    /// A relayed draft's parent was lost: on the new parent the session starts over from
    /// position 0, this stage's rows of every accepted position in front of the draft's
    /// (the entry's [`Self::round_after_loss`], one tier up). No other parent: the child
    /// gets the error and decides (it degrades to its own exit).
    pub(super) fn relay_after_loss(
        &mut self,
        c: ChildDraft,
        switched: bool,
        err: NodeError,
        now: Instant,
        link: Option<&dyn Uplink>,
    ) -> Result<()> {
        let (true, Some(link), Some(out)) = (switched, link, c.out.clone()) else {
            return Err(err);
        };
        tracing::warn!(session = self.cfg.id, error = %err, "relaying the draft to another parent; the accepted states are re-sent");
        let mut rows = self.history.clone();
        rows.push(out);
        let all = Tensor::cat(&rows, 0)?;
        let total = all.dim(0)?;
        let enc = self.encoding(link);
        let d = &c.draft;
        let msg = Message::Draft(Draft {
            start: 0,
            tokens: d.tokens.clone(),
            hidden: to_wire(&all, enc)?,
            deadline_ms: d.deadline_ms,
        });
        let wait = self.reply_wait(link, total, now);
        self.send(Upward::Relay(c), msg, total, wait, now, link);
        Ok(())
    }
}
