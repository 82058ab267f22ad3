//! Limits: what a peer may make us allocate or track.
//!
//! Every length and count read from the wire is compared with these numbers *before* any
//! buffer is sized from it (invariant I6). The defaults fit a 2048-position × 8192-hidden
//! f32 activation; tighten them on small devices.

use crate::error::{Error, Result};

/// Configurable bounds on frames, tensors and sessions. See [`Limits::default`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest whole frame (fixed prefix + header + payload), in bytes.
    pub max_frame_bytes: u64,
    /// Largest postcard header, in bytes.
    pub max_header_bytes: u64,
    /// Largest tensor rank.
    pub max_rank: usize,
    /// Largest single dimension.
    pub max_dim: u64,
    /// Largest element count of one tensor.
    pub max_elements: u64,
    /// Most tensors in one frame.
    pub max_tensors: usize,
    /// Concurrent request sessions (streams) one peer may hold open.
    pub max_sessions_per_peer: usize,
    /// Reject decoded tensors that contain NaN or infinity (costs one pass over the data).
    pub require_finite: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame_bytes: 96 << 20,
            max_header_bytes: 1 << 20,
            max_rank: 4,
            max_dim: 1 << 20,
            max_elements: 2048 * 8192,
            max_tensors: 4,
            max_sessions_per_peer: 64,
            require_finite: false,
        }
    }
}

impl Limits {
    /// Check a value against a limit, naming the field on failure.
    pub(crate) fn check(field: &'static str, got: u64, limit: u64) -> Result<()> {
        if got > limit {
            Err(Error::LimitExceeded { field, got, limit })
        } else {
            Ok(())
        }
    }

    /// Validate a tensor shape (rank, each dimension, element count); returns the element count.
    pub fn check_shape(&self, shape: &[u32]) -> Result<u64> {
        Self::check("rank", shape.len() as u64, self.max_rank as u64)?;
        let mut elements: u64 = 1;
        for &d in shape {
            Self::check("dim", u64::from(d), self.max_dim)?;
            elements = elements.saturating_mul(u64::from(d));
        }
        Self::check("elements", elements, self.max_elements)?;
        Ok(elements)
    }
}
