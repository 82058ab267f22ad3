//! Monotone calibration of the model's congestion index (issue 9).
//!
//! The vision model's congestion estimate is biased near zero: an empty approach reads
//! +0.02..+0.04, enough to stop it from gapping out. [`CiCalibration::fit`] fits an isotonic
//! (pool-adjacent-violators) regression of the true index on the predicted one, on frames
//! whose truth is known (SUMO runs of the *training* seeds, never the benchmark's), and
//! stores it as a piecewise-linear map (`ci_calibration.json` next to the model).
//! [`CiCalibration::apply`] interpolates between the knots, is flat outside them, and clamps
//! to `[0, 1]`; it is monotone non-decreasing, so it never reorders two approaches.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::sumo::{Detection, Detector};
use crate::{Error, Result};

/// File name of the calibration inside a model folder.
pub const FILE: &str = "ci_calibration.json";

/// Piecewise-linear, non-decreasing map from predicted to calibrated congestion index.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CiCalibration {
    /// `(predicted, calibrated)` knots, strictly increasing in `predicted`, non-decreasing
    /// in `calibrated`, both in `[0, 1]`.
    pub knots: Vec<(f32, f32)>,
    /// Frames the fit saw (for the record).
    #[serde(default)]
    pub frames: usize,
    /// Where the frames came from (for the record).
    #[serde(default)]
    pub source: String,
}

impl CiCalibration {
    /// Isotonic fit of `truth` on `pred`. Points are sorted by prediction, pooled by the
    /// pool-adjacent-violators algorithm (equal weights), and each pooled block becomes one
    /// knot at its mean prediction. Blocks with fewer than `min_block` points are merged
    /// with a neighbour so that the map is not driven by single frames.
    pub fn fit(pred: &[f32], truth: &[f32], min_block: usize) -> Result<CiCalibration> {
        if pred.len() != truth.len() || pred.is_empty() {
            return Err(Error::Config(format!(
                "calibration: need equal, non-empty prediction and truth lists (got {} and {})",
                pred.len(),
                truth.len()
            )));
        }
        if pred.iter().chain(truth).any(|v| !v.is_finite()) {
            return Err(Error::Config("calibration: non-finite value".into()));
        }
        let mut pts: Vec<(f64, f64)> = pred
            .iter()
            .zip(truth)
            .map(|(&p, &t)| (p.clamp(0.0, 1.0) as f64, t.clamp(0.0, 1.0) as f64))
            .collect();
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        // Blocks: (sum pred, sum truth, count).
        let mut blocks: Vec<(f64, f64, usize)> = Vec::new();
        for (p, t) in pts {
            blocks.push((p, t, 1));
            while blocks.len() >= 2 {
                let n = blocks.len();
                let (a, b) = (blocks[n - 2], blocks[n - 1]);
                let small = a.2 < min_block;
                if a.1 / a.2 as f64 >= b.1 / b.2 as f64 || small {
                    blocks[n - 2] = (a.0 + b.0, a.1 + b.1, a.2 + b.2);
                    blocks.pop();
                } else {
                    break;
                }
            }
        }
        // A short last block joins its neighbour (still monotone: pooling two ordered
        // blocks gives a mean between them).
        while blocks.len() >= 2 && blocks[blocks.len() - 1].2 < min_block {
            let b = blocks.pop().unwrap_or_default();
            if let Some(a) = blocks.last_mut() {
                *a = (a.0 + b.0, a.1 + b.1, a.2 + b.2);
            }
        }
        let mut knots: Vec<(f32, f32)> = Vec::with_capacity(blocks.len());
        for (sp, st, n) in blocks {
            let (x, y) = ((sp / n as f64) as f32, (st / n as f64) as f32);
            match knots.last_mut() {
                // Identical mean predictions: keep the later (higher) value.
                Some(last) if x <= last.0 => last.1 = last.1.max(y),
                _ => knots.push((x, y)),
            }
        }
        // Enforce monotone y after the merges above (they can only keep it, but be exact).
        for i in 1..knots.len() {
            if knots[i].1 < knots[i - 1].1 {
                knots[i].1 = knots[i - 1].1;
            }
        }
        Ok(CiCalibration {
            knots,
            frames: pred.len(),
            source: String::new(),
        })
    }

    /// Calibrated index for a predicted one: linear between knots, slope 1 outside, in `[0, 1]`.
    pub fn apply(&self, pred: f32) -> f32 {
        let k = &self.knots;
        let out = match k.len() {
            0 => pred,
            _ if !pred.is_finite() => pred,
            // Outside the fitted range there is no data: keep the model's slope (1) and the
            // nearest knot's offset rather than flattening, so a long queue the fit never saw
            // is not capped at the largest fitted value.
            _ if pred <= k[0].0 => pred + (k[0].1 - k[0].0),
            n if pred >= k[n - 1].0 => pred + (k[n - 1].1 - k[n - 1].0),
            _ => {
                let i = k.partition_point(|&(x, _)| x <= pred);
                let ((x0, y0), (x1, y1)) = (k[i - 1], k[i]);
                y0 + (y1 - y0) * (pred - x0) / (x1 - x0)
            }
        };
        out.clamp(0.0, 1.0)
    }

    /// Check the invariants (for files read from disk).
    pub fn validate(&self) -> Result<()> {
        for w in self.knots.windows(2) {
            if !(w[1].0 > w[0].0 && w[1].1 >= w[0].1) {
                return Err(Error::Config(format!(
                    "calibration: knots must increase ({:?} then {:?})",
                    w[0], w[1]
                )));
            }
        }
        if self
            .knots
            .iter()
            .any(|&(x, y)| !(0.0..=1.0).contains(&x) || !(0.0..=1.0).contains(&y))
        {
            return Err(Error::Config(
                "calibration: knots must lie in [0, 1]".into(),
            ));
        }
        Ok(())
    }

    /// Read `dir/ci_calibration.json`; `Ok(None)` when the file does not exist.
    pub fn load(dir: &Path) -> Result<Option<CiCalibration>> {
        let path = dir.join(FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(&path, e)),
        };
        let c: CiCalibration = serde_json::from_str(&text)
            .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        c.validate()?;
        Ok(Some(c))
    }

    /// Write `dir/ci_calibration.json`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let path = dir.join(FILE);
        let text = serde_json::to_string_pretty(self).map_err(|e| Error::Config(e.to_string()))?;
        std::fs::write(&path, text).map_err(|e| Error::io(&path, e))
    }
}

/// A detector whose congestion index goes through a calibration.
pub struct Calibrated {
    pub inner: Box<dyn Detector>,
    pub calibration: CiCalibration,
}

impl Detector for Calibrated {
    fn detect(
        &mut self,
        approach: crate::controller::Approach,
        frame: &crate::render::Frame,
    ) -> Result<Detection> {
        let d = self.inner.detect(approach, frame)?;
        Ok(Detection {
            congestion: self.calibration.apply(d.congestion),
            ..d
        })
    }

    fn name(&self) -> String {
        format!("{}+cal", self.inner.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_on_perfect_data() {
        let xs: Vec<f32> = (0..200).map(|i| i as f32 / 199.0).collect();
        let c = CiCalibration::fit(&xs, &xs, 1).unwrap();
        for &x in &[0.0f32, 0.013, 0.2, 0.5, 0.77, 1.0] {
            assert!((c.apply(x) - x).abs() < 1e-4, "{x} -> {}", c.apply(x));
        }
    }

    #[test]
    fn removes_an_offset_near_zero_and_is_monotone() {
        // Empty approaches (truth 0) read 0.03..0.05; loaded ones read their truth.
        let mut p = Vec::new();
        let mut t = Vec::new();
        for i in 0..100 {
            p.push(0.03 + 0.02 * i as f32 / 100.0);
            t.push(0.0);
            let x = 0.1 + 0.4 * i as f32 / 100.0;
            p.push(x);
            t.push(x);
        }
        let c = CiCalibration::fit(&p, &t, 5).unwrap();
        c.validate().unwrap();
        assert!(c.apply(0.04) < 0.005, "{}", c.apply(0.04));
        assert!((c.apply(0.3) - 0.3).abs() < 0.02, "{}", c.apply(0.3));
        let mut prev = -1.0f32;
        for i in 0..=1000 {
            let y = c.apply(i as f32 / 1000.0);
            assert!(y >= prev - 1e-6, "not monotone at {i}");
            prev = y;
        }
    }

    #[test]
    fn pools_violators_and_clamps() {
        // Decreasing truth: one pooled block at the mean.
        let c = CiCalibration::fit(&[0.1, 0.2, 0.3], &[0.9, 0.5, 0.1], 1).unwrap();
        assert_eq!(c.knots.len(), 1);
        assert!((c.apply(0.2) - 0.5).abs() < 1e-6);
        // Outside the knots: slope 1 from the nearest knot.
        assert!((c.apply(0.3) - 0.6).abs() < 1e-6);
        // Out-of-range inputs and truths are clamped.
        let c = CiCalibration::fit(&[-0.5, 0.5, 1.5], &[-1.0, 0.5, 2.0], 1).unwrap();
        c.validate().unwrap();
        for x in [-3.0f32, 0.0, 0.4, 1.0, 7.0] {
            assert!((0.0..=1.0).contains(&c.apply(x)));
        }
        assert!(CiCalibration::fit(&[], &[], 1).is_err());
        assert!(CiCalibration::fit(&[0.1], &[f32::NAN], 1).is_err());
    }

    #[test]
    fn roundtrips_and_rejects_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        assert!(CiCalibration::load(dir.path()).unwrap().is_none());
        let c = CiCalibration::fit(&[0.1, 0.2, 0.4], &[0.0, 0.2, 0.5], 1).unwrap();
        c.save(dir.path()).unwrap();
        assert_eq!(CiCalibration::load(dir.path()).unwrap(), Some(c));
        std::fs::write(dir.path().join(FILE), r#"{"knots":[[0.5,0.5],[0.2,0.1]]}"#).unwrap();
        assert!(CiCalibration::load(dir.path()).is_err());
    }
}
