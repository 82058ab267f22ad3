//! Vision classification results: the edge's answer to a `Continue` that carried a camera
//! frame's hidden state (the traffic app, `flow-traffic`).
//!
//! The request is an ordinary [`crate::Continue`]: the frame's token rows (class token +
//! patches) after the device's blocks, positions `0..tokens` (`start` 0), on a session whose
//! [`crate::Open`] names the first block the edge runs (`layer`). The edge continues to its exit and answers with one
//! [`Classification`]. Values are probabilities and indexes in `[0, 1]`; the codec refuses
//! anything else on encode and decode, so a peer cannot hand the controller a NaN.

use serde::{Deserialize, Serialize};

use crate::message::Role;

/// What a deeper exit says about one camera frame.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Classification {
    /// Request id of the session (its `Open`) whose `Continue` this answers.
    pub request_id: u64,
    /// Session id of that `Open`.
    pub session_id: u64,
    /// Tier that classified.
    pub tier: Role,
    /// Exit that produced the answer (blocks run before it).
    pub exit: u32,
    /// Probability that an emergency vehicle is in view, in `[0, 1]`.
    pub p_emergency: f32,
    /// Estimated congestion index of the approach (occupied area / road area), in `[0, 1]`.
    pub congestion: f32,
}

impl Classification {
    pub(crate) fn check(&self) -> crate::Result<()> {
        for (field, v) in [
            ("classification.p_emergency", self.p_emergency),
            ("classification.congestion", self.congestion),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return Err(crate::Error::malformed(
                    field,
                    format!("{v} is not a finite value in [0, 1]"),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Codec, Message};

    fn msg(p: f32, c: f32) -> Message {
        Message::Classification(Classification {
            request_id: 1,
            session_id: 2,
            tier: Role::Edge,
            exit: 4,
            p_emergency: p,
            congestion: c,
        })
    }

    #[test]
    fn out_of_range_values_are_refused_both_ways() {
        let codec = Codec::default();
        for (p, c) in [
            (f32::NAN, 0.5),
            (0.5, 1.5),
            (-0.1, 0.0),
            (0.5, f32::INFINITY),
        ] {
            let e = codec.encode(&msg(p, c)).unwrap_err().to_string();
            assert!(e.contains("classification."), "{e}");
        }
        // A peer that forges the bytes: congestion is the header's last 4 bytes (no payload).
        let mut bytes = codec.encode(&msg(0.5, 0.5)).unwrap();
        let n = bytes.len();
        bytes[n - 4..].copy_from_slice(&f32::NAN.to_le_bytes());
        let e = codec.decode(&bytes).unwrap_err().to_string();
        assert!(e.contains("classification.congestion"), "{e}");
        assert_eq!(
            codec
                .decode(&codec.encode(&msg(1.0, 0.0)).unwrap())
                .unwrap(),
            msg(1.0, 0.0)
        );
    }
}
