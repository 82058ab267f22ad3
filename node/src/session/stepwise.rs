//! Stepwise transitions (escalate, route, local): one step = the rows of one message or
//! token, answered here, by the parent, or degraded from the local exit.

use candle_core::Tensor;
use flow_familial::confidence::Confidence;
use flow_partition::{decide, DegradeDecision, DegradeReason, EscalationContext};
use flow_protocol::{Continue, InferMode, Message, TokenOut, Tokens};
use tokio::time::Instant;

use super::wire::{logprobs, wire_position};
use super::{choose, from_wire, measure, to_wire, Action, Flow, Session, Uplink, Upward, Wait};
use crate::engine::{Input, StepJob, StepOut};
use crate::error::{NodeError, Result};

/// What a tier decides for one position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Decision {
    Answer,
    Escalate,
}

/// A step in flight: positions `start..start + rows`, answering position `start + rows`.
pub(super) struct Step {
    start: usize,
    /// Known once the engine's output is in.
    rows: usize,
    /// The decision fixed before computing (policy, stage), if any.
    pre: Option<Decision>,
    /// The local exit's confidence and logits for the answered position, when computed.
    local: Option<(Confidence, Vec<f32>)>,
    /// The step's states after this stage, while they may still go to a parent.
    hidden: Option<Tensor>,
    /// The step's input, kept when this tier passes the step up without its exit: if no
    /// parent can answer, the step runs again here with the exit (see
    /// `Session::keeps_exit_kv`).
    input: Option<Input>,
    /// Whether the step ran this tier's exit block.
    exit: bool,
}

impl Step {
    fn position(&self) -> usize {
        self.start + self.rows
    }
}

impl Session {
    /// A child's `Continue`: check its shape and positions against this tier's KV, then
    /// run the step.
    pub fn on_continue(&mut self, c: Continue, hidden_size: usize, now: Instant) {
        if self.busy("Continue") {
            return;
        }
        let r = (|| {
            c.validate().map_err(flow_protocol::Error::from)?;
            let start = c.start as usize;
            let h = from_wire(&c.hidden, hidden_size)?;
            let backfill = match &c.backfill {
                Some(bf) => Some((bf.start as usize, from_wire(&bf.hidden, hidden_size)?)),
                None => None,
            };
            let first = backfill.as_ref().map_or(start, |(s, _)| *s);
            if first != self.kv_len {
                return Err(NodeError::Protocol(format!(
                    "Continue starts at position {first}, but this session holds positions 0..{}",
                    self.kv_len
                )));
            }
            Ok((start, h, backfill))
        })();
        match r {
            Ok((start, h, backfill)) => {
                self.budget_until = self.step_budget(c.deadline_ms, now);
                self.begin_step(Input::Hidden(h), start, backfill);
            }
            Err(e) => self.check(Err(e)),
        }
    }

    /// Whether the decision at this tier is fixed before computing anything.
    fn predetermined(&self) -> Option<Decision> {
        let Some(exit) = self.exit_point() else {
            return Some(Decision::Escalate);
        };
        if !self.cfg.has_parent {
            return Some(Decision::Answer);
        }
        let p = &self.cfg.policy;
        match p.mode {
            InferMode::Local => Some(Decision::Answer),
            InferMode::Route => match p.answer_exit {
                Some(e) if e > exit => Some(Decision::Escalate),
                _ => Some(Decision::Answer),
            },
            InferMode::Escalate if p.threshold_for(exit) > 1.0 && p.measure_is_bounded() => {
                Some(Decision::Escalate)
            }
            InferMode::Escalate | InferMode::Speculate => None,
        }
    }

    /// Run positions `start..` of `input` (after an optional backfill of positions this
    /// stage missed).
    pub(super) fn begin_step(
        &mut self,
        input: Input,
        start: usize,
        backfill: Option<(usize, Tensor)>,
    ) {
        let pre = self.predetermined();
        // After the parent failed, this tier answers whatever it would have escalated.
        let local =
            pre != Some(Decision::Escalate) || (self.parent_failed && self.exit_point().is_some());
        let fallback = !local && self.keeps_exit_kv();
        // The exit block catches up on the positions it skipped (from the kept states)
        // before it runs again.
        let first = backfill.as_ref().map_or(start, |(s, _)| *s);
        let exit_backfill = if local && self.exit_kv_len < first {
            match self.history_rows(self.exit_kv_len, first) {
                Ok(h) => Some((self.exit_kv_len, h)),
                Err(e) => return self.check(Err(e)),
            }
        } else {
            None
        };
        self.push(Action::Compute(StepJob {
            session: self.cfg.id,
            start,
            input: input.clone(),
            backfill,
            logit_rows: usize::from(local),
            exit_kv: local,
            exit_backfill,
            stage: Some(self.cfg.stage),
        }));
        self.wait = Wait::Step(Step {
            start,
            rows: 0,
            pre,
            local: None,
            hidden: None,
            input: fallback.then_some(input),
            exit: local,
        });
    }

    /// A step this tier always passes up (`route` past its exit, escalate-always) skips
    /// the exit block (one block per token: ~3 % of SmolLM2's 30 layers, more of a tier's
    /// share) but keeps its states after this stage, so that if no parent can answer,
    /// this exit answers — the deepest one still reachable — after running its block
    /// over the skipped positions in one batch, instead of the request failing or
    /// attending over a cache with holes.
    fn keeps_exit_kv(&self) -> bool {
        self.cfg.has_parent && self.exit_point().is_some()
    }

    /// Whether this session keeps its states after this stage for every position: for a
    /// fail-over to another parent (`keep_history`) or to fill the exit block's KV.
    pub(super) fn keeps_states(&self) -> bool {
        self.cfg.keep_history || self.keeps_exit_kv()
    }

    /// Kept states for positions `from..to`, as one tensor.
    fn history_rows(&self, from: usize, to: usize) -> Result<Tensor> {
        let have: usize = self.history.iter().map(|t| t.dim(0).unwrap_or(0)).sum();
        if !self.keeps_states() || to > have || from >= to {
            return Err(NodeError::Internal(format!(
                "the exit needs states for positions {from}..{to}, but the session kept 0..{have}"
            )));
        }
        Ok(Tensor::cat(&self.history, 0)?.narrow(0, from, to - from)?)
    }

    pub(super) fn step_output(
        &mut self,
        mut step: Step,
        out: StepOut,
        now: Instant,
        link: Option<&dyn Uplink>,
    ) -> Result<()> {
        step.rows = out.hidden.dim(0)?;
        self.kv_len = step.position();
        if step.exit {
            self.exit_kv_len = step.position();
        }
        let keep = self.keeps_states();
        if let Some(bf) = out.backfill_hidden {
            if keep {
                self.history.push(bf.clone());
            }
            self.owed.push(bf);
        }
        if keep {
            self.history.push(out.hidden.clone());
        }
        step.local = out
            .logits
            .as_ref()
            .and_then(|l| l.last())
            .map(|row| (Confidence::of_row(row), row.clone()));
        let decision = match (step.pre, &step.local) {
            (Some(d), _) => d,
            (None, Some((c, _))) => {
                let exit = self.exit_point().unwrap_or(0);
                let p = &self.cfg.policy;
                if c.score(measure(p)) >= p.threshold_for(exit) {
                    Decision::Answer
                } else {
                    Decision::Escalate
                }
            }
            (None, None) => Decision::Escalate,
        };
        if decision == Decision::Answer || (self.parent_failed && step.local.is_some()) {
            let degraded = decision == Decision::Escalate || self.unverified;
            if degraded {
                // The parent is gone for this request: answer from the local exit.
                self.push(Action::Degrade(DegradeReason::ParentUnreachable));
            }
            self.owed.push(out.hidden);
            return self.answer_locally(step, degraded);
        }
        step.hidden = Some(out.hidden);
        self.escalate_or_degrade(step, now, link)
    }

    /// [`flow_partition::decide`]: escalate; answer degraded when the parent would miss
    /// the child's deadline; treat an unreachable parent as lost.
    fn escalate_or_degrade(
        &mut self,
        mut step: Step,
        now: Instant,
        link: Option<&dyn Uplink>,
    ) -> Result<()> {
        let link = link.ok_or_else(|| NodeError::Internal("escalation without a parent".into()))?;
        let owed: usize = self.owed.iter().map(|t| t.dim(0).unwrap_or(0)).sum();
        let rows = step.rows + owed;
        let (predicted, spread) = link.predicted_reply_ms(rows);
        let ctx = EscalationContext {
            now_ms: self.ms(now),
            deadline_ms: self.budget_until.map(|t| self.ms(t)),
            predicted_parent_ms: predicted,
            predicted_parent_std_ms: spread,
            parent_reachable: !link.is_down(),
            has_local_exit: step.local.is_some(),
        };
        match decide(&self.cfg.degrade, &ctx).unwrap_or(DegradeDecision::Escalate) {
            DegradeDecision::Escalate => self.escalate(step, now, link),
            DegradeDecision::AnswerLocally {
                reason: reason @ DegradeReason::DeadlineTooClose { .. },
            } => {
                tracing::debug!(
                    session = self.cfg.id,
                    ?reason,
                    "the parent would miss the deadline; answering degraded"
                );
                self.push(Action::Degrade(reason));
                // Not sent: the parent still needs these states.
                if let Some(h) = step.hidden.take() {
                    self.owed.push(h);
                }
                self.answer_locally(step, true)
            }
            DegradeDecision::AnswerLocally { .. } | DegradeDecision::Fail { .. } => {
                self.parent_name = link.name();
                let err = self.parent_error(
                    "the parent link is down (connection lost or probes missed)".into(),
                );
                self.lose(Upward::Step(step), err);
                Ok(())
            }
        }
    }

    /// Ship the owed rows as a backfill and the step's rows as the input.
    fn escalate(&mut self, step: Step, now: Instant, link: &dyn Uplink) -> Result<()> {
        let hidden = step
            .hidden
            .clone()
            .ok_or_else(|| NodeError::Internal("escalating a step without its states".into()))?;
        let enc = self.encoding(link);
        let (start, rows) = (step.start, step.rows);
        let backfill = self.take_owed(start, start + rows, enc)?;
        let total = rows + backfill.as_ref().map_or(0, |b| b.rows());
        let wait = self.reply_wait(link, total, now);
        let msg = Message::Continue(Continue {
            start: wire_position(start)?,
            hidden: to_wire(&hidden, enc)?,
            backfill,
            deadline_ms: Some(u32::try_from(wait.total.as_millis()).unwrap_or(u32::MAX)),
        });
        self.send(Upward::Step(step), msg, total, wait, now, link);
        Ok(())
    }

    /// The parent's `Tokens` for an escalated step.
    pub(super) fn step_reply(&mut self, step: Step, t: Tokens) -> Result<()> {
        let degraded = t.degraded;
        match t.tokens.into_iter().next() {
            Some(tok) if tok.position as usize == step.position() => self.answer(tok, degraded),
            Some(tok) => {
                let err = self.parent_error(format!(
                    "answered position {} for a step ending at {}",
                    tok.position,
                    step.position()
                ));
                self.lose(Upward::Step(step), err);
                Ok(())
            }
            None => {
                let err = self.parent_error("empty Tokens reply".into());
                self.lose(Upward::Step(step), err);
                Ok(())
            }
        }
    }

    /// The driver performed the fail-over of a step's parent.
    pub(super) fn step_after_loss(
        &mut self,
        mut step: Step,
        switched: bool,
        err: NodeError,
        now: Instant,
        link: Option<&dyn Uplink>,
    ) -> Result<()> {
        if switched {
            // Migration: the new parent gets every earlier position's states as the
            // backfill and this step's rows as the input, and answers the step itself —
            // the token an undisturbed run would have produced, not a degraded one.
            tracing::warn!(
                session = self.cfg.id,
                positions = step.position(),
                error = %err,
                "continuing the session on another parent; its states are re-sent as a backfill"
            );
            self.owed = self.history.clone();
            self.owed_start = 0;
            self.owed.pop();
            return self.escalate_or_degrade(step, now, link);
        }
        self.parent_failed = true;
        if step.local.is_some() {
            self.push(Action::Degrade(DegradeReason::ParentUnreachable));
            return self.answer_locally(step, true);
        }
        let lost = matches!(err, NodeError::Parent { .. });
        if let (true, Some(input)) = (lost, step.input.take()) {
            // Run the step again with this tier's exit (its KV holds every earlier
            // position): the KV goes back to where the step started.
            tracing::warn!(session = self.cfg.id, error = %err, "no parent can answer; answering from this tier's exit, degraded");
            self.push(Action::Truncate(step.start));
            self.kv_len = step.start;
            self.exit_kv_len = self.exit_kv_len.min(step.start);
            self.owed.clear();
            if self.keeps_states() {
                self.history.pop();
            }
            self.begin_step(input, step.start, None);
            return Ok(());
        }
        // No exit here and no parent left: the step cannot be answered.
        Err(err)
    }

    /// Answer the step from the local exit.
    fn answer_locally(&mut self, mut step: Step, degraded: bool) -> Result<()> {
        let (c, row) = step
            .local
            .take()
            .ok_or_else(|| NodeError::Internal("no logits at an answering tier".into()))?;
        let position = step.position();
        let id = choose(&row, &self.cfg.sampling, position);
        let (logprob, top_logprobs) = logprobs(&row, id, self.cfg.sampling.top_logprobs);
        let token = TokenOut {
            id,
            position: position as u32,
            tier: self.cfg.role,
            exit: self.exit_point().unwrap_or(0),
            confidence: c.max_prob,
            logprob,
            top_logprobs,
        };
        self.answer(token, degraded)
    }

    /// The token for the step's position: to the child, or to the client and on to the
    /// next step.
    fn answer(&mut self, token: TokenOut, degraded: bool) -> Result<()> {
        match &mut self.flow {
            Flow::Child => {
                let reply = Message::Tokens(Tokens {
                    request_id: self.cfg.request,
                    session_id: self.cfg.id,
                    tokens: vec![token],
                    degraded,
                });
                self.push(Action::Reply(reply));
            }
            Flow::Entry { .. } => {
                let (id, position) = (token.id, token.position as usize);
                if self.emit(token, degraded) {
                    self.begin_step(Input::Tokens(vec![id]), position, None);
                }
            }
        }
        Ok(())
    }

    /// Entry node: hand a token to the client; `false` when the request is complete.
    pub(super) fn emit(&mut self, token: TokenOut, degraded: bool) -> bool {
        let id = token.id;
        self.push(Action::Token { token, degraded });
        let Flow::Entry {
            max_new_tokens,
            stop,
            produced,
            ..
        } = &mut self.flow
        else {
            return false;
        };
        *produced += 1;
        let finish_reason = if stop.contains(&id) {
            "stop"
        } else if *produced >= *max_new_tokens {
            "length"
        } else {
            return true;
        };
        self.push(Action::Done { finish_reason });
        false
    }
}
