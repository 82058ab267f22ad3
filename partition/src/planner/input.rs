//! What the planner is given: model shape, tiers, links, configuration.

use serde::{Deserialize, Serialize};

use crate::calibrate::CurvePoint;
use crate::error::{check_non_negative, check_positive, check_unit, Error, Result};
use crate::link::LinkEstimate;
use crate::profile::{check_zstd_ratio, NodeProfile, WireEncoding};

/// One exit of the family and its measured agreement curve.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExitSpec {
    /// Trunk layers before the exit (`1..=num_layers`); the deepest exit has depth
    /// `num_layers`.
    pub depth: usize,
    /// Agreement with the deepest exit and escalation fraction per threshold (from
    /// [`crate::calibrate::agreement_curve`]). Empty for the deepest exit.
    pub curve: Vec<CurvePoint>,
}

impl ExitSpec {
    /// Agreement when every token is accepted: the curve point with zero escalation, if
    /// any (1 for the deepest exit, whose curve is irrelevant).
    pub fn accept_all_agreement(&self, num_layers: usize) -> Option<f64> {
        if self.depth == num_layers {
            return Some(1.0);
        }
        self.curve
            .iter()
            .filter(|p| p.escalation == 0.0)
            .map(|p| p.agreement)
            .reduce(f64::min)
    }
}

/// The shape of the family, independent of any node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelShape {
    /// Trunk layers.
    pub num_layers: usize,
    /// Width of the hidden state shipped between tiers.
    pub hidden_size: usize,
    /// Bytes per token id when a tier ships tokens instead of hidden states (split 0).
    pub token_id_bytes: u64,
    /// Exits in increasing depth; the last has depth `num_layers`.
    pub exits: Vec<ExitSpec>,
}

impl ModelShape {
    /// Bytes of one token's payload on a link cut after `split` layers: token ids at
    /// split 0, else the hidden row in `encoding` times the zstd ratio (if any).
    pub fn payload_bytes(
        &self,
        split: usize,
        encoding: WireEncoding,
        zstd_ratio: Option<f64>,
    ) -> f64 {
        if split == 0 {
            self.token_id_bytes as f64
        } else {
            crate::profile::activation_bytes(self.hidden_size, encoding, 1, zstd_ratio)
        }
    }
}

/// Which tier a node is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TierRole {
    /// Camera, phone: the entry point.
    Device,
    /// Base station.
    Edge,
    /// Data centre.
    Cloud,
}

impl TierRole {
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Device => "device",
            Self::Edge => "edge",
            Self::Cloud => "cloud",
        }
    }
}

/// One tier: a node (or a group of identical nodes the planner treats as one).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TierSpec {
    /// Role, for naming and for the objective's energy/cost weights.
    pub role: TierRole,
    /// Measured profile of this node for this model.
    pub profile: NodeProfile,
    /// Memory available for weights and KV caches (bytes).
    pub memory_limit_bytes: u64,
    /// Multiplier (>= 1 in practice) on every compute time: queueing and sharing.
    pub load_factor: f64,
    /// Power while computing (W), for the device energy term.
    #[serde(default)]
    pub compute_power_w: f64,
    /// Power while transmitting (W), for the device energy term.
    #[serde(default)]
    pub radio_power_w: f64,
}

/// An allowed wire encoding with its measured effect.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EncodingChoice {
    /// The encoding.
    pub encoding: WireEncoding,
    /// Measured fraction of answers that change when hidden states cross one link in this
    /// encoding (an input, never assumed; 0 for f32).
    pub agreement_loss: f64,
    /// zstd compressed/raw ratio, `None` when the link does not compress.
    pub zstd_ratio: Option<f64>,
}

impl EncodingChoice {
    /// Lossless f32 without compression.
    pub const F32: Self = Self {
        encoding: WireEncoding::F32,
        agreement_loss: 0.0,
        zstd_ratio: None,
    };
}

/// Request shape the plan is optimised for.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Workload {
    /// Prompt length.
    pub prompt_tokens: u32,
    /// Generated tokens per request (>= 1).
    pub gen_tokens: u32,
    /// Sessions sharing each tier's memory and each link.
    pub concurrent_sessions: u32,
}

impl Default for Workload {
    fn default() -> Self {
        Self {
            prompt_tokens: 128,
            gen_tokens: 128,
            concurrent_sessions: 1,
        }
    }
}

/// Where the backfill of early-exited tokens costs time (see the crate docs).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackfillMode {
    /// Hidden states of every token are streamed to the parent as they are produced and
    /// computed there off the critical path; only escalated rows cost latency. A plan is
    /// rejected when streaming would use more than `max_link_utilisation` of a link.
    Background {
        /// Largest tolerated fraction of a link's goodput, in `(0, 1]`.
        max_link_utilisation: f64,
    },
    /// Pending rows travel with the next escalation and are computed before it
    /// (pessimistic): amortised, one row per token per used link.
    CriticalPath,
}

/// The weights turning latency, device energy and cloud compute into one score (ms).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Objective {
    /// ms of latency one joule of device energy is worth (0: ignore energy).
    pub device_energy_ms_per_joule: f64,
    /// ms of latency one ms of cloud compute is worth (0: ignore cloud cost).
    pub cloud_cost_ms_per_compute_ms: f64,
}

/// Planner settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PlannerConfig {
    /// Required predicted agreement with the deepest exit, e.g. 0.97.
    pub accuracy_target: f64,
    /// Allowed encodings besides lossless f32 (always allowed; an f32 entry here
    /// overrides its zstd ratio).
    pub encodings: Vec<EncodingChoice>,
    /// Lossy encodings are considered only when true.
    pub allow_lossy: bool,
    /// Score weights.
    pub objective: Objective,
    /// Request shape.
    pub workload: Workload,
    /// Backfill cost model.
    pub backfill: BackfillMode,
    /// Each tier also hosts the deepest exit in its range, to answer degraded when its
    /// parent is unreachable (costs memory, not time).
    pub host_fallback_exits: bool,
    /// Bytes of the answer travelling back down (token id, tier tag, framing).
    pub return_bytes_per_token: u64,
    /// Whether the prompt's prefill, amortised over the generated tokens, is part of the
    /// latency per token.
    pub include_prefill: bool,
    /// How many rejected alternatives a plan keeps for [`super::Plan::explain`].
    pub alternatives: usize,
    /// Cuts the running system can apply: entry `k` lists the allowed values of the
    /// boundary `b_{k+1}` between tier `k` and tier `k + 1` (an empty list, or no entry,
    /// allows every value). The agent sets it to the layers each node has loaded, so a
    /// run-time plan only moves the cut where the nodes can follow. Applies to the
    /// adaptive and static-split searches; cloud-only and device-only stay the textbook
    /// baselines.
    pub allowed_cuts: Vec<Vec<usize>>,
}

impl Default for PlannerConfig {
    fn default() -> Self {
        Self {
            accuracy_target: 0.97,
            encodings: vec![],
            allow_lossy: false,
            objective: Objective::default(),
            workload: Workload::default(),
            backfill: BackfillMode::Background {
                max_link_utilisation: 0.8,
            },
            host_fallback_exits: true,
            return_bytes_per_token: 64,
            include_prefill: true,
            alternatives: 5,
            allowed_cuts: Vec::new(),
        }
    }
}

/// Everything the planner needs. `tiers` are ordered from the entry tier up
/// (device, edge, cloud); `links[j]` joins `tiers[j]` and `tiers[j + 1]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanInput {
    /// Model shape and accuracy curves.
    pub model: ModelShape,
    /// Tiers, entry first.
    pub tiers: Vec<TierSpec>,
    /// Links between consecutive tiers.
    pub links: Vec<LinkEstimate>,
    /// Settings.
    pub config: PlannerConfig,
}

/// Most splits of the layers over the tiers the planner enumerates (non-decreasing cut
/// vectors: `C(num_layers + tiers - 1, tiers - 1)`): 128 layers over 4 tiers are 366,145.
pub const MAX_SPLITS: u64 = 1 << 20;

/// Most candidates (split × thresholds × encodings) one search evaluates; a larger input is
/// refused, not searched for minutes. Calibrated families of up to 64 layers on three
/// tiers with 24 curve points and every encoding stay well below.
pub const MAX_CANDIDATES: u64 = 1 << 22;

/// Splits of `l` layers over `n` tiers (`C(l + n - 1, n - 1)`), saturating.
pub(crate) fn split_count(l: usize, n: usize) -> u64 {
    let k = n.saturating_sub(1) as u128;
    let mut c: u128 = 1;
    for i in 1..=k {
        // c = C(l + i, i), exact at every step.
        c = c.saturating_mul(l as u128 + i) / i;
        if c > u128::from(u64::MAX) {
            return u64::MAX;
        }
    }
    c as u64
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Error {
    Error::InvalidInput {
        field: field.into(),
        reason: reason.into(),
    }
}

impl PlanInput {
    /// Checks shapes and numbers; every planner entry point calls it first.
    pub fn validate(&self) -> Result<()> {
        let m = &self.model;
        let l = m.num_layers;
        if l == 0 {
            return Err(invalid("model.num_layers", "must be at least 1"));
        }
        if m.hidden_size == 0 {
            return Err(invalid("model.hidden_size", "must be at least 1"));
        }
        if m.exits.last().map(|e| e.depth) != Some(l) {
            return Err(invalid(
                "model.exits",
                format!("the deepest exit must have depth num_layers = {l}"),
            ));
        }
        for (i, e) in m.exits.iter().enumerate() {
            if e.depth == 0 || e.depth > l {
                return Err(invalid(
                    format!("model.exits[{i}].depth"),
                    format!("must be in 1..={l}, got {}", e.depth),
                ));
            }
            if i > 0 && m.exits[i - 1].depth >= e.depth {
                return Err(invalid(
                    format!("model.exits[{i}].depth"),
                    "exits must be in strictly increasing depth",
                ));
            }
            for (k, p) in e.curve.iter().enumerate() {
                let f = format!("model.exits[{i}].curve[{k}]");
                crate::error::check_finite(format!("{f}.threshold"), p.threshold)?;
                check_unit(format!("{f}.agreement"), p.agreement)?;
                check_unit(format!("{f}.escalation"), p.escalation)?;
            }
        }
        if self.tiers.is_empty() {
            return Err(invalid("tiers", "at least one tier is needed"));
        }
        if self.links.len() + 1 != self.tiers.len() {
            return Err(invalid(
                "links",
                format!(
                    "{} tiers need {} links, got {}",
                    self.tiers.len(),
                    self.tiers.len() - 1,
                    self.links.len()
                ),
            ));
        }
        for (i, t) in self.tiers.iter().enumerate() {
            let f = format!("tiers[{i}]");
            t.profile.validate(&format!("{f}.profile"), l)?;
            for e in &m.exits {
                if t.profile.exit(e.depth).is_none() {
                    return Err(invalid(
                        format!("{f}.profile.exits"),
                        format!("no profile for the exit at depth {}", e.depth),
                    ));
                }
            }
            check_positive(format!("{f}.load_factor"), t.load_factor)?;
            check_non_negative(format!("{f}.compute_power_w"), t.compute_power_w)?;
            check_non_negative(format!("{f}.radio_power_w"), t.radio_power_w)?;
        }
        for (j, link) in self.links.iter().enumerate() {
            link.validate(&format!("links[{j}]"))?;
        }
        let splits = split_count(l, self.tiers.len());
        if splits > MAX_SPLITS {
            return Err(invalid(
                "tiers",
                format!(
                    "{} tiers over {l} layers make {splits} splits to search, over the \
                     planner's limit of {MAX_SPLITS}: plan with fewer tiers",
                    self.tiers.len()
                ),
            ));
        }
        let c = &self.config;
        check_unit("config.accuracy_target", c.accuracy_target)?;
        for (k, e) in c.encodings.iter().enumerate() {
            check_unit(
                format!("config.encodings[{k}].agreement_loss"),
                e.agreement_loss,
            )?;
            check_zstd_ratio(&format!("config.encodings[{k}].zstd_ratio"), e.zstd_ratio)?;
        }
        let o = &c.objective;
        check_non_negative(
            "config.objective.device_energy_ms_per_joule",
            o.device_energy_ms_per_joule,
        )?;
        check_non_negative(
            "config.objective.cloud_cost_ms_per_compute_ms",
            o.cloud_cost_ms_per_compute_ms,
        )?;
        if c.workload.gen_tokens == 0 {
            return Err(invalid("config.workload.gen_tokens", "must be at least 1"));
        }
        if c.workload.concurrent_sessions == 0 {
            return Err(invalid(
                "config.workload.concurrent_sessions",
                "must be at least 1",
            ));
        }
        if c.allowed_cuts.len() + 1 > self.tiers.len().max(1) {
            return Err(invalid(
                "config.allowed_cuts",
                format!(
                    "{} entries, but {} tiers have only {} boundaries",
                    c.allowed_cuts.len(),
                    self.tiers.len(),
                    self.tiers.len() - 1
                ),
            ));
        }
        for (k, cuts) in c.allowed_cuts.iter().enumerate() {
            if let Some(&v) = cuts.iter().find(|&&v| v > l) {
                return Err(invalid(
                    format!("config.allowed_cuts[{k}]"),
                    format!("cut {v} is past the last layer ({l})"),
                ));
            }
        }
        if let BackfillMode::Background {
            max_link_utilisation,
        } = c.backfill
        {
            check_positive("config.backfill.max_link_utilisation", max_link_utilisation)?;
            check_unit("config.backfill.max_link_utilisation", max_link_utilisation)?;
        }
        Ok(())
    }

    /// Encodings the planner may use, lossless f32 first, in configured order.
    pub(crate) fn allowed_encodings(&self) -> Vec<EncodingChoice> {
        let c = &self.config;
        let f32 = c
            .encodings
            .iter()
            .find(|e| e.encoding == WireEncoding::F32)
            .copied()
            .unwrap_or(EncodingChoice::F32);
        let mut out = vec![EncodingChoice {
            agreement_loss: 0.0,
            ..f32
        }];
        for e in &c.encodings {
            if e.encoding.is_lossy()
                && c.allow_lossy
                && !out.iter().any(|o| o.encoding == e.encoding)
            {
                out.push(*e);
            }
        }
        out
    }
}
