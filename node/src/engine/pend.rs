//! A step waiting in the engine thread, possibly part-way through its rows (chunked
//! prefill): what it still has to run, what it produced so far, and its answer channel.

use candle_core::Tensor;
use tokio::sync::oneshot;

use super::{Answer, Input, OsInstant, StepJob, StepOut};
use crate::error::{NodeError, Result};

/// A step waiting in the engine, possibly part-way through its rows (chunked prefill).
pub(super) struct Pend {
    pub(super) job: StepJob,
    pub(super) tx: Option<oneshot::Sender<Answer>>,
    /// When the step was handed to the engine, and when its first rows ran.
    pub(super) enqueued: OsInstant,
    pub(super) started: Option<OsInstant>,
    pub(super) rows: usize,
    pub(super) done: usize,
    pub(super) hidden: Vec<Tensor>,
    pub(super) backfill_hidden: Option<Tensor>,
    pub(super) compute_us: u64,
    pub(super) batch_size: usize,
}

impl Pend {
    pub(super) fn new(job: StepJob, tx: oneshot::Sender<Answer>, enqueued: OsInstant) -> Self {
        let rows = job_rows(&job);
        Self {
            job,
            tx: Some(tx),
            enqueued,
            started: None,
            rows,
            done: 0,
            hidden: Vec::new(),
            backfill_hidden: None,
            compute_us: 0,
            batch_size: 0,
        }
    }

    /// The next `n` rows as a step of their own (logits only on the last chunk; the
    /// backfill goes with the first).
    pub(super) fn chunk(&mut self, n: usize) -> Result<StepJob> {
        let (a, last) = (self.done, self.done + n >= self.rows);
        let input = match &self.job.input {
            Input::Tokens(t) if a == 0 && last => Input::Tokens(t.clone()),
            Input::Tokens(t) => Input::Tokens(t[a..(a + n).min(t.len())].to_vec()),
            Input::Hidden(h) => Input::Hidden(if a == 0 && last {
                h.clone()
            } else {
                h.narrow(0, a, n)?
            }),
        };
        Ok(StepJob {
            session: self.job.session,
            start: self.job.start + a,
            input,
            backfill: self.job.backfill.take(),
            logit_rows: if last { self.job.logit_rows } else { 0 },
            exit_kv: self.job.exit_kv,
            exit_backfill: self.job.exit_backfill.take(),
            stage: self.job.stage,
        })
    }

    pub(super) fn fail(&mut self, e: NodeError) {
        self.answer(Err(e));
    }

    fn answer(&mut self, out: Result<StepOut>) {
        if let Some(tx) = self.tx.take() {
            let at = OsInstant::now();
            let queue_us = self
                .started
                .unwrap_or(at)
                .saturating_duration_since(self.enqueued)
                .as_micros() as u64;
            let _ = tx.send(Answer { out, queue_us, at });
        }
    }

    /// Take a chunk's result; answer the step when its last chunk is done.
    pub(super) fn absorb(&mut self, out: Result<StepOut>) {
        let out = match out {
            Ok(o) => o,
            Err(e) => return self.fail(e),
        };
        self.done += out.hidden.dim(0).unwrap_or(0);
        self.compute_us += out.compute_us;
        self.batch_size = self.batch_size.max(out.batch_size);
        if out.backfill_hidden.is_some() {
            self.backfill_hidden = out.backfill_hidden;
        }
        self.hidden.push(out.hidden);
        if self.done < self.rows {
            return;
        }
        let hidden = if self.hidden.len() == 1 {
            self.hidden.pop().map(Ok)
        } else {
            Some(Tensor::cat(&self.hidden, 0))
        };
        let res = match hidden {
            Some(Ok(hidden)) => Ok(StepOut {
                hidden,
                backfill_hidden: self.backfill_hidden.take(),
                logits: out.logits,
                compute_us: self.compute_us,
                batch_size: self.batch_size,
            }),
            Some(Err(e)) => Err(e.into()),
            None => Err(NodeError::Internal("a step finished with no rows".into())),
        };
        self.answer(res);
    }

    /// Answered (or failed): nothing more to run.
    pub(super) fn finished(&self) -> bool {
        self.tx.is_none()
    }
}

pub(super) fn job_rows(j: &StepJob) -> usize {
    match &j.input {
        Input::Tokens(t) => t.len(),
        Input::Hidden(h) => h.dim(0).unwrap_or(0),
    }
}
