//! Pure helpers shared by the session and the agent: tensors to and from the wire, token
//! choice, the policy's confidence measure, and positions as the wire carries them.

use candle_core::{Device, Tensor};
use flow_familial::confidence::Measure;
use flow_familial::sample::{Sampler, SamplingParams};
use flow_protocol::{
    ConfidenceMeasure, Encoding, Message, Policy, Sampling, TopLogprob, WireTensor,
};

use crate::error::{NodeError, Result};

/// Candle tensor `[rows, hidden]` → wire tensor in `enc`.
pub fn to_wire(t: &Tensor, enc: Encoding) -> Result<WireTensor> {
    let dims = t.dims().to_vec();
    let data: Vec<f32> = t.flatten_all()?.to_vec1()?;
    Ok(WireTensor::encode(&data, &dims, enc)?)
}

/// Wire tensor → candle tensor `[rows, hidden]`, checking the width.
pub fn from_wire(w: &WireTensor, hidden: usize) -> Result<Tensor> {
    let dims = w.dims();
    if dims.len() != 2 || dims[1] != hidden {
        return Err(NodeError::Protocol(format!(
            "hidden states have shape {dims:?}, expected [rows, {hidden}]"
        )));
    }
    let data = w.decode()?;
    if let Some(i) = data.iter().position(|x| !x.is_finite()) {
        return Err(NodeError::Protocol(format!(
            "hidden state element {i} is not finite"
        )));
    }
    Ok(Tensor::from_vec(data, (dims[0], dims[1]), &Device::Cpu)?)
}

/// Token choice for `position`: greedy, or sampling seeded by (seed, position) so every
/// tier picks the same token from the same logits.
pub fn choose(row: &[f32], s: &Sampling, position: usize) -> u32 {
    let params = SamplingParams {
        temperature: s.temperature,
        top_p: s.top_p,
        top_k: s.top_k as usize,
        seed: s
            .seed
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(position as u64),
    };
    Sampler::new(params).sample(row)
}

/// Log-probability of `id` in `row` (log-softmax of the raw logits) and the `top` most
/// likely tokens with theirs, most likely first (ties by lower id).
pub fn logprobs(row: &[f32], id: u32, top: u32) -> (f32, Vec<TopLogprob>) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = row.iter().map(|&x| f64::from((x - max).exp())).sum();
    let lse = max + sum.ln() as f32;
    let lp = |i: usize| row.get(i).map_or(f32::NEG_INFINITY, |&x| x - lse);
    let top = (top as usize).min(row.len());
    let mut best: Vec<usize> = Vec::with_capacity(top + 1);
    if top > 0 {
        for (i, &x) in row.iter().enumerate() {
            if best.len() == top && x <= row[best[top - 1]] {
                continue;
            }
            let at = best.partition_point(|&j| row[j] >= x);
            best.insert(at, i);
            best.truncate(top);
        }
    }
    let top = best
        .into_iter()
        .map(|i| TopLogprob {
            id: i as u32,
            logprob: lp(i),
        })
        .collect();
    (lp(id as usize), top)
}

/// The familial confidence measure named by a policy.
pub fn measure(p: &Policy) -> Measure {
    match p.measure {
        ConfidenceMeasure::MaxProb => Measure::MaxProb,
        ConfidenceMeasure::Margin => Measure::Margin,
        ConfidenceMeasure::NegEntropy => Measure::NegEntropy,
    }
}

/// Tensor payload bytes of a message (what the link carries beyond headers).
pub fn message_tensor_bytes(m: &Message) -> u64 {
    m.tensors().iter().map(|t| t.bytes().len() as u64).sum()
}

/// A position as the wire carries it (`u32`).
pub fn wire_position(p: usize) -> Result<u32> {
    u32::try_from(p).map_err(|_| {
        NodeError::Internal(format!(
            "position {p} does not fit the wire's u32 positions"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logprobs_are_log_softmax_with_sorted_alternatives() {
        let row = [1.0f32, 3.0, 2.0, 3.0, -1.0];
        let z: f32 = row.iter().map(|x| x.exp()).sum();
        let (lp, top) = logprobs(&row, 2, 3);
        assert!((lp - (2.0f32.exp() / z).ln()).abs() < 1e-6);
        let ids: Vec<u32> = top.iter().map(|t| t.id).collect();
        assert_eq!(ids, vec![1, 3, 2], "most likely first, ties by lower id");
        assert!((top[0].logprob - (3.0f32.exp() / z).ln()).abs() < 1e-6);
        let total: f32 = row.iter().map(|x| (x - z.ln()).exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
        assert!(logprobs(&row, 0, 0).1.is_empty());
        assert_eq!(logprobs(&row, 0, 99).1.len(), row.len());
        assert_eq!(logprobs(&row, 7, 0).0, f32::NEG_INFINITY);
    }
}
