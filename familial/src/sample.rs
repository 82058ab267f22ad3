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
        // (id, log-weight): the weights are exp of these, needed only for top-p
        let mut cand: Vec<(u32, f32)> = row
            .iter()
            .enumerate()
            .map(|(i, &x)| (i as u32, (x - max) / t))
            .collect();
        if self.params.top_k > 0 || self.params.top_p < 1.0 {
            cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        }
        if self.params.top_k > 0 {
            cand.truncate(self.params.top_k);
        }
        if self.params.top_p < 1.0 {
            let total: f32 = cand.iter().map(|c| c.1.exp()).sum();
            let mut acc = 0.0;
            let mut keep = cand.len();
            for (i, c) in cand.iter().enumerate() {
                acc += c.1.exp() / total;
                if acc >= self.params.top_p {
                    keep = i + 1;
                    break;
                }
            }
            cand.truncate(keep.max(1));
        }
        // Gumbel-max: the candidate maximising ln w + G is an exact sample of w / Σw. The
        // noise G is keyed by (one draw of this sampler, token id), not by rank: two samplers
        // seeded alike (a drafting exit and the verifier at one position) share every token's
        // noise, so they pick the same token whenever their distributions are close — the
        // coupling that lets speculative decoding accept sampled drafts while each side
        // still samples its own distribution exactly.
        let key = self.rng.gen::<u64>();
        let mut best = (f32::NEG_INFINITY, cand.first().map_or(0, |c| c.0));
        for &(id, log_w) in &cand {
            let score = log_w + gumbel(key, id);
            if score > best.0 {
                best = (score, id);
            }
        }
        best.1
    }
}

/// Standard Gumbel noise for token `id` under `key`: `-ln(-ln u)`, `u` uniform in (0, 1)
/// from a SplitMix64 hash of (key, id).
fn gumbel(key: u64, id: u32) -> f32 {
    let mut z = key ^ u64::from(id).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    let u = ((z >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    (-(-u.ln()).ln()) as f32
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

    fn softmax(row: &[f32], t: f32) -> Vec<f64> {
        let w: Vec<f64> = row.iter().map(|&x| f64::from(x / t).exp()).collect();
        let total: f64 = w.iter().sum();
        w.iter().map(|x| x / total).collect()
    }

    fn params(seed: u64) -> SamplingParams {
        SamplingParams {
            temperature: 0.8,
            seed,
            ..SamplingParams::default()
        }
    }

    #[test]
    fn sampling_follows_the_distribution() {
        let row = [1.0, 0.2, -0.5, 2.0, 0.0, -2.0];
        let p = softmax(&row, 0.8);
        let n = 60_000;
        let mut counts = [0usize; 6];
        for seed in 0..n {
            counts[Sampler::new(params(seed)).sample(&row) as usize] += 1;
        }
        // chi-square, 5 degrees of freedom: 20.5 is the upper 0.001 point
        let chi2: f64 = p
            .iter()
            .zip(counts)
            .map(|(&pi, o)| (o as f64 - pi * n as f64).powi(2) / (pi * n as f64))
            .sum();
        assert!(chi2 < 20.5, "chi2 {chi2}: {counts:?} vs {p:?}");
    }

    #[test]
    fn samplers_seeded_alike_agree_when_their_distributions_are_close() {
        // a drafter's logits: the verifier's, perturbed
        let p_row = [1.0, 0.2, -0.5, 2.0, 0.0, -2.0];
        let q_row = [1.2, 0.1, -0.4, 1.7, 0.1, -1.8];
        let (p, q) = (softmax(&p_row, 0.8), softmax(&q_row, 0.8));
        let overlap: f64 = p.iter().zip(&q).map(|(a, b)| a.min(*b)).sum();
        let tv = 1.0 - overlap;
        let n = 20_000;
        let same = (0..n)
            .filter(|&seed| {
                Sampler::new(params(seed)).sample(&p_row)
                    == Sampler::new(params(seed)).sample(&q_row)
            })
            .count() as f64
            / n as f64;
        // Gumbel coupling: P(same) >= (1 - TV) / (1 + TV); at most the overlap (the best
        // any coupling, and the accept/reject rule, can do)
        let floor = (1.0 - tv) / (1.0 + tv);
        eprintln!("agreement {same:.3}, floor {floor:.3}, overlap {overlap:.3}");
        assert!(
            same >= floor - 0.01 && same <= overlap + 0.01,
            "agreement {same:.3}, floor {floor:.3}, overlap {overlap:.3}"
        );
    }
}
