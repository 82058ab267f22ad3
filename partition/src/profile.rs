//! Compute and memory profiles of a node running a model, wire encodings and the bytes
//! they put on a link, and least-squares fitting of profiles from measured samples.
//!
//! All times are milliseconds, all sizes bytes. A [`Linear`] cost is `a + b·x`: for
//! prefill `x` is the number of tokens in the forward (so `a` is the fixed per-call
//! overhead and `b` the per-token cost); for decode `x` is the context length.
//!
//! The agent measures a short self-benchmark, feeds the samples to [`fit_node_profile`],
//! and caches the resulting [`NodeProfile`] on disk under its [`ProfileKey`] (the IO is the
//! agent's; this module only provides the key and serde types).

use serde::{Deserialize, Serialize};

use crate::error::{check_non_negative, check_positive, Error, Result};

/// `a + b·x`, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Linear {
    /// Fixed part (ms).
    pub a: f64,
    /// Slope (ms per unit of `x`).
    pub b: f64,
}

impl Linear {
    /// A cost that does not depend on `x`.
    pub const fn constant(a: f64) -> Self {
        Self { a, b: 0.0 }
    }

    /// Zero cost.
    pub const ZERO: Self = Self { a: 0.0, b: 0.0 };

    /// `a + b·x`.
    pub fn eval(&self, x: f64) -> f64 {
        self.a + self.b * x
    }

    /// `self` scaled by `k` (both coefficients).
    pub fn scaled(&self, k: f64) -> Self {
        Self {
            a: self.a * k,
            b: self.b * k,
        }
    }

    pub(crate) fn validate(&self, field: &str) -> Result<()> {
        check_non_negative(format!("{field}.a"), self.a)?;
        check_non_negative(format!("{field}.b"), self.b)?;
        Ok(())
    }
}

/// One measurement `(x, y)`: e.g. `(tokens, ms)` for prefill or `(context, ms)` for decode.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// Independent variable (tokens or context length).
    pub x: f64,
    /// Measured time (ms).
    pub y: f64,
}

/// Ordinary least squares fit of `y = a + b·x`, constrained to `a, b >= 0` (a negative
/// coefficient from noise is clamped to zero and the other refitted).
///
/// With a single distinct `x` the slope is unidentifiable and the fit is the constant
/// `mean(y)`. Errors: no samples, or a NaN/infinite/negative value.
pub fn fit_linear(samples: &[Sample]) -> Result<Linear> {
    if samples.is_empty() {
        return Err(Error::TooFewSamples {
            what: "a linear fit".into(),
            needed: 1,
            got: 0,
        });
    }
    for (i, s) in samples.iter().enumerate() {
        check_non_negative(format!("samples[{i}].x"), s.x)?;
        check_non_negative(format!("samples[{i}].y"), s.y)?;
    }
    let n = samples.len() as f64;
    let mx = samples.iter().map(|s| s.x).sum::<f64>() / n;
    let my = samples.iter().map(|s| s.y).sum::<f64>() / n;
    let sxx: f64 = samples.iter().map(|s| (s.x - mx) * (s.x - mx)).sum();
    let sxy: f64 = samples.iter().map(|s| (s.x - mx) * (s.y - my)).sum();
    if sxx <= f64::EPSILON * (1.0 + mx * mx) * n {
        return Ok(Linear::constant(my));
    }
    let b = sxy / sxx;
    let a = my - b * mx;
    if b < 0.0 {
        return Ok(Linear::constant(my));
    }
    if a < 0.0 {
        // Through the origin: b = Σxy / Σx².
        let sx2: f64 = samples.iter().map(|s| s.x * s.x).sum();
        let sxy0: f64 = samples.iter().map(|s| s.x * s.y).sum();
        return Ok(Linear {
            a: 0.0,
            b: sxy0 / sx2,
        });
    }
    Ok(Linear { a, b })
}

/// How a hidden state is encoded on the wire (mirrors `flow-protocol`'s encodings).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WireEncoding {
    /// 4 bytes per element, lossless.
    F32,
    /// 2 bytes per element.
    F16,
    /// 2 bytes per element.
    Bf16,
    /// 1 byte per element plus one f32 scale per row.
    Int8,
}

impl WireEncoding {
    /// All encodings, in a fixed order.
    pub const ALL: [WireEncoding; 4] = [Self::F32, Self::F16, Self::Bf16, Self::Int8];

    /// Bytes of one row (one token's hidden state) of width `hidden`, before compression.
    pub fn row_bytes(self, hidden: usize) -> u64 {
        let h = hidden as u64;
        match self {
            Self::F32 => 4 * h,
            Self::F16 | Self::Bf16 => 2 * h,
            Self::Int8 => h + 4,
        }
    }

    /// Whether the encoding changes the numbers (everything but f32).
    pub fn is_lossy(self) -> bool {
        !matches!(self, Self::F32)
    }

    /// Lower-case name, as in serde and the CLI.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
            Self::Int8 => "int8",
        }
    }
}

/// Bytes on the wire for `rows` hidden-state rows of width `hidden` in `encoding`, with an
/// optional zstd ratio (compressed / raw, in `(0, 1]`; `None` = no compression).
pub fn activation_bytes(
    hidden: usize,
    encoding: WireEncoding,
    rows: u64,
    zstd_ratio: Option<f64>,
) -> f64 {
    let raw = (encoding.row_bytes(hidden) * rows) as f64;
    raw * zstd_ratio.unwrap_or(1.0)
}

/// Key under which the agent caches a measured profile on disk.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ProfileKey {
    /// Fingerprint of the checkpoint (e.g. a hash of config + safetensors header).
    pub model_fingerprint: String,
    /// Description of the CPU/accelerator (model name, core count, thread setting).
    pub cpu: String,
}

impl ProfileKey {
    /// A file-name-safe string for the cache: `<fingerprint>-<cpu>` with every character
    /// outside `[A-Za-z0-9._-]` replaced by `_`.
    pub fn file_stem(&self) -> String {
        format!("{}-{}", self.model_fingerprint, self.cpu)
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    }
}

/// Cost of one block (a trunk layer, or an exit head: its extra block + norm + lm_head).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BlockCost {
    /// Prefill time for a forward of `x` tokens: `a` per call + `b` per token (ms).
    pub prefill: Linear,
    /// Decode time of one token at context length `x` (ms).
    pub decode: Linear,
    /// Weights resident in memory (bytes).
    pub weight_bytes: u64,
    /// KV cache per token of context (bytes); zero for blocks without attention.
    pub kv_bytes_per_token: u64,
}

impl BlockCost {
    pub(crate) fn validate(&self, field: &str) -> Result<()> {
        self.prefill.validate(&format!("{field}.prefill"))?;
        self.decode.validate(&format!("{field}.decode"))?;
        Ok(())
    }

    /// Memory for weights plus a KV cache of `kv_tokens` tokens.
    pub fn memory_bytes(&self, kv_tokens: u64) -> u64 {
        self.weight_bytes
            .saturating_add(self.kv_bytes_per_token.saturating_mul(kv_tokens))
    }
}

/// Profile of an exit head at a given depth.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ExitCost {
    /// Number of trunk layers before the exit (the exit reads the hidden state after
    /// layers `[0, depth)`).
    pub depth: usize,
    /// Cost of the head.
    pub cost: BlockCost,
}

/// A node's measured profile for one model: per trunk layer, per exit, plus fixed
/// overheads per forward (embedding, sampling, scheduling).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeProfile {
    /// Cache key.
    pub key: ProfileKey,
    /// Fixed cost of a forward on this node (ms): prefill (`x` = tokens) and decode
    /// (`x` = context). Includes embedding when the node hosts layer 0.
    pub overhead: BlockCost,
    /// One entry per trunk layer, index = layer.
    pub layers: Vec<BlockCost>,
    /// One entry per exit, by depth.
    pub exits: Vec<ExitCost>,
}

impl NodeProfile {
    /// Checks every number; `num_layers` is the model's layer count.
    pub fn validate(&self, field: &str, num_layers: usize) -> Result<()> {
        if self.layers.len() != num_layers {
            return Err(Error::InvalidInput {
                field: format!("{field}.layers"),
                reason: format!(
                    "profile has {} layers, the model has {num_layers}",
                    self.layers.len()
                ),
            });
        }
        self.overhead.validate(&format!("{field}.overhead"))?;
        for (i, l) in self.layers.iter().enumerate() {
            l.validate(&format!("{field}.layers[{i}]"))?;
        }
        for (i, e) in self.exits.iter().enumerate() {
            e.cost.validate(&format!("{field}.exits[{i}]"))?;
        }
        Ok(())
    }

    /// The exit head at `depth`, if profiled.
    pub fn exit(&self, depth: usize) -> Option<&ExitCost> {
        self.exits.iter().find(|e| e.depth == depth)
    }

    /// A copy with every time multiplied by `k` (memory unchanged): a slower or faster
    /// node of the same kind.
    pub fn time_scaled(&self, k: f64) -> Self {
        let scale = |c: &BlockCost| BlockCost {
            prefill: c.prefill.scaled(k),
            decode: c.decode.scaled(k),
            ..*c
        };
        Self {
            key: self.key.clone(),
            overhead: scale(&self.overhead),
            layers: self.layers.iter().map(scale).collect(),
            exits: self
                .exits
                .iter()
                .map(|e| ExitCost {
                    depth: e.depth,
                    cost: scale(&e.cost),
                })
                .collect(),
        }
    }

    /// A uniform made-up profile: every layer costs the same. Handy in tests and examples.
    pub fn uniform(
        key: ProfileKey,
        num_layers: usize,
        layer: BlockCost,
        exit_depths: &[usize],
        exit: BlockCost,
        overhead: BlockCost,
    ) -> Self {
        Self {
            key,
            overhead,
            layers: vec![layer; num_layers],
            exits: exit_depths
                .iter()
                .map(|&depth| ExitCost { depth, cost: exit })
                .collect(),
        }
    }
}

/// Raw self-benchmark samples for one block.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BlockSamples {
    /// `(tokens in the forward, ms)`.
    pub prefill: Vec<Sample>,
    /// `(context length, ms)` for one decoded token.
    pub decode: Vec<Sample>,
    /// Weights of the block (bytes), known from the checkpoint.
    pub weight_bytes: u64,
    /// KV bytes per token of context, known from the config.
    pub kv_bytes_per_token: u64,
}

/// Raw self-benchmark samples for a node, as the agent measures them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProfileSamples {
    /// Per-forward overhead samples (embedding, sampling).
    pub overhead: BlockSamples,
    /// One entry per trunk layer.
    pub layers: Vec<BlockSamples>,
    /// `(depth, samples)` per exit head.
    pub exits: Vec<(usize, BlockSamples)>,
}

fn fit_block(s: &BlockSamples) -> Result<BlockCost> {
    Ok(BlockCost {
        prefill: fit_linear(&s.prefill)?,
        decode: fit_linear(&s.decode)?,
        weight_bytes: s.weight_bytes,
        kv_bytes_per_token: s.kv_bytes_per_token,
    })
}

/// Fits a [`NodeProfile`] from raw samples (least squares per block, see [`fit_linear`]).
/// Overhead samples may be empty (zero overhead); every layer and exit needs samples.
pub fn fit_node_profile(key: ProfileKey, samples: &ProfileSamples) -> Result<NodeProfile> {
    let overhead = BlockCost {
        prefill: if samples.overhead.prefill.is_empty() {
            Linear::ZERO
        } else {
            fit_linear(&samples.overhead.prefill)?
        },
        decode: if samples.overhead.decode.is_empty() {
            Linear::ZERO
        } else {
            fit_linear(&samples.overhead.decode)?
        },
        weight_bytes: samples.overhead.weight_bytes,
        kv_bytes_per_token: samples.overhead.kv_bytes_per_token,
    };
    let layers = samples
        .layers
        .iter()
        .map(fit_block)
        .collect::<Result<Vec<_>>>()?;
    let mut exits = samples
        .exits
        .iter()
        .map(|(depth, s)| {
            Ok(ExitCost {
                depth: *depth,
                cost: fit_block(s)?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    exits.sort_by_key(|e| e.depth);
    Ok(NodeProfile {
        key,
        overhead,
        layers,
        exits,
    })
}

/// Checks that `v` is a usable zstd ratio.
pub(crate) fn check_zstd_ratio(field: &str, v: Option<f64>) -> Result<()> {
    if let Some(r) = v {
        check_positive(field, r)?;
        if r > 1.0 {
            return Err(Error::InvalidInput {
                field: field.into(),
                reason: format!("a zstd ratio is compressed/raw, in (0, 1], got {r}"),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn fit_recovers_any_non_negative_line(a in 0.0f64..100.0, b in 0.0f64..10.0, n in 2usize..50) {
            let pts: Vec<_> = (0..n).map(|i| s(i as f64 * 16.0, a + b * i as f64 * 16.0)).collect();
            let f = fit_linear(&pts).unwrap();
            prop_assert!((f.a - a).abs() < 1e-6 * (1.0 + a) + 1e-6);
            prop_assert!((f.b - b).abs() < 1e-6 * (1.0 + b));
        }
    }

    fn s(x: f64, y: f64) -> Sample {
        Sample { x, y }
    }

    #[test]
    fn fit_recovers_exact_line() {
        let pts: Vec<_> = (0..10).map(|i| s(i as f64, 2.0 + 0.5 * i as f64)).collect();
        let f = fit_linear(&pts).unwrap();
        assert!(
            (f.a - 2.0).abs() < 1e-9 && (f.b - 0.5).abs() < 1e-9,
            "{f:?}"
        );
    }

    #[test]
    fn fit_single_x_is_constant_mean() {
        let f = fit_linear(&[s(3.0, 1.0), s(3.0, 3.0)]).unwrap();
        assert_eq!(f, Linear::constant(2.0));
    }

    #[test]
    fn fit_clamps_negative_coefficients() {
        let f = fit_linear(&[s(0.0, 3.0), s(1.0, 2.0), s(2.0, 1.0)]).unwrap();
        assert_eq!(f.b, 0.0);
        let f = fit_linear(&[s(1.0, 0.0), s(2.0, 2.0), s(3.0, 4.0)]).unwrap();
        assert_eq!(f.a, 0.0);
        assert!(f.b > 0.0);
    }

    #[test]
    fn fit_rejects_bad_input() {
        assert!(matches!(fit_linear(&[]), Err(Error::TooFewSamples { .. })));
        let e = fit_linear(&[s(1.0, f64::NAN)]).unwrap_err();
        assert!(e.to_string().contains("samples[0].y"), "{e}");
        assert!(fit_linear(&[s(-1.0, 1.0)]).is_err());
    }

    #[test]
    fn encodings_sizes() {
        assert_eq!(WireEncoding::F32.row_bytes(100), 400);
        assert_eq!(WireEncoding::F16.row_bytes(100), 200);
        assert_eq!(WireEncoding::Bf16.row_bytes(100), 200);
        assert_eq!(WireEncoding::Int8.row_bytes(100), 104);
        assert_eq!(
            activation_bytes(100, WireEncoding::F32, 3, Some(0.5)),
            600.0
        );
        assert_eq!(
            serde_json::to_string(&WireEncoding::Bf16).unwrap(),
            "\"bf16\""
        );
    }

    #[test]
    fn profile_fits_and_round_trips() {
        let key = ProfileKey {
            model_fingerprint: "abc/123".into(),
            cpu: "x86 2 cores".into(),
        };
        assert_eq!(key.file_stem(), "abc_123-x86_2_cores");
        let block = BlockSamples {
            prefill: vec![s(1.0, 1.5), s(9.0, 5.5)],
            decode: vec![s(10.0, 1.1), s(110.0, 2.1)],
            weight_bytes: 1000,
            kv_bytes_per_token: 16,
        };
        let samples = ProfileSamples {
            overhead: BlockSamples::default(),
            layers: vec![block.clone(); 4],
            exits: vec![(4, block.clone()), (2, block)],
        };
        let p = fit_node_profile(key, &samples).unwrap();
        assert_eq!(p.exits[0].depth, 2);
        assert!((p.layers[0].prefill.b - 0.5).abs() < 1e-9);
        assert!((p.layers[0].decode.b - 0.01).abs() < 1e-9);
        p.validate("p", 4).unwrap();
        let json = serde_json::to_string(&p).unwrap();
        let back: NodeProfile = serde_json::from_str(&json).unwrap();
        assert_eq!(back, p);
    }
}
