//! # flow-partition: where to cut the family, and when to escalate
//!
//! Pure, deterministic planning for aiflow's device → edge → cloud inference: no IO, no
//! clock, no threads. The agent (`flow-node`) measures, feeds numbers in, and applies the
//! answers; everything here is unit-testable with made-up numbers.
//!
//! ## Entry points
//!
//! | need | call |
//! |---|---|
//! | fit a node's profile from self-benchmark samples | [`profile::fit_node_profile`], [`profile::fit_linear`] |
//! | cache key for a profile | [`profile::ProfileKey`] (`file_stem()`) |
//! | smooth RTT/goodput samples of a link | [`link::LinkEstimator`] (`observe`, `planning_estimate`) |
//! | thresholds of composed deciding exits (a cascade) on its own decodes | [`cascade::calibrate_cascade`], planner curves: [`cascade::cascade_curves`] |
//! | agreement curve and threshold of an exit | [`calibrate::agreement_curve`], [`calibrate::calibrate_exit`], whole family: [`calibrate::calibrate_family`] |
//! | choose a plan | [`planner::plan`] (also [`planner::cloud_only`], [`planner::device_only`], [`planner::best_static_split`]) |
//! | explain it | [`planner::Plan::explain`] |
//! | re-predict a plan under new estimates | [`planner::reevaluate`] |
//! | re-plan at run time without flapping | [`replan::Replanner`] |
//! | escalate or answer degraded; fail over | [`degrade::decide`], [`degrade::choose_parent`] |
//!
//! ## The space searched
//!
//! Tiers are ordered from the entry tier up (device, edge, cloud); `links[j]` joins tier
//! `j` and `j + 1`. A plan gives tier `i` the contiguous trunk layers `b_i..b_{i+1}`
//! (`0 = b_0 <= b_1 <= … <= b_n = L`; an empty range means the tier only relays). The top
//! non-empty tier answers every token that reaches it with the deepest exit. Every other
//! non-empty tier either forwards everything, or — when its range ends at an exit — decides
//! there: answer when the exit's confidence is `>= θ`, θ taken from that exit's measured
//! curve points, else escalate. Each link that carries hidden states gets an encoding
//! (f32 always; f16/bf16/int8, optionally with a zstd ratio, only when
//! `allow_lossy` is set, each with its measured agreement loss as an input). A link below a
//! tier hosting no layer carries token ids. The planner enumerates all of it (the space is
//! small: `O(L^(n−1) · points^(n−1) · encodings^(n−1))`) and keeps the lowest score.
//!
//! ## The cost model (expected latency per generated token)
//!
//! Let `ctx = prompt + gen/2` (mean decode context), `P = prompt`, `G = gen`.
//! Reach: `r_0 = 1`; after a deciding tier with curve point `(θ, a, q)`,
//! `r_{i+1} = min(r_i, q)` (nested hard examples: a token too hard for a deep exit is too
//! hard for a shallow one); a forwarding tier keeps `r`. Link `j` is crossed with
//! probability `ρ_j = r_{j+1}`.
//!
//! ```text
//! E[ms/token] = Σ_tiers  r_i · C_i                               decode on the critical path
//!             + Σ_links  ρ_j · (RTT_j + (row_j + ret) · 8 / goodput_j)   up one way, answer back
//!             + [CriticalPath backfill only]
//!               Σ_{tiers i>0} (1 − r_i) · B_i + Σ_links (1 − ρ_j) · row_j · 8 / goodput_j
//!             + (F_0 + Σ_{tiers i>0} π(r_i) · F_i + Σ_links π(ρ_j) · P · row_j · 8 / goodput_j) / G
//! ```
//!
//! The prompt's prefill on an upper tier, and its rows on the link below, are on the
//! critical path only in requests that reach that tier: `π(r) = 1 − (1 − r)^G` with
//! `CriticalPath` backfill (the prompt rides on the request's first escalation;
//! independent tokens), `π(r) = r` with `Background` streaming (only a first token that
//! escalates itself waits for it). The prompt's rows travel in the first escalation's
//! message, whose round trip is already one of the per-token `ρ_j · RTT_j`: the prefill
//! adds their serialisation, not another round trip. `G` is the expected number of tokens
//! a request generates (requests that stop at end-of-sequence generate fewer than their
//! cap): it amortises the prompt.
//!
//! with, for tier `i` hosting layers `a..b` and head `h` (its deciding exit, or the
//! answering exit on the top tier), `load_i` its load factor:
//! - `C_i = load_i · (overhead.decode(ctx) + Σ_{l∈a..b} layer_l.decode(ctx) + h.decode(ctx))`,
//! - `B_i = load_i · (Σ_l layer_l.prefill.b + h.prefill.b)`: computing one backfilled row,
//! - `F_i = load_i · (overhead.prefill(P) + Σ_l layer_l.prefill(P) + h.prefill(P))`,
//! - `row_j` = bytes of one token's payload: `token_id_bytes` at split 0, else the encoded
//!   hidden row (`4h`, `2h`, `2h`, `h + 4` bytes for f32/f16/bf16/int8) × zstd ratio;
//!   `ret` = `return_bytes_per_token`.
//!
//! **Backfill.** Exact backfill means every position's hidden state must eventually reach
//! every tier that is ever reached. In the default `Background` mode the device streams
//! rows as it produces them and the parent computes them off the critical path, so only
//! escalated rows cost latency; a plan is rejected when that stream would use more than
//! `max_link_utilisation` of a link (`sessions · row_ms / E[ms/token]`). `CriticalPath`
//! charges the pending rows to the next escalation instead (amortised as above).
//!
//! **Agreement.** `1 − Σ_deciding tiers (r_i − r_{i+1}) · (1 − a_i) − Σ_lossy links ρ_j ·
//! loss_j` (the deepest exit agrees with itself); a plan must reach the accuracy target.
//!
//! **Score.** `E[ms/token] + w_e · device energy (J/token) + w_c · cloud compute
//! (ms/token)`, energy = device compute ms × `compute_power_w` + device radio ms ×
//! `radio_power_w`. Memory per tier = weights of its layers and hosted exits (+ embedding
//! on the tier hosting layer 0) + KV bytes/token × `(P + G) · sessions`; it must fit.
//! Ties go to the higher agreement, then to the first candidate in enumeration order
//! (splits lexicographic, "no decision" before curve points in curve order, encodings in
//! configured order), so the same input always gives the same plan and explanation.
//!
//! Not modelled (left to measurement): speculative drafting, batching gains across
//! sessions, queueing beyond the load factor, and a tier hosting an overlapping prefix
//! (shipping token ids while answering locally).

pub mod calibrate;
pub mod cascade;
pub mod degrade;
pub mod error;
pub mod link;
pub mod planner;
pub mod profile;
pub mod replan;

pub use calibrate::{
    agreement_curve, calibrate_exit, calibrate_family, Bound, BoundKind, Calibration,
    CalibrationConfig, ConfidenceMeasure, CurvePoint, ExitCalibration, ExitRecords, Record,
};
pub use cascade::{
    calibrate_cascade, cascade_curves, composed_agreement, CascadeCalibration, CascadeConfig,
    CascadeToken,
};
pub use degrade::{
    choose_parent, decide, DegradeDecision, DegradePolicy, DegradeReason, EscalationContext,
    ParentOption,
};
pub use error::{Error, Result};
pub use link::{LinkEstimate, LinkEstimator, LinkEstimatorConfig, LinkSample};
pub use planner::{
    best_static_split, cloud_only, device_only, plan, plan_with_mode, reevaluate, Plan, PlanInput,
    PlanMode, PlannerConfig,
};
pub use profile::{fit_linear, fit_node_profile, Linear, NodeProfile, ProfileKey, WireEncoding};
pub use replan::{Decision, ReplanConfig, Replanner};
