//! Token selection: greedy (argmax, lowest id on ties) and seeded temperature / top-k /
//! top-p sampling.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// How to pick the next token. `temperature == 0` means greedy.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    pub temperature: f32,
    pub top_p: f32,
    /// 0 = no top-k cut.
    pub top_k: usize,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
        }
    }
}

/// Index of the largest value (lowest index on ties).
pub fn argmax(row: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut max = f32::NEG_INFINITY;
    for (i, &x) in row.iter().enumerate() {
        if x > max {
            max = x;
            best = i;
        }
    }
    best as u32
}

/// A stateful sampler (one per request).
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        Self {
            params,
            rng: StdRng::seed_from_u64(params.seed),
        }
    }

    /// Whether this sampler is greedy.
    pub fn is_greedy(&self) -> bool {
        self.params.temperature <= 0.0
    }

    /// Pick a token from one row of logits.
    pub fn sample(&mut self, row: &[f32]) -> u32 {
        if self.is_greedy() || row.is_empty() {
            return argmax(row);
        }
        let t = self.params.temperature;
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut cand: Vec<(u32, f32)> = row
            .iter()
            .enumerate()
            .map(|(i, &x)| (i as u32, ((x - max) / t).exp()))
            .collect();
        cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if self.params.top_k > 0 {
            cand.truncate(self.params.top_k);
        }
        let total: f32 = cand.iter().map(|c| c.1).sum();
        if self.params.top_p < 1.0 {
            let mut acc = 0.0;
            let mut keep = cand.len();
            for (i, c) in cand.iter().enumerate() {
                acc += c.1 / total;
                if acc >= self.params.top_p {
                    keep = i + 1;
                    break;
                }
            }
            cand.truncate(keep.max(1));
        }
        let total: f32 = cand.iter().map(|c| c.1).sum();
        let mut r = self.rng.gen::<f32>() * total;
        for c in &cand {
            r -= c.1;
            if r <= 0.0 {
                return c.0;
            }
        }
        cand.last().map(|c| c.0).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_and_seeded_sampling() {
        let row = [0.1, 2.0, 2.0, -1.0];
        assert_eq!(argmax(&row), 1);
        let mut s = Sampler::new(SamplingParams::default());
        assert_eq!(s.sample(&row), 1);
        let p = SamplingParams {
            temperature: 1.0,
            top_p: 0.9,
            top_k: 2,
            seed: 7,
        };
        let a: Vec<u32> = (0..20)
            .map({
                let mut s = Sampler::new(p);
                move |_| s.sample(&row)
            })
            .collect();
        let b: Vec<u32> = (0..20)
            .map({
                let mut s = Sampler::new(p);
                move |_| s.sample(&row)
            })
            .collect();
        assert_eq!(a, b);
        assert!(a.iter().all(|&t| t == 1 || t == 2));
    }
}
