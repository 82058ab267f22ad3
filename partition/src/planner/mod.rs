//! The planner: which tier hosts which layers and exits, the wire encoding per link and
//! the escalation thresholds, chosen by exhaustive search over a small space with the
//! cost model described in the crate docs.
//!
//! Entry points: [`plan`] (adaptive), [`cloud_only`], [`device_only`],
//! [`best_static_split`], or [`plan_with_mode`].

mod cost;
mod input;
mod plan;
mod search;

pub use input::{
    BackfillMode, EncodingChoice, ExitSpec, ModelShape, Objective, PlanInput, PlannerConfig,
    TierRole, TierSpec, Workload, MAX_CANDIDATES, MAX_SPLITS,
};
pub use plan::{Alternative, ExitDecision, LinkPlan, Payload, Plan, PlanMode, TierPlan, Verdict};

use crate::error::Result;

/// The best plan over every split, exit, threshold and encoding (minimum score meeting
/// the accuracy target, memory limits and link utilisation caps).
pub fn plan(input: &PlanInput) -> Result<Plan> {
    search::search(input, PlanMode::Adaptive)
}

/// The best plan of the given family.
pub fn plan_with_mode(input: &PlanInput, mode: PlanMode) -> Result<Plan> {
    search::search(input, mode)
}

/// Every layer on the top tier; lower tiers forward token ids. The accuracy target is
/// not enforced (agreement is 1 by construction).
pub fn cloud_only(input: &PlanInput) -> Result<Plan> {
    search::search(input, PlanMode::CloudOnly)
}

/// The entry tier answers every token with one of its exits and never escalates: the
/// fastest exit meeting the accuracy target, or else the most accurate that fits.
pub fn device_only(input: &PlanInput) -> Result<Plan> {
    search::search(input, PlanMode::DeviceOnly)
}

/// The best split without early exits (every token reaches the deepest exit), as in
/// Neurosurgeon: the static baseline for benchmarks.
pub fn best_static_split(input: &PlanInput) -> Result<Plan> {
    search::search(input, PlanMode::StaticSplit)
}

/// Re-predicts an existing plan under a new input (same tiers; new link estimates,
/// loads or profiles). Returns the re-predicted plan (without alternatives) and the reason
/// it would now be rejected, if any. Used by [`crate::replan`].
pub fn reevaluate(input: &PlanInput, plan: &Plan) -> Result<(Plan, Option<Verdict>)> {
    search::reevaluate(input, plan)
}

#[cfg(test)]
pub(crate) mod tests;
