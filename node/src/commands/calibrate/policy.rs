//! The calibrated thresholds as a request policy: what nodes, the cluster and the demo use
//! when no `--threshold` is given.

use std::path::Path;

use anyhow::bail;

use super::{fingerprint, CalibrationFile, FILE_NAME};

/// The escalation thresholds calibrated for the family in `model`
/// (`MODEL/aiflow_calibration.json`), as a request policy takes them: what nodes and the demo
/// use when no `--threshold` is given. `None` when the model has no calibration file; an
/// error when the file is unreadable or was calibrated for other weights.
pub fn calibrated_policy(
    model: &Path,
) -> anyhow::Result<
    Option<(
        Vec<flow_protocol::ExitThreshold>,
        flow_protocol::ConfidenceMeasure,
    )>,
> {
    let path = model.join(FILE_NAME);
    if !model.is_dir() || !path.is_file() {
        return Ok(None);
    }
    let f = CalibrationFile::read(&path)?;
    let fp = fingerprint(model)?;
    if fp != f.model_fingerprint {
        bail!(
            "{} was calibrated for model {}, but the weights in {} are {fp}: recalibrate with \
             `flow-node model calibrate {} --write`, or pass --threshold",
            path.display(),
            f.model_fingerprint,
            model.display(),
            model.display()
        );
    }
    Ok(Some(f.policy()))
}

/// `exit 10 >= 0.695, exit 20 >= 0.705`: the thresholds as the commands print them.
pub fn describe(thresholds: &[flow_protocol::ExitThreshold]) -> String {
    thresholds
        .iter()
        .map(|t| format!("exit {} >= {:.3}", t.exit, t.threshold))
        .collect::<Vec<_>>()
        .join(", ")
}
