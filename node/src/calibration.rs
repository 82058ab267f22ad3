//! The calibration file (`MODEL/aiflow_calibration.json`, format `aiflow-calibration/1`)
//! that `flow-node model calibrate --write` stores: the measure, target and bound, where the
//! records came from, and per exit its `point`, planner `depth`, `threshold` and planner
//! curve. Nodes read the thresholds ([`CalibrationFile::policy`]); `flow-node plan` and
//! `--plan auto` read the curves ([`CalibrationFile::exit_specs`]).
//!
//! The file is checked when it is read ([`CalibrationFile::from_json_str`]): a file that
//! parses but would put a threshold on the wrong exit, or give the planner curves out of
//! range, is refused with the field that is wrong.

use std::path::Path;

use flow_familial::ModelConfig;
use flow_partition::planner::ExitSpec;
use flow_partition::{Bound, ConfidenceMeasure, CurvePoint};
use serde::{Deserialize, Serialize};

use crate::error::{NodeError, Result};
use crate::planning::{planner_depths, ALWAYS_ESCALATE};

/// Format tag of [`CalibrationFile`].
pub const FORMAT: &str = "aiflow-calibration/1";
/// File name under the checkpoint directory.
pub const FILE_NAME: &str = "aiflow_calibration.json";

/// The composed policy in the calibration file (`--deciders`), checked on its own decode.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CascadeEntry {
    /// Deciding exit points, shallowest first.
    pub deciders: Vec<usize>,
    /// Their thresholds (`null`: always escalate).
    pub thresholds: Vec<Option<f64>>,
    /// Escalation cost per deciding exit the choice minimised.
    pub escalation_cost: Vec<f64>,
    /// Threshold combinations searched (Bonferroni factor of the choice).
    pub candidates: usize,
    /// Rounds run, and whether the last choice equalled the thresholds it decoded with.
    pub rounds: usize,
    pub converged: bool,
    /// On the final decode with these thresholds: tokens, agreeing tokens, composed
    /// agreement, its lower bound at the file's delta, tokens answered per decider then
    /// the deepest exit, mean escalation cost.
    pub tokens: usize,
    pub agreeing: usize,
    pub agreement: f64,
    pub bounded_agreement: f64,
    pub answered: Vec<usize>,
    pub cost: f64,
}

/// One exit in the calibration file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExitEntry {
    /// Exit point as in `early_exit_points` (reads the state after trunk layers `[0, point)`).
    pub point: usize,
    /// Depth in the planner's terms: trunk layers a tier must host before this exit decides
    /// (`point` for an exit with its own block; `l + 1` for an exit whose block is trunk
    /// layer `l`, e.g. the deepest Ruyi exit, whose depth is `num_layers`).
    pub depth: usize,
    /// Answer when confidence >= threshold; `None`: always escalate (or the deepest exit).
    pub threshold: Option<f64>,
    /// Validation tokens (records) of this exit.
    pub tokens: usize,
    /// Tokens accepted at the threshold.
    pub accepted: usize,
    /// Agreement with the deepest exit among accepted tokens (empirical).
    pub empirical_agreement: f64,
    /// Its lower confidence bound (= empirical without a bound).
    pub bounded_agreement: f64,
    /// Fraction of tokens escalated at the threshold.
    pub escalation: f64,
    /// Agreement (lower bound when a bound is set) versus threshold, thresholds decreasing,
    /// the calibrated threshold included: what the planner searches over.
    pub curve: Vec<CurvePoint>,
}

/// `DIR/aiflow_calibration.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CalibrationFile {
    /// Always [`FORMAT`].
    pub format: String,
    /// Confidence measure the thresholds apply to.
    pub measure: ConfidenceMeasure,
    /// Target agreement with the deepest exit.
    pub target_agreement: f64,
    /// Bound used (`None`: empirical).
    pub bound: Option<Bound>,
    /// First 16 hex digits of the checkpoint fingerprint (as `model inspect`).
    pub model_fingerprint: String,
    /// Validation task.
    pub task: String,
    /// Examples per concrete task.
    pub examples_per_task: usize,
    /// Evaluation split.
    pub split: u64,
    /// How reference tokens were produced.
    pub reference: String,
    /// Exit point of the deepest exit.
    pub deepest_exit: usize,
    /// Every exit, shallowest first (the deepest last, threshold `None`).
    pub exits: Vec<ExitEntry>,
    /// The cascade the deciders' thresholds were chosen for (absent: `--teacher-forced`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cascade: Option<CascadeEntry>,
}

/// `what` of the calibration file `src` is wrong: a configuration error naming both.
fn bad(src: &str, what: impl std::fmt::Display) -> NodeError {
    NodeError::Config(format!("{src}: {what}"))
}

impl CalibrationFile {
    /// Reads and checks the calibration file at `path` ([`Self::from_json_str`]).
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| NodeError::Config(format!("reading {}: {e}", path.display())))?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses and checks a calibration file: the format tag, exits in strictly increasing
    /// points ending at `deepest_exit`, points a wire threshold can name (`u32`), finite
    /// thresholds, curve points with agreement and escalation in `[0, 1]`, and a target in
    /// `[0, 1]`. The curves' size is bounded by the planner
    /// (`flow_partition::planner::MAX_CURVE_POINTS`) when they are planned with.
    pub fn from_json_str(text: &str) -> Result<Self> {
        Self::parse(text, "calibration file")
    }

    fn parse(text: &str, src: &str) -> Result<Self> {
        let f: Self = serde_json::from_str(text)
            .map_err(|e| bad(src, format!("not a calibration file: {e}")))?;
        if f.format != FORMAT {
            return Err(bad(
                src,
                format!("format `{}`, expected `{FORMAT}`", f.format),
            ));
        }
        f.check().map_err(|what| bad(src, what))?;
        Ok(f)
    }

    fn check(&self) -> std::result::Result<(), String> {
        let unit = |x: f64| (0.0..=1.0).contains(&x);
        if !unit(self.target_agreement) {
            return Err(format!(
                "target_agreement {} is not in [0, 1]",
                self.target_agreement
            ));
        }
        let Some(last) = self.exits.last() else {
            return Err("`exits` is empty".into());
        };
        if last.point != self.deepest_exit {
            return Err(format!(
                "the last exit is at point {}, but deepest_exit is {}",
                last.point, self.deepest_exit
            ));
        }
        for (i, e) in self.exits.iter().enumerate() {
            if u32::try_from(e.point).is_err() {
                return Err(format!("exits[{i}].point {} is out of range", e.point));
            }
            if i > 0 && self.exits[i - 1].point >= e.point {
                return Err(format!(
                    "exits[{i}].point {}: exits must be in strictly increasing points",
                    e.point
                ));
            }
            if let Some(t) = e.threshold {
                if !t.is_finite() {
                    return Err(format!("exits[{i}].threshold {t} is not finite"));
                }
            }
            for (k, p) in e.curve.iter().enumerate() {
                if !p.threshold.is_finite() || !unit(p.agreement) || !unit(p.escalation) {
                    return Err(format!(
                        "exits[{i}].curve[{k}]: threshold must be finite, agreement and \
                         escalation in [0, 1], got {p:?}"
                    ));
                }
            }
        }
        Ok(())
    }

    /// The escalation thresholds of every exit but the deepest, as a request policy takes
    /// them (`None` in the file: the exit always escalates), and the measure they apply to.
    pub fn policy(
        &self,
    ) -> (
        Vec<flow_protocol::ExitThreshold>,
        flow_protocol::ConfidenceMeasure,
    ) {
        let measure = match self.measure {
            ConfidenceMeasure::MaxProb => flow_protocol::ConfidenceMeasure::MaxProb,
            ConfidenceMeasure::Margin => flow_protocol::ConfidenceMeasure::Margin,
            ConfidenceMeasure::NegEntropy => flow_protocol::ConfidenceMeasure::NegEntropy,
        };
        let thresholds = self
            .exits
            .iter()
            .filter(|e| e.point != self.deepest_exit)
            .map(|e| flow_protocol::ExitThreshold {
                // Checked when read: every point fits.
                exit: u32::try_from(e.point).unwrap_or(u32::MAX),
                // No threshold meets the target: this exit always escalates.
                threshold: e.threshold.map_or(ALWAYS_ESCALATE, |t| t as f32),
            })
            .collect();
        (thresholds, measure)
    }

    /// The planner's exits of the model `cfg` with this file's agreement curves: one per exit
    /// of the model, at its planner depth ([`planner_depths`]); the deepest has no curve.
    /// Errors when the file has no entry for an exit of the model.
    pub fn exit_specs(&self, cfg: &ModelConfig) -> Result<Vec<ExitSpec>> {
        let depths = planner_depths(cfg);
        let mut specs = Vec::new();
        for (point, depth) in cfg.exit_points().into_iter().zip(depths) {
            let entry = self
                .exits
                .iter()
                .find(|e| e.point == point)
                .ok_or_else(|| {
                    NodeError::Config(format!(
                        "the calibration file has no entry for exit {point}"
                    ))
                })?;
            specs.push(ExitSpec {
                depth,
                curve: if depth == cfg.num_layers {
                    Vec::new()
                } else {
                    entry.curve.clone()
                },
            });
        }
        Ok(specs)
    }
}
