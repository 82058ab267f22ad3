//! Confidence of an exit's prediction, from its logits: the maximum softmax probability,
//! the margin between the top two probabilities, and the entropy (CALM's softmax measures).
//! Higher [`Confidence::score`] always means "more sure", whatever the measure.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::error::Result;

/// Which number decides whether an exit is confident.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Measure {
    /// Largest softmax probability.
    #[default]
    MaxProb,
    /// Top-1 minus top-2 probability.
    Margin,
    /// Negated entropy in nats (0 = certain).
    NegEntropy,
}

impl std::str::FromStr for Measure {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "max_prob" | "max-prob" => Ok(Measure::MaxProb),
            "margin" => Ok(Measure::Margin),
            "neg_entropy" | "entropy" => Ok(Measure::NegEntropy),
            other => Err(format!(
                "unknown confidence measure `{other}` (use max_prob, margin or entropy)"
            )),
        }
    }
}

/// What one row of logits says.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Confidence {
    /// Greedy token (lowest id on ties).
    pub token: u32,
    pub max_prob: f32,
    pub margin: f32,
    /// Entropy in nats.
    pub entropy: f32,
}

impl Confidence {
    /// The score of `measure` (higher = more confident).
    pub fn score(&self, measure: Measure) -> f32 {
        match measure {
            Measure::MaxProb => self.max_prob,
            Measure::Margin => self.margin,
            Measure::NegEntropy => -self.entropy,
        }
    }

    /// Confidence of one row of logits.
    pub fn of_row(row: &[f32]) -> Self {
        let mut best = 0usize;
        let mut max = f32::NEG_INFINITY;
        for (i, &x) in row.iter().enumerate() {
            if x > max {
                max = x;
                best = i;
            }
        }
        if !max.is_finite() {
            return Self {
                token: best as u32,
                max_prob: 0.0,
                margin: 0.0,
                entropy: f32::INFINITY,
            };
        }
        let mut z = 0f64;
        for &x in row {
            z += ((x - max) as f64).exp();
        }
        let lz = z.ln();
        let mut entropy = 0f64;
        let mut p1 = 0f64;
        let mut p2 = 0f64;
        for &x in row {
            let lp = (x - max) as f64 - lz;
            let p = lp.exp();
            if p > 0.0 {
                entropy -= p * lp;
            }
            if p > p1 {
                p2 = p1;
                p1 = p;
            } else if p > p2 {
                p2 = p;
            }
        }
        Self {
            token: best as u32,
            max_prob: p1 as f32,
            margin: (p1 - p2) as f32,
            entropy: entropy as f32,
        }
    }
}

/// One [`Confidence`] per row of `logits` (`[rows, vocab]`).
pub fn confidences(logits: &Tensor) -> Result<Vec<Confidence>> {
    let rows: Vec<Vec<f32>> = logits.to_vec2()?;
    Ok(rows.iter().map(|r| Confidence::of_row(r)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_agree_with_hand_computation() {
        let c = Confidence::of_row(&[0.0, (3f32).ln(), 0.0]);
        // probs 0.2, 0.6, 0.2
        assert_eq!(c.token, 1);
        assert!((c.max_prob - 0.6).abs() < 1e-6);
        assert!((c.margin - 0.4).abs() < 1e-6);
        let h = -(0.6f64 * 0.6f64.ln() + 2.0 * 0.2 * 0.2f64.ln());
        assert!((c.entropy as f64 - h).abs() < 1e-6);
        assert!(c.score(Measure::NegEntropy) < 0.0);
        let u = Confidence::of_row(&[1.0; 4]);
        assert_eq!(u.token, 0);
        assert!((u.entropy - 4f32.ln()).abs() < 1e-6 && u.margin == 0.0);
    }
}
