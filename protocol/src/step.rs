//! The messages of one request stream, child → parent (protocol 4).
//!
//! A request stream starts with one [`Open`]: what is fixed for the session (request and
//! session ids, the layer the parent starts from, the [`Policy`] and [`Sampling`], an
//! optional request deadline). Every later message is per step and carries only a start
//! position and tensors: [`Continue`] (hidden states to run, with an optional
//! [`Backfill`] of positions the parent's KV missed) and [`Draft`] (speculative decoding).
//! The rows of a hidden-state tensor are the positions `start..start + rows`.
//!
//! [`Continue::validate`] and [`Draft::validate`] hold what shapes alone do not (the codec
//! calls them on encode and decode): hidden states are `[rows, hidden]` with at least one
//! row, `start + rows` fits a `u32`, a draft has at least one token and fewer tokens than
//! rows, and a backfill ends exactly where its `Continue` starts. A violation is a
//! [`StepError`] naming the field.

use serde::{Deserialize, Serialize};

use crate::message::{Policy, Sampling};
use crate::tensor::WireTensor;

/// First message of a request stream: what every later message of the stream shares.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Open {
    /// End-to-end request id (assigned by the entry node).
    pub request_id: u64,
    /// Session on this link.
    pub session_id: u64,
    /// Layer index the receiver starts from (the sender ran `0..layer`) in every message.
    pub layer: u32,
    /// How tiers decide.
    pub policy: Policy,
    /// Sampling parameters (the receiver samples per position, seeded).
    pub sampling: Sampling,
    /// Time left for the whole request, relative, in ms (no clocks are shared between
    /// nodes); `None`: only the per-step deadlines bound it.
    pub deadline_ms: Option<u32>,
}

/// Hidden states of positions whose deeper KV slots are empty (tokens that exited at a
/// shallower tier); the receiver runs them through its layers to fill its KV cache.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Backfill {
    /// Position of the first row of `hidden`.
    pub start: u32,
    /// `[rows, hidden]` states at the stream's layer, positions `start..start + rows`.
    pub hidden: WireTensor,
}

/// Continue the forward pass from the stream's layer with these hidden states.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Continue {
    /// Position of the first row of `hidden`.
    pub start: u32,
    /// `[rows, hidden]` hidden states of positions `start..start + rows`.
    pub hidden: WireTensor,
    /// KV backfill of the positions just before `start`, if any.
    pub backfill: Option<Backfill>,
    /// Time left for this step, relative, in ms (no clocks are shared between nodes).
    pub deadline_ms: Option<u32>,
}

/// Speculative decoding: drafted tokens and their hidden states at the stream's layer.
///
/// The rows of `hidden` are positions `start..start + rows`: first the accepted tokens the
/// verifier has not processed yet, then one row per drafted token. `tokens` are the
/// drafts, one per row after the first `rows - tokens.len()`; the verifier checks draft `i`
/// against its own prediction from the row before it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Draft {
    /// Position of the first row of `hidden`.
    pub start: u32,
    /// Drafted token ids (at least one, fewer than the rows).
    pub tokens: Vec<u32>,
    /// `[rows, hidden]` states to verify.
    pub hidden: WireTensor,
    /// Relative deadline in ms.
    pub deadline_ms: Option<u32>,
}

/// What is wrong with a [`Continue`], [`Backfill`] or [`Draft`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StepError {
    /// Hidden states must be a matrix.
    #[error("{field}: hidden states must be [rows, hidden], got shape {shape:?}")]
    NotMatrix {
        /// Which tensor.
        field: &'static str,
        /// The shape received.
        shape: Vec<u32>,
    },
    /// A hidden-state tensor without rows says nothing.
    #[error("{field}: hidden states have no rows")]
    NoRows {
        /// Which tensor.
        field: &'static str,
    },
    /// The last position does not fit a `u32`.
    #[error("{field}: positions {start}..{start}+{rows} overflow u32")]
    PositionOverflow {
        /// Which message.
        field: &'static str,
        /// First position.
        start: u32,
        /// Rows.
        rows: u32,
    },
    /// A draft needs at least one drafted token and fewer tokens than rows.
    #[error("draft.tokens: {tokens} drafted tokens for {rows} rows: need at least one and fewer than the rows")]
    DraftTokens {
        /// Drafted tokens.
        tokens: usize,
        /// Rows of the draft's hidden states.
        rows: u32,
    },
    /// The backfill must cover the positions right before the step.
    #[error("continue.backfill: positions {start}..{end} do not end where the step starts ({step_start})")]
    BackfillGap {
        /// First backfilled position.
        start: u32,
        /// One past the last backfilled position.
        end: u32,
        /// The `Continue`'s first position.
        step_start: u32,
    },
}

/// Rows of a `[rows, hidden]` tensor whose positions `start..start + rows` fit a `u32`;
/// returns the end position.
fn span(field: &'static str, start: u32, hidden: &WireTensor) -> Result<u32, StepError> {
    let rows = match hidden.shape() {
        [0, _] => return Err(StepError::NoRows { field }),
        [r, _] => *r,
        other => {
            return Err(StepError::NotMatrix {
                field,
                shape: other.to_vec(),
            })
        }
    };
    start
        .checked_add(rows)
        .ok_or(StepError::PositionOverflow { field, start, rows })
}

impl Backfill {
    /// Check the shape; returns one past the last position.
    pub fn validate(&self) -> Result<u32, StepError> {
        span("continue.backfill.hidden", self.start, &self.hidden)
    }

    /// Rows of `hidden` (0 when it is not a matrix: see [`Self::validate`]).
    pub fn rows(&self) -> usize {
        rows(&self.hidden)
    }
}

impl Continue {
    /// Check the shapes, the positions and the backfill (see the module docs).
    pub fn validate(&self) -> Result<(), StepError> {
        span("continue.hidden", self.start, &self.hidden)?;
        if let Some(b) = &self.backfill {
            let end = b.validate()?;
            if end != self.start {
                return Err(StepError::BackfillGap {
                    start: b.start,
                    end,
                    step_start: self.start,
                });
            }
        }
        Ok(())
    }

    /// Rows of `hidden` (0 when it is not a matrix: see [`Self::validate`]).
    pub fn rows(&self) -> usize {
        rows(&self.hidden)
    }
}

impl Draft {
    /// Check the shape, the positions and the number of drafted tokens.
    pub fn validate(&self) -> Result<(), StepError> {
        span("draft.hidden", self.start, &self.hidden)?;
        let rows = self.hidden.shape()[0];
        if self.tokens.is_empty() || self.tokens.len() >= rows as usize {
            return Err(StepError::DraftTokens {
                tokens: self.tokens.len(),
                rows,
            });
        }
        Ok(())
    }

    /// Rows of `hidden` (0 when it is not a matrix: see [`Self::validate`]).
    pub fn rows(&self) -> usize {
        rows(&self.hidden)
    }
}

fn rows(t: &WireTensor) -> usize {
    match t.shape() {
        [r, _] => *r as usize,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Codec, Encoding, Message};

    fn hidden(rows: u32) -> WireTensor {
        let data = vec![0.5f32; rows as usize * 4];
        WireTensor::encode(&data, &[rows as usize, 4], Encoding::F32).unwrap()
    }

    fn cont(start: u32, rows: u32, backfill: Option<(u32, u32)>) -> Continue {
        Continue {
            start,
            hidden: hidden(rows),
            backfill: backfill.map(|(s, r)| Backfill {
                start: s,
                hidden: hidden(r),
            }),
            deadline_ms: Some(100),
        }
    }

    #[test]
    fn open_continue_and_draft_round_trip() {
        let c = Codec::default();
        let open = Message::Open(Open {
            request_id: 7,
            session_id: 9,
            layer: 3,
            policy: Policy::default(),
            sampling: Sampling::default(),
            deadline_ms: Some(30_000),
        });
        let step = Message::Continue(cont(5, 1, Some((2, 3))));
        let draft = Message::Draft(Draft {
            start: 4,
            tokens: vec![11, 12],
            hidden: hidden(3),
            deadline_ms: None,
        });
        for m in [open, step, draft] {
            assert_eq!(c.decode(&c.encode(&m).unwrap()).unwrap(), m);
        }
    }

    #[test]
    fn invalid_steps_name_what_was_wrong() {
        let e = cont(0, 0, None).validate().unwrap_err();
        assert_eq!(
            e,
            StepError::NoRows {
                field: "continue.hidden"
            }
        );
        assert!(e.to_string().contains("no rows"), "{e}");

        let mut flat = cont(0, 1, None);
        flat.hidden = WireTensor::encode(&[1.0; 4], &[4], Encoding::F32).unwrap();
        let e = flat.validate().unwrap_err().to_string();
        assert!(e.contains("[rows, hidden]") && e.contains("[4]"), "{e}");

        let e = cont(u32::MAX, 2, None).validate().unwrap_err();
        assert!(matches!(e, StepError::PositionOverflow { .. }), "{e}");
        assert!(e.to_string().contains("overflow u32"), "{e}");

        let e = cont(5, 1, Some((1, 3))).validate().unwrap_err();
        assert_eq!(
            e,
            StepError::BackfillGap {
                start: 1,
                end: 4,
                step_start: 5
            }
        );
        assert!(e.to_string().contains("continue.backfill"), "{e}");
        let e = cont(5, 1, Some((3, 0))).validate().unwrap_err();
        assert!(e.to_string().contains("continue.backfill.hidden"), "{e}");

        for tokens in [vec![], vec![1, 2, 3]] {
            let d = Draft {
                start: 0,
                tokens,
                hidden: hidden(3),
                deadline_ms: None,
            };
            let e = d.validate().unwrap_err().to_string();
            assert!(e.contains("draft.tokens") && e.contains("3 rows"), "{e}");
        }
    }

    #[test]
    fn the_codec_refuses_invalid_steps_both_ways() {
        let c = Codec::default();
        let bad = Message::Continue(cont(5, 1, Some((1, 3))));
        let e = c.encode(&bad).unwrap_err();
        assert!(
            matches!(e, crate::Error::Step(StepError::BackfillGap { .. })),
            "{e}"
        );
        assert_eq!(e.code(), crate::ErrorCode::Malformed);
        // A peer's frame: encode a valid one, then move the step's start (the header's first
        // field, a one-byte varint here) past the backfill's end.
        let good = Message::Continue(cont(4, 1, Some((1, 3))));
        let mut bytes = c.encode(&good).unwrap();
        assert_eq!(bytes[crate::PREFIX_LEN], 4);
        bytes[crate::PREFIX_LEN] = 5;
        let e = c.decode(&bytes).unwrap_err().to_string();
        assert!(e.contains("do not end where the step starts (5)"), "{e}");
    }
}
