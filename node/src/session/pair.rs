//! A quinn-style `Pair` for the session's unit tests: one [`Session`], a scripted engine
//! and scripted parents, on virtual time. Messages to a parent come back after a delay the
//! test chooses, or never; the engine and the parents check that every step continues
//! their KV exactly (no gap, no duplicate, the right rows in order). Each upstream stream
//! starts with the session's `Open`, as the driver sends it; the parents record it.

use std::time::Duration;

use candle_core::{Device, Tensor};
use flow_partition::DegradeReason;
use flow_protocol::{Draft, Encoding, Message, Open, Role, TokenOut, Tokens, Verdict};
use tokio::time::Instant;

use super::wire::from_wire;
use super::{Action, Session, Uplink};
use crate::engine::{Input, StepJob, StepOut};
use crate::error::NodeError;

/// Hidden width of the fake model.
pub const H: usize = 4;
/// Vocabulary of the fake model.
pub const V: usize = 32;

/// Rows `[p; H]` for positions `start..start + n`: states say which position they are.
pub fn rows(start: usize, n: usize) -> Tensor {
    let data: Vec<f32> = (start..start + n)
        .flat_map(|p| std::iter::repeat_n(p as f32, H))
        .collect();
    Tensor::from_vec(data, (n, H), &Device::Cpu).unwrap()
}

/// Checks that `t` holds the rows of positions `start..`.
fn check_rows(t: &Tensor, start: usize, what: &str) {
    let v: Vec<Vec<f32>> = t.to_vec2().unwrap();
    for (i, r) in v.iter().enumerate() {
        assert!(
            r.iter().all(|&x| x == (start + i) as f32),
            "{what}: row {i} holds position {} instead of {}",
            r[0],
            start + i
        );
    }
}

/// Logits that make `token` the choice, confidently (max-prob ≈ 0.99) or not (≈ 0.08).
fn logits(token: u32, confident: bool) -> Vec<f32> {
    let mut l = vec![0.0; V];
    l[token as usize % V] = if confident { 8.0 } else { 1.0 };
    l
}

/// Token at position `p` of a scripted sequence.
pub type Script = Box<dyn Fn(usize) -> u32>;

/// This tier's model: the row at position `p` predicts `token(p + 1)`.
pub struct FakeEngine {
    pub token: Script,
    pub confident: Box<dyn Fn(usize) -> bool>,
    /// Positions the session's KV holds.
    pub kv: usize,
    /// Positions `0..exit_kv` the exit block's KV holds without a hole.
    pub exit_kv: usize,
    /// Steps that filled the exit's KV from kept states first.
    pub exit_backfills: usize,
    pub truncations: Vec<usize>,
}

impl FakeEngine {
    pub fn new(token: Script, confident: impl Fn(usize) -> bool + 'static) -> Self {
        Self {
            token,
            confident: Box::new(confident),
            kv: 0,
            exit_kv: 0,
            exit_backfills: 0,
            truncations: Vec::new(),
        }
    }

    fn step(&mut self, job: StepJob) -> StepOut {
        let n = match &job.input {
            Input::Tokens(t) => t.len(),
            Input::Hidden(h) => {
                check_rows(h, job.start, "engine input");
                h.dim(0).unwrap()
            }
        };
        let first = job.backfill.as_ref().map_or(job.start, |(s, _)| *s);
        assert_eq!(first, self.kv, "the step does not continue the engine's KV");
        if let Some((s, t)) = &job.exit_backfill {
            assert!(job.exit_kv, "an exit backfill for a step without the exit");
            check_rows(t, *s, "exit backfill");
            assert_eq!(
                *s, self.exit_kv,
                "the exit backfill does not continue the exit's KV"
            );
            self.exit_kv = s + t.dim(0).unwrap();
            self.exit_backfills += 1;
        }
        let backfill_hidden = job.backfill.map(|(s, t)| {
            check_rows(&t, s, "engine backfill");
            assert_eq!(
                s + t.dim(0).unwrap(),
                job.start,
                "backfill ends at the step"
            );
            rows(s, t.dim(0).unwrap())
        });
        self.kv = job.start + n;
        let end = job.start + n;
        if job.exit_kv && self.exit_kv == first {
            self.exit_kv = end;
        }
        assert!(
            job.logit_rows == 0 || self.exit_kv == end,
            "the exit answers position {end} with its KV holding only 0..{}",
            self.exit_kv
        );
        let logits = (job.logit_rows > 0).then(|| {
            (end - job.logit_rows..end)
                .map(|p| logits((self.token)(p + 1), (self.confident)(p + 1)))
                .collect()
        });
        StepOut {
            hidden: rows(job.start, n),
            backfill_hidden,
            logits,
            compute_us: 0,
            batch_size: 1,
        }
    }
}

/// What a parent does with the `i`-th message it receives.
#[allow(clippy::large_enum_variant)]
pub enum Fate {
    /// Answers after this delay.
    Reply(Duration),
    /// Never answers (a dead or partitioned parent).
    Silent,
    /// The stream fails after this delay.
    Lost(Duration),
    /// Answers this instead, after the delay.
    Send(Duration, Message),
}

/// A parent tier holding the rest of the model: answers `token(p)` for position `p` and
/// verifies drafts against it.
pub struct FakeParent {
    pub token: Script,
    pub fate: Box<dyn FnMut(usize) -> Fate>,
    /// Positions the parent's KV holds for the session.
    pub kv: usize,
    pub received: Vec<Message>,
    /// The `Open` of each stream the session opened here, in order.
    pub opens: Vec<Open>,
    /// The upstream generation of the stream open here.
    stream: Option<u64>,
    pub down: bool,
    pub rtt_ms: f64,
    pub reply_deadline: Duration,
    /// [`Uplink::patience`]; the default waits no longer than the first deadline.
    pub patience: Duration,
    /// Heard from (acknowledging, answering keep-alives) while it has not replied.
    pub alive: bool,
}

impl FakeParent {
    pub fn new(token: Script, fate: impl FnMut(usize) -> Fate + 'static) -> Self {
        Self {
            token,
            fate: Box::new(fate),
            kv: 0,
            received: Vec::new(),
            opens: Vec::new(),
            stream: None,
            down: false,
            rtt_ms: 10.0,
            reply_deadline: Duration::from_millis(100),
            patience: Duration::from_millis(100),
            alive: false,
        }
    }

    /// The parent's answer, checking that `msg` continues its KV exactly.
    fn answer(&mut self, msg: &Message) -> Message {
        match msg {
            Message::Continue(c) => {
                c.validate().unwrap();
                let start = c.start as usize;
                if let Some(bf) = &c.backfill {
                    let s = bf.start as usize;
                    assert_eq!(s, self.kv, "backfill does not continue the parent's KV");
                    assert_eq!(s + bf.rows(), start, "backfill ends at the step");
                    check_rows(&from_wire(&bf.hidden, H).unwrap(), s, "backfill");
                } else {
                    assert_eq!(start, self.kv, "the step does not continue the parent's KV");
                }
                check_rows(&from_wire(&c.hidden, H).unwrap(), start, "step rows");
                self.kv = start + c.rows();
                Message::Tokens(Tokens {
                    request_id: self.opens.last().map_or(0, |o| o.request_id),
                    session_id: 99,
                    tokens: vec![TokenOut {
                        id: (self.token)(self.kv),
                        position: self.kv as u32,
                        tier: Role::Cloud,
                        exit: 9,
                        confidence: 1.0,
                        logprob: 0.0,
                        top_logprobs: Vec::new(),
                    }],
                    degraded: false,
                })
            }
            Message::Draft(d) => Message::Verdict(self.verify(d)),
            other => panic!("a parent got {}", other.name()),
        }
    }

    fn verify(&mut self, d: &Draft) -> Verdict {
        d.validate().unwrap();
        let start = d.start as usize;
        assert_eq!(
            start, self.kv,
            "the draft does not continue the parent's KV"
        );
        check_rows(&from_wire(&d.hidden, H).unwrap(), start, "draft rows");
        let r = d.rows() - d.tokens.len();
        let base = start + r;
        let accepted = d
            .tokens
            .iter()
            .enumerate()
            .take_while(|(i, &t)| t == (self.token)(base + i))
            .count();
        self.kv = base + accepted;
        Verdict {
            request_id: self.opens.last().map_or(0, |o| o.request_id),
            session_id: 99,
            accepted: accepted as u32,
            next_token: (self.token)(base + accepted),
            tier: Role::Cloud,
            exit: 9,
        }
    }
}

struct Link<'a>(usize, &'a FakeParent);

impl Uplink for Link<'_> {
    fn name(&self) -> String {
        format!("parent-{}", self.0)
    }
    fn is_down(&self) -> bool {
        self.1.down
    }
    fn reply_deadline(&self, _rows: usize) -> Duration {
        self.1.reply_deadline
    }
    fn patience(&self) -> Duration {
        self.1.patience
    }
    fn liveness_window(&self) -> Duration {
        Duration::from_millis(250)
    }
    fn predicted_reply_ms(&self, _rows: usize) -> (f64, f64) {
        (self.1.rtt_ms, 0.0)
    }
    fn encoding(&self) -> Encoding {
        Encoding::F32
    }
}

/// How [`Pair::run`] stopped.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub enum Outcome {
    Reply(Message),
    Done(&'static str),
    Failed(NodeError),
    /// Nothing to do and nothing to wait for.
    Stalled,
}

/// A session with its engine and parents on virtual time.
pub struct Pair {
    pub now: Instant,
    pub session: Session,
    pub engine: FakeEngine,
    pub parents: Vec<FakeParent>,
    /// The parent in use (`Parents::fail_over` picks the next one not failed).
    pub current: usize,
    pub failed: Vec<bool>,
    /// Engine time per step.
    pub compute: Duration,
    /// (when, upstream, parent, what) — delivered in time order, whatever the session
    /// did meanwhile.
    in_flight: Vec<(Instant, u64, Result<Message, String>)>,
    pub tokens: Vec<(TokenOut, bool)>,
    pub sent: Vec<(usize, Message)>,
    pub degrades: Vec<DegradeReason>,
    pub resets: usize,
    pub failovers: usize,
    pub timeouts: usize,
}

impl Pair {
    pub fn new(
        session: Session,
        engine: FakeEngine,
        parents: Vec<FakeParent>,
        now: Instant,
    ) -> Self {
        let n = parents.len();
        Self {
            now,
            session,
            engine,
            parents,
            current: 0,
            failed: vec![false; n],
            compute: Duration::from_millis(1),
            in_flight: Vec::new(),
            tokens: Vec::new(),
            sent: Vec::new(),
            degrades: Vec::new(),
            resets: 0,
            failovers: 0,
            timeouts: 0,
        }
    }

    /// Perform actions and deliver messages until the session answers, finishes or fails.
    pub fn run(&mut self) -> Outcome {
        loop {
            if let Some(o) = self.pump() {
                return o;
            }
            let next = self
                .in_flight
                .iter()
                .enumerate()
                .min_by_key(|(_, m)| m.0)
                .map(|(i, m)| (i, m.0));
            let timeout = self.session.poll_timeout();
            match next {
                Some((i, at)) if timeout.is_none_or(|t| at <= t) => {
                    let (at, up, m) = self.in_flight.remove(i);
                    self.now = self.now.max(at);
                    match m {
                        Ok(m) => self.session.on_reply(up, m, self.now),
                        Err(e) => {
                            let err = NodeError::Parent {
                                addr: "fake".into(),
                                msg: e,
                            };
                            self.session.on_parent_lost(up, err, self.now)
                        }
                    }
                }
                _ => {
                    let Some(t) = timeout else {
                        return Outcome::Stalled;
                    };
                    self.now = self.now.max(t);
                    if self.parents[self.current].alive {
                        self.session.on_parent_heard(self.now);
                    } else {
                        self.timeouts += 1;
                        self.session.on_timeout(self.now);
                    }
                }
            }
        }
    }

    /// Perform the queued actions (no message is delivered, no time passes but compute).
    pub fn pump(&mut self) -> Option<Outcome> {
        while let Some(a) = self.session.poll_action() {
            if let Some(o) = self.perform(a) {
                return Some(o);
            }
        }
        None
    }

    /// Deliver everything still in flight; the session must ask for nothing more.
    pub fn drain(&mut self) {
        while let Some((_, up, m)) = self.in_flight.pop() {
            if let Ok(m) = m {
                self.session.on_reply(up, m, self.now);
            }
            assert!(
                self.session.poll_action().is_none(),
                "a stale reply was acted on"
            );
        }
    }

    fn perform(&mut self, a: Action) -> Option<Outcome> {
        match a {
            Action::Compute(job) => {
                self.now += self.compute;
                let out = self.engine.step(job);
                let link = self
                    .parents
                    .get(self.current)
                    .map(|p| Link(self.current, p));
                let link = link.as_ref().map(|l| l as &dyn Uplink);
                self.session.on_step_output(out, self.now, link);
            }
            Action::Truncate(len) => {
                self.engine.kv = len;
                self.engine.exit_kv = self.engine.exit_kv.min(len);
                self.engine.truncations.push(len);
            }
            Action::Escalate { up, msg } | Action::Draft { up, msg } => {
                let i = self.current;
                let p = &mut self.parents[i];
                if p.stream != Some(up) {
                    // A new stream: the driver sends the session's Open first.
                    match self.session.open_message(self.now) {
                        Message::Open(o) => p.opens.push(o),
                        other => panic!("the stream opened with {}", other.name()),
                    }
                    p.stream = Some(up);
                }
                let fate = (p.fate)(p.received.len());
                p.received.push(msg.clone());
                let delivery = match fate {
                    Fate::Reply(d) => Some((d, Ok(p.answer(&msg)))),
                    Fate::Silent => None,
                    Fate::Lost(d) => Some((d, Err("stream reset by the parent".into()))),
                    Fate::Send(d, m) => Some((d, Ok(m))),
                };
                if let Some((d, m)) = delivery {
                    self.in_flight.push((self.now + d, up, m));
                }
                self.sent.push((i, msg));
            }
            Action::ResetUpstream => self.resets += 1,
            Action::FailOver => {
                self.failovers += 1;
                if let Some(f) = self.failed.get_mut(self.current) {
                    *f = true;
                }
                let next =
                    (0..self.parents.len()).find(|&i| !self.failed[i] && !self.parents[i].down);
                if let Some(i) = next {
                    self.current = i;
                }
                let link = next.map(|i| Link(i, &self.parents[i]));
                let link = link.as_ref().map(|l| l as &dyn Uplink);
                self.session.on_failed_over(self.now, link);
            }
            Action::Degrade(r) => self.degrades.push(r),
            Action::ObserveReply { .. } => {}
            Action::Token { token, degraded } => self.tokens.push((token, degraded)),
            Action::Reply(m) => return Some(Outcome::Reply(m)),
            Action::Done { finish_reason } => return Some(Outcome::Done(finish_reason)),
            Action::Fail(e) => return Some(Outcome::Failed(e)),
        }
        None
    }
}
