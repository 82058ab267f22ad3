//! The crate's one error type.

/// Everything that can go wrong in `flow-partition`. Every variant names the field or the
/// resource concerned so that the caller (the agent, `flow-node plan`) can print it as is.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    /// A number supplied by the caller is NaN, infinite, negative or otherwise out of range.
    #[error("invalid input `{field}`: {reason}")]
    InvalidInput {
        /// Dotted path of the offending field, e.g. `tiers[1].load_factor`.
        field: String,
        /// What is wrong and what is expected.
        reason: String,
    },
    /// Not enough samples to fit or calibrate anything.
    #[error("not enough samples for {what}: need at least {needed}, got {got}")]
    TooFewSamples {
        /// What was being fitted.
        what: String,
        /// Minimum number of samples.
        needed: usize,
        /// Number supplied.
        got: usize,
    },
    /// No placement of the model fits the tiers' memory limits.
    #[error("the model does not fit: {detail}")]
    DoesNotFit {
        /// Which tier and which layers/exits cannot fit, with bytes needed and available.
        detail: String,
    },
    /// Some placements fit in memory but none reaches the accuracy target.
    #[error(
        "no plan reaches the accuracy target {target:.4}: the best feasible agreement is {best:.4} ({detail})"
    )]
    AccuracyUnreachable {
        /// Required agreement with the deepest exit.
        target: f64,
        /// Best predicted agreement among memory-feasible plans.
        best: f64,
        /// The plan that came closest.
        detail: String,
    },
    /// Plans fit memory and accuracy but every one saturates a link.
    #[error("every plan saturates a link: {detail}")]
    LinkSaturated {
        /// The link and its utilisation in the plan that came closest.
        detail: String,
    },
    /// No threshold of an exit meets the agreement target (calibration).
    #[error("no threshold meets agreement {target:.4}: {detail}")]
    TargetUnreachable {
        /// Target agreement.
        target: f64,
        /// Best bound or empirical agreement reached.
        detail: String,
    },
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// Returns `InvalidInput` unless `v` is finite and `>= 0`.
pub(crate) fn check_non_negative(field: impl Into<String>, v: f64) -> Result<f64> {
    if v.is_finite() && v >= 0.0 {
        Ok(v)
    } else {
        Err(Error::InvalidInput {
            field: field.into(),
            reason: format!("must be a finite number >= 0, got {v}"),
        })
    }
}

/// Returns `InvalidInput` unless `v` is finite and `> 0`.
pub(crate) fn check_positive(field: impl Into<String>, v: f64) -> Result<f64> {
    if v.is_finite() && v > 0.0 {
        Ok(v)
    } else {
        Err(Error::InvalidInput {
            field: field.into(),
            reason: format!("must be a finite number > 0, got {v}"),
        })
    }
}

/// Returns `InvalidInput` unless `v` is finite and in `[0, 1]`.
pub(crate) fn check_unit(field: impl Into<String>, v: f64) -> Result<f64> {
    if v.is_finite() && (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(Error::InvalidInput {
            field: field.into(),
            reason: format!("must be a finite number in [0, 1], got {v}"),
        })
    }
}

/// Returns `InvalidInput` unless `v` is finite (any sign).
pub(crate) fn check_finite(field: impl Into<String>, v: f64) -> Result<f64> {
    if v.is_finite() {
        Ok(v)
    } else {
        Err(Error::InvalidInput {
            field: field.into(),
            reason: format!("must be a finite number, got {v}"),
        })
    }
}
