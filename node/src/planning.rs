//! Run-time planning at a node with a parent: the plan in force, re-planned from live link
//! estimates with hysteresis ([`flow_partition::Replanner`]), and turned into what the
//! running system can apply between requests.
//!
//! The planner's input is a template ([`PlanningConfig::input`]: tiers with their
//! profiles and memory, model shape and accuracy curves, settings); its first link is
//! replaced, at every check, by the live estimate of the parent in use
//! ([`crate::parent::ParentLink::planning_estimate`]). Links further up keep the
//! template's values: this node does not observe them.
//!
//! What a plan changes at run time ([`Applied`]):
//! - the escalation policy of new requests: the threshold of each deciding exit, "always
//!   escalate" at exits the plan forwards past, or `local` when the entry tier answers
//!   everything (device-only);
//! - the wire encoding of hidden states on this node's uplink.
//!
//! - the cut at this node ([`Applied::cut`]), when it loaded several split points
//!   (`AgentConfig::split_points`): at an entry node the agent pins boundary 0 of
//!   `config.allowed_cuts` to its split points and the end of its layers, so the planner
//!   chooses among the cuts this node can run; the parent continues from whatever layer a
//!   `Continue` names within what it hosts.
//!
//! Further boundaries keep the template's `config.allowed_cuts` (pin them to the loaded
//! stages above). A session keeps the policy, encoding and cut it started with; a new
//! plan applies to requests that start after it.

use std::time::Duration;

use flow_familial::config::ExitBlock;
use flow_familial::ModelConfig;
use flow_partition::planner::Payload;
use flow_partition::{Plan, PlanInput, ReplanConfig, WireEncoding};
use flow_protocol::{ConfidenceMeasure, Encoding, ExitThreshold, InferMode, Policy};

use crate::error::{NodeError, Result};

/// Threshold that no bounded confidence reaches: the tier always escalates.
pub const ALWAYS_ESCALATE: f32 = 2.0;

/// How a node plans at run time.
#[derive(Debug, Clone)]
pub struct PlanningConfig {
    /// Planner input; `links[0]` is replaced by the live estimate of this node's uplink.
    pub input: PlanInput,
    /// `(exit point, planner depth)` of every exit of the family (see
    /// `flow-node plan --help`: an exit with its own block at point E has depth E, the
    /// deepest exit has depth = layers).
    pub exit_depths: Vec<(u32, usize)>,
    /// Hysteresis.
    pub replan: ReplanConfig,
    /// How often the estimates are checked.
    pub check_interval: Duration,
    /// Confidence measure the accuracy curves were calibrated with.
    pub measure: ConfidenceMeasure,
}

impl PlanningConfig {
    /// Run-time planning of `input` for the family `cfg`, as `flow-node --plan` sets it up:
    /// the family's exit depths ([`planner_depths`]), the default hysteresis, a check
    /// every second, confidence as the top probability. For the embedded API
    /// ([`crate::AgentBuilder::planning`]).
    pub fn for_family(input: PlanInput, cfg: &ModelConfig) -> Self {
        let exit_depths = cfg
            .exit_points()
            .iter()
            .zip(planner_depths(cfg))
            .map(|(&p, d)| (p as u32, d))
            .collect();
        Self {
            input,
            exit_depths,
            replan: ReplanConfig::default(),
            check_interval: Duration::from_secs(1),
            measure: ConfidenceMeasure::MaxProb,
        }
    }
}

/// The planner input of a `--plan FILE`: a `PlanInput`, or the report of
/// `flow-node plan --json` (an object with `input` and `adaptive`), whose `input` is used.
/// The input is checked as the planner checks it ([`PlanInput::validate`]), so a bad file
/// is refused when the node starts, naming the field.
pub fn plan_input_from_json(text: &str) -> Result<PlanInput> {
    let v: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| NodeError::Config(format!("plan file: not JSON: {e}")))?;
    let v = match v.get("input") {
        Some(inner) if v.get("adaptive").is_some() => inner.clone(),
        _ => v,
    };
    let input: PlanInput = serde_json::from_value(v).map_err(|e| {
        NodeError::Config(format!(
            "plan file: not a planner input (a PlanInput or `flow-node plan --json` output): {e}"
        ))
    })?;
    input
        .validate()
        .map_err(|e| NodeError::Config(format!("plan file: {e}")))?;
    Ok(input)
}

/// Planner depth of each exit of `cfg`, in its exit order: an exit with its own block at
/// point E has depth E; an exit that reads the trunk after layer `l` has depth `l + 1`.
pub fn planner_depths(cfg: &ModelConfig) -> Vec<usize> {
    cfg.exits
        .iter()
        .map(|e| match e.block {
            ExitBlock::Own(_) => e.point,
            ExitBlock::Trunk(l) => l + 1,
        })
        .collect()
}

/// What the running system applies from a plan.
#[derive(Debug, Clone, PartialEq)]
pub struct Applied {
    /// Policy of new requests.
    pub policy: Policy,
    /// Encoding of hidden states on this node's uplink (`None`: the link carries no
    /// hidden states in this plan).
    pub uplink_encoding: Option<Encoding>,
    /// Exit point where this (entry) node's layers end in the plan: the cut new requests
    /// use. `None` when the entry tier ends at no exit of the family.
    pub cut: Option<usize>,
}

fn encoding_of(w: WireEncoding) -> Encoding {
    match w {
        WireEncoding::F32 => Encoding::F32,
        WireEncoding::F16 => Encoding::F16,
        WireEncoding::Bf16 => Encoding::Bf16,
        WireEncoding::Int8 => Encoding::Int8,
    }
}

/// The exit point of planner depth `depth`.
fn point_of(exit_depths: &[(u32, usize)], depth: usize) -> Option<u32> {
    exit_depths
        .iter()
        .find(|(_, d)| *d == depth)
        .map(|(p, _)| *p)
}

/// Turns a plan into a policy and an uplink encoding. Errors when the plan names an exit
/// depth the family does not have, or when the measure is unbounded and a tier must
/// always escalate (no threshold can express that).
pub fn apply(
    plan: &Plan,
    exit_depths: &[(u32, usize)],
    measure: ConfidenceMeasure,
) -> Result<Applied> {
    let top = plan
        .tiers
        .iter()
        .position(|t| t.answers_with.is_some())
        .ok_or_else(|| NodeError::Config("the plan has no answering tier".into()))?;
    let mut policy = Policy {
        mode: if top == 0 {
            InferMode::Local
        } else {
            InferMode::Escalate
        },
        answer_exit: None,
        thresholds: Vec::new(),
        default_threshold: ALWAYS_ESCALATE,
        measure,
        ..Policy::default()
    };
    let bounded = matches!(
        measure,
        ConfidenceMeasure::MaxProb | ConfidenceMeasure::Margin
    );
    for t in plan.tiers.iter().take(top) {
        if !t.is_active() {
            continue;
        }
        let Some(point) = point_of(exit_depths, t.layer_end) else {
            // A tier whose range does not end at an exit can only forward.
            continue;
        };
        let threshold = match t.decision {
            Some(d) => d.threshold as f32,
            None if bounded => ALWAYS_ESCALATE,
            None => {
                return Err(NodeError::Config(format!(
                    "the plan forwards past exit {point}, which the unbounded measure {measure:?} cannot express"
                )))
            }
        };
        policy.thresholds.push(ExitThreshold {
            exit: point,
            threshold,
        });
    }
    for t in &plan.tiers {
        if let Some(d) = t.decision {
            if point_of(exit_depths, d.depth).is_none() {
                return Err(NodeError::Config(format!(
                    "the plan decides at depth {}, which is no exit of the family",
                    d.depth
                )));
            }
        }
    }
    let uplink_encoding = match plan.links.first().map(|l| l.payload) {
        Some(Payload::Hidden { encoding, .. }) => Some(encoding_of(encoding)),
        _ => None,
    };
    let cut = plan
        .tiers
        .first()
        .and_then(|t| point_of(exit_depths, t.layer_end))
        .map(|p| p as usize);
    Ok(Applied {
        policy,
        uplink_encoding,
        cut,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use flow_partition::planner::{ExitDecision, LinkPlan, PlanMode, TierPlan, TierRole};

    fn tier(role: TierRole, a: usize, b: usize, decision: Option<f64>, answers: bool) -> TierPlan {
        TierPlan {
            role,
            layer_start: a,
            layer_end: b,
            exits: vec![b],
            decision: decision.map(|threshold| ExitDecision {
                depth: b,
                threshold,
                agreement: 0.99,
                escalation: 0.5,
            }),
            answers_with: answers.then_some(b),
            reach: 1.0,
            decode_ms: 1.0,
            expected_ms: 1.0,
            prefill_ms: 0.0,
            memory_bytes: 0,
            memory_limit_bytes: 1,
        }
    }

    fn link(from: TierRole, to: TierRole) -> LinkPlan {
        LinkPlan {
            from,
            to,
            payload: Payload::Hidden {
                encoding: WireEncoding::F16,
                zstd: false,
            },
            row_bytes: 256.0,
            reach: 1.0,
            rtt_ms: 10.0,
            goodput_bps: 1e6,
            expected_ms: 1.0,
            prefill_ms: 0.0,
            utilisation: 0.0,
        }
    }

    fn plan(tiers: Vec<TierPlan>) -> Plan {
        Plan {
            mode: PlanMode::Adaptive,
            links: vec![
                link(TierRole::Device, TierRole::Edge),
                link(TierRole::Edge, TierRole::Cloud),
            ],
            tiers,
            predicted_latency_ms: 1.0,
            predicted_agreement: 1.0,
            accuracy_target: 0.97,
            device_energy_j: 0.0,
            cloud_compute_ms: 0.0,
            score: 1.0,
            alternatives: vec![],
        }
    }

    const DEPTHS: [(u32, usize); 4] = [(1, 1), (3, 3), (5, 5), (7, 8)];

    #[test]
    fn thresholds_forwarding_and_local() {
        let p = plan(vec![
            tier(TierRole::Device, 0, 1, Some(0.8), false),
            tier(TierRole::Edge, 1, 5, None, false),
            tier(TierRole::Cloud, 5, 8, None, true),
        ]);
        let a = apply(&p, &DEPTHS, ConfidenceMeasure::MaxProb).unwrap();
        assert_eq!(a.policy.mode, InferMode::Escalate);
        assert_eq!(a.policy.threshold_for(1), 0.8);
        assert_eq!(a.policy.threshold_for(5), ALWAYS_ESCALATE);
        assert_eq!(a.uplink_encoding, Some(Encoding::F16));
        // Entropy cannot say "always escalate".
        assert!(apply(&p, &DEPTHS, ConfidenceMeasure::NegEntropy).is_err());

        let p = plan(vec![
            tier(TierRole::Device, 0, 3, None, true),
            tier(TierRole::Edge, 3, 3, None, false),
            tier(TierRole::Cloud, 3, 3, None, false),
        ]);
        assert_eq!(
            apply(&p, &DEPTHS, ConfidenceMeasure::MaxProb)
                .unwrap()
                .policy
                .mode,
            InferMode::Local
        );
        // A decision at a depth that is no exit is refused.
        let p = plan(vec![
            tier(TierRole::Device, 0, 2, Some(0.5), false),
            tier(TierRole::Edge, 2, 5, None, false),
            tier(TierRole::Cloud, 5, 8, None, true),
        ]);
        assert!(apply(&p, &DEPTHS, ConfidenceMeasure::MaxProb).is_err());
    }

    #[test]
    fn a_family_gives_its_exit_depths_and_the_binary_defaults() {
        let mut mc = ModelConfig::from_json(&serde_json::json!({
            "model_type": "llama", "vocab_size": 64, "hidden_size": 16,
            "intermediate_size": 32, "num_hidden_layers": 4, "num_attention_heads": 2,
            "num_key_value_heads": 1, "rms_norm_eps": 1e-6
        }))
        .unwrap();
        mc.declare_exits(&[1, 3]).unwrap();
        let depths = planner_depths(&mc);
        // Declared exits read the trunk: the deepest has depth = layers.
        assert_eq!(depths, vec![2, 4]);
        let input: PlanInput = PlanInput {
            model: flow_partition::planner::ModelShape {
                num_layers: 4,
                hidden_size: 16,
                token_id_bytes: 4,
                exits: vec![],
            },
            tiers: vec![],
            links: vec![],
            config: flow_partition::PlannerConfig::default(),
        };
        let pc = PlanningConfig::for_family(input, &mc);
        let points: Vec<u32> = mc.exit_points().iter().map(|&p| p as u32).collect();
        assert_eq!(
            pc.exit_depths,
            points.into_iter().zip(depths).collect::<Vec<_>>()
        );
        assert_eq!(pc.check_interval, Duration::from_secs(1));
        assert_eq!(pc.measure, ConfidenceMeasure::MaxProb);
    }
}
