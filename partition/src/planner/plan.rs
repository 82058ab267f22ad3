//! The planner's output and its human-readable explanation.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use super::input::TierRole;
use crate::profile::WireEncoding;

/// Which family of plans was searched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PlanMode {
    /// Every split, exit, threshold and encoding.
    Adaptive,
    /// The top tier hosts every layer; the others forward token ids.
    CloudOnly,
    /// The entry tier answers every token from the best exit it can host.
    DeviceOnly,
    /// Best split with no early exit: every token reaches the deepest exit.
    StaticSplit,
}

impl PlanMode {
    /// snake_case name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Adaptive => "adaptive",
            Self::CloudOnly => "cloud_only",
            Self::DeviceOnly => "device_only",
            Self::StaticSplit => "static_split",
        }
    }
}

/// An exit that decides whether to answer or escalate.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ExitDecision {
    /// Depth of the exit.
    pub depth: usize,
    /// Answer when the confidence is `>= threshold`.
    pub threshold: f64,
    /// Predicted agreement among answered tokens.
    pub agreement: f64,
    /// Predicted fraction of the tokens reaching the exit's curve that escalate
    /// (marginal, from the curve).
    pub escalation: f64,
}

/// What one tier does in a plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TierPlan {
    /// Role.
    pub role: TierRole,
    /// First trunk layer hosted.
    pub layer_start: usize,
    /// One past the last trunk layer hosted (`layer_start == layer_end`: none).
    pub layer_end: usize,
    /// Depths of the exit heads hosted (decision, answering or fallback).
    pub exits: Vec<usize>,
    /// The exit that decides, on non-top tiers that exit early.
    pub decision: Option<ExitDecision>,
    /// Depth of the exit this tier answers every token with, on the top tier.
    pub answers_with: Option<usize>,
    /// Probability that a token reaches this tier.
    pub reach: f64,
    /// Compute for one decoded token that reaches this tier (ms, load included).
    pub decode_ms: f64,
    /// Contribution to the expected latency per token, decode and backfill (ms).
    pub expected_ms: f64,
    /// Amortised prompt prefill per generated token (ms).
    pub prefill_ms: f64,
    /// Weights + KV caches hosted (bytes).
    pub memory_bytes: u64,
    /// The tier's limit (bytes).
    pub memory_limit_bytes: u64,
}

impl TierPlan {
    /// Whether the tier hosts any layer.
    pub fn is_active(&self) -> bool {
        self.layer_start < self.layer_end
    }
}

/// What a link carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Payload {
    /// Nothing crosses the link.
    Unused,
    /// Token ids (the lower tiers host no layer).
    TokenIds,
    /// Hidden states in an encoding.
    Hidden {
        /// Encoding on this link.
        encoding: WireEncoding,
        /// Whether zstd is applied.
        zstd: bool,
    },
}

/// What one link does in a plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinkPlan {
    /// Lower tier.
    pub from: TierRole,
    /// Upper tier.
    pub to: TierRole,
    /// What crosses.
    pub payload: Payload,
    /// Bytes of one token's payload.
    pub row_bytes: f64,
    /// Probability that a token crosses on its critical path.
    pub reach: f64,
    /// RTT used (ms).
    pub rtt_ms: f64,
    /// Goodput used (bits per second).
    pub goodput_bps: f64,
    /// Contribution to the expected latency per token (ms).
    pub expected_ms: f64,
    /// Amortised prompt transfer per generated token (ms).
    pub prefill_ms: f64,
    /// Fraction of the goodput used at the predicted token rate.
    pub utilisation: f64,
}

/// Why an alternative lost.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Feasible, but its score is higher.
    Slower {
        /// Score difference (ms).
        by_ms: f64,
    },
    /// A tier cannot hold its layers, exits and KV caches.
    OverMemory {
        /// The tier.
        role: TierRole,
        /// Bytes needed.
        needed_bytes: u64,
        /// Limit.
        limit_bytes: u64,
    },
    /// Link over its utilisation cap.
    LinkSaturated {
        /// Lower tier of the link.
        from: TierRole,
        /// Upper tier.
        to: TierRole,
        /// Predicted utilisation.
        utilisation: f64,
    },
    /// Predicted agreement below the target.
    BelowAccuracy {
        /// Predicted agreement.
        agreement: f64,
        /// Target.
        target: f64,
    },
}

/// A rejected alternative, kept for [`Plan::explain`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alternative {
    /// One-line description of its placement.
    pub summary: String,
    /// Its predicted latency per token (ms).
    pub predicted_latency_ms: f64,
    /// Its score (ms).
    pub score: f64,
    /// Its predicted agreement.
    pub predicted_agreement: f64,
    /// Why it lost.
    pub verdict: Verdict,
}

/// A placement of the family over the tiers, with its predictions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// How it was searched.
    pub mode: PlanMode,
    /// Entry tier first.
    pub tiers: Vec<TierPlan>,
    /// `links[j]` joins `tiers[j]` and `tiers[j + 1]`.
    pub links: Vec<LinkPlan>,
    /// Expected latency per generated token (ms).
    pub predicted_latency_ms: f64,
    /// Expected agreement with the deepest exit.
    pub predicted_agreement: f64,
    /// The target it was planned for.
    pub accuracy_target: f64,
    /// Expected device energy per token (J).
    pub device_energy_j: f64,
    /// Expected cloud compute per token (ms).
    pub cloud_compute_ms: f64,
    /// Objective value: latency + weighted energy + weighted cloud cost (ms).
    pub score: f64,
    /// Best rejected alternatives, best first.
    pub alternatives: Vec<Alternative>,
}

pub(crate) fn fmt_bytes(b: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KB", "MB", "GB", "TB"];
    let mut v = b;
    let mut u = 0;
    while v >= 1000.0 && u + 1 < UNITS.len() {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{v:.0} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

pub(crate) fn fmt_rate(bps: f64) -> String {
    if bps >= 1e9 {
        format!("{:.2} Gbit/s", bps / 1e9)
    } else if bps >= 1e6 {
        format!("{:.2} Mbit/s", bps / 1e6)
    } else {
        format!("{:.1} kbit/s", bps / 1e3)
    }
}

impl Plan {
    /// The top tier (the one answering every token that reaches it).
    pub fn top_tier(&self) -> Option<&TierPlan> {
        self.tiers.iter().find(|t| t.answers_with.is_some())
    }

    /// `(depth, threshold)` of every deciding exit, entry tier first.
    pub fn thresholds(&self) -> Vec<(usize, f64)> {
        self.tiers
            .iter()
            .filter_map(|t| t.decision.map(|d| (d.depth, d.threshold)))
            .collect()
    }

    /// Layer ranges per tier, for comparing placements (a change means moving weights).
    pub fn placement(&self) -> Vec<(usize, usize)> {
        self.tiers
            .iter()
            .map(|t| (t.layer_start, t.layer_end))
            .collect()
    }

    /// One line: the placement, deciding exits and encodings.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        for (i, t) in self.tiers.iter().enumerate() {
            if i > 0 {
                let l = &self.links[i - 1];
                let enc = match l.payload {
                    Payload::Unused => "-".to_string(),
                    Payload::TokenIds => "ids".to_string(),
                    Payload::Hidden { encoding, zstd } => {
                        format!("{}{}", encoding.name(), if zstd { "+zstd" } else { "" })
                    }
                };
                let _ = write!(s, " >{enc}> ");
            }
            if t.is_active() {
                let _ = write!(s, "{} {}..{}", t.role.name(), t.layer_start, t.layer_end);
            } else {
                let _ = write!(s, "{} -", t.role.name());
            }
            if let Some(d) = t.decision {
                let _ = write!(s, " [exit {} >= {:.3}]", d.depth, d.threshold);
            }
            if let Some(d) = t.answers_with {
                let _ = write!(s, " [answers at {d}]");
            }
        }
        s
    }

    /// A multi-line explanation: predictions per tier and per link, the cost model, and
    /// the best rejected alternatives with the reason each lost. Deterministic.
    pub fn explain(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "plan ({}): {:.3} ms/token expected, agreement {:.4} (target {:.4}), score {:.3}",
            self.mode.name(),
            self.predicted_latency_ms,
            self.predicted_agreement,
            self.accuracy_target,
            self.score
        );
        let _ = writeln!(s, "  {}", self.summary());
        for (i, t) in self.tiers.iter().enumerate() {
            if i > 0 {
                let l = &self.links[i - 1];
                if l.payload == Payload::Unused {
                    let _ = writeln!(s, "  link {}->{}: unused", l.from.name(), l.to.name());
                } else {
                    let _ = writeln!(
                        s,
                        "  link {}->{}: {} {}/token, reach {:.1}%, rtt {:.1} ms, goodput {}, \
                         expected {:.3} ms + prefill {:.3} ms, utilisation {:.1}%",
                        l.from.name(),
                        l.to.name(),
                        match l.payload {
                            Payload::TokenIds => "token ids".to_string(),
                            Payload::Hidden { encoding, zstd } => format!(
                                "hidden {}{}",
                                encoding.name(),
                                if zstd { "+zstd" } else { "" }
                            ),
                            Payload::Unused => String::new(),
                        },
                        fmt_bytes(l.row_bytes),
                        l.reach * 100.0,
                        l.rtt_ms,
                        fmt_rate(l.goodput_bps),
                        l.expected_ms,
                        l.prefill_ms,
                        l.utilisation * 100.0
                    );
                }
            }
            if !t.is_active() {
                let _ = writeln!(s, "  {}: hosts nothing", t.role.name());
                continue;
            }
            let _ = write!(
                s,
                "  {}: layers {}..{}, exits {:?}, reach {:.1}%, {:.3} ms/token when reached, \
                 expected {:.3} ms + prefill {:.3} ms, memory {} of {}",
                t.role.name(),
                t.layer_start,
                t.layer_end,
                t.exits,
                t.reach * 100.0,
                t.decode_ms,
                t.expected_ms,
                t.prefill_ms,
                fmt_bytes(t.memory_bytes as f64),
                fmt_bytes(t.memory_limit_bytes as f64)
            );
            if let Some(d) = t.decision {
                let _ = write!(
                    s,
                    "; answers at exit {} when confidence >= {:.4} (agreement {:.4}, escalates {:.1}%)",
                    d.depth,
                    d.threshold,
                    d.agreement,
                    d.escalation * 100.0
                );
            }
            if let Some(d) = t.answers_with {
                let _ = write!(s, "; answers every token reaching it at exit {d}");
            }
            let _ = writeln!(s);
        }
        let _ = writeln!(
            s,
            "  device energy {:.4} J/token, cloud compute {:.3} ms/token",
            self.device_energy_j, self.cloud_compute_ms
        );
        let _ = writeln!(
            s,
            "  cost model: E[ms/token] = sum over tiers P(reach)*compute + sum over links \
             P(cross)*(RTT + (row + return bytes)/goodput) [+ backfill] \
             + P(request reaches it)*prefill/gen_tokens"
        );
        if self.alternatives.is_empty() {
            let _ = writeln!(s, "  no alternative considered");
        } else {
            let _ = writeln!(s, "  rejected alternatives:");
        }
        for (k, a) in self.alternatives.iter().enumerate() {
            let why = match &a.verdict {
                Verdict::Slower { by_ms } => format!("slower by {by_ms:.3} ms"),
                Verdict::OverMemory {
                    role,
                    needed_bytes,
                    limit_bytes,
                } => format!(
                    "over memory on {} (needs {}, limit {})",
                    role.name(),
                    fmt_bytes(*needed_bytes as f64),
                    fmt_bytes(*limit_bytes as f64)
                ),
                Verdict::LinkSaturated {
                    from,
                    to,
                    utilisation,
                } => format!(
                    "saturates link {}->{} ({:.0}% of goodput)",
                    from.name(),
                    to.name(),
                    utilisation * 100.0
                ),
                Verdict::BelowAccuracy { agreement, target } => {
                    format!("below accuracy target ({agreement:.4} < {target:.4})")
                }
            };
            let _ = writeln!(
                s,
                "    {}. {} -- {} ({:.3} ms/token, agreement {:.4})",
                k + 1,
                a.summary,
                why,
                a.predicted_latency_ms,
                a.predicted_agreement
            );
        }
        s
    }
}
