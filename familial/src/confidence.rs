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
        // One exponential per entry (this runs on every answered token over the whole
        // vocabulary): with e_i = exp(x_i - max) and z = Σ e_i, p_i = e_i / z and
        // H = -Σ p_i ln p_i = ln z - Σ e_i (x_i - max) / z; the top probability is
        // 1 / z (e = 1 at the argmax), the runner-up e_2 / z.
        let mut z = 0f64;
        let mut weighted = 0f64;
        let mut second = 0f64;
        for (i, &x) in row.iter().enumerate() {
            let d = (x - max) as f64;
            let e = d.exp();
            z += e;
            if e > 0.0 {
                // (a masked -inf logit would make 0 * -inf = NaN)
                weighted += e * d;
            }
            if i != best && e > second {
                second = e;
            }
        }
        let p1 = 1.0 / z;
        let p2 = second / z;
        let entropy = (z.ln() - weighted / z).max(0.0);
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

    /// The textbook two-pass computation (p = exp(lp), H = -Σ p lp).
    fn two_pass(row: &[f32]) -> (f32, f32, f32) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let lz = row
            .iter()
            .map(|&x| ((x - max) as f64).exp())
            .sum::<f64>()
            .ln();
        let mut p: Vec<f64> = row.iter().map(|&x| ((x - max) as f64 - lz).exp()).collect();
        let h: f64 = row
            .iter()
            .zip(&p)
            .filter(|(_, &q)| q > 0.0)
            .map(|(&x, &q)| -q * ((x - max) as f64 - lz))
            .sum();
        p.sort_by(|a, b| b.total_cmp(a));
        (p[0] as f32, (p[0] - p[1]) as f32, h as f32)
    }

    #[test]
    fn one_pass_equals_the_two_pass_definition() {
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            (rng >> 40) as f32 / (1u64 << 24) as f32
        };
        for (n, scale) in [(2, 1.0), (7, 30.0), (1000, 4.0), (49_152, 12.0)] {
            let mut row: Vec<f32> = (0..n).map(|_| (next() - 0.5) * scale).collect();
            if n > 2 {
                row[1] = f32::NEG_INFINITY; // a masked entry
            }
            let c = Confidence::of_row(&row);
            let (p1, margin, h) = two_pass(&row);
            assert!(
                (c.max_prob - p1).abs() <= 1e-6 * p1.max(1e-3),
                "{n}: {} {p1}",
                c.max_prob
            );
            assert!(
                (c.margin - margin).abs() <= 1e-6,
                "{n}: {} {margin}",
                c.margin
            );
            assert!(
                (c.entropy - h).abs() <= 1e-5 * h.max(1.0),
                "{n}: {} {h}",
                c.entropy
            );
        }
        // A tie: no margin.
        let c = Confidence::of_row(&[1.0, 3.0, 3.0]);
        assert_eq!((c.token, c.margin), (1, 0.0));
    }

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
