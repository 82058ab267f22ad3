//! Run-time planning at a node with a parent (see [`crate::planning`]): the plan in force,
//! the periodic re-plan from the live estimate of the parent link, and its metrics.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::{Agent, AgentConfig};
use crate::engine::Stage;
use crate::error::{NodeError, Result};
use crate::parent::Parents;
use crate::planning::{apply, Applied, PlanningConfig};

pub(super) struct PlannerState {
    cfg: PlanningConfig,
    replanner: flow_partition::Replanner,
    epoch: Instant,
}

/// The planner of a node configured with run-time planning, and what its initial plan
/// applies: from the template with the first link replaced by the live estimate of the
/// parent in use. `(None, None)` without planning; planning without a parent is refused.
pub(super) fn start_planner(
    cfg: &AgentConfig,
    parents: Option<&Arc<Parents>>,
) -> Result<(Option<Mutex<PlannerState>>, Option<Applied>)> {
    match (&cfg.planning, parents) {
        (Some(pc), Some(ps)) => {
            let mut input = pc.input.clone();
            if let Some(l) = input.links.first_mut() {
                *l = ps.active().planning_estimate();
            }
            pin_entry_cuts(&mut input.config.allowed_cuts, cfg, &pc.exit_depths);
            let replanner = flow_partition::Replanner::new(pc.replan, &input)
                .map_err(|e| NodeError::Config(format!("planning: {e}")))?;
            let applied = apply(replanner.current(), &pc.exit_depths, pc.measure)?;
            tracing::info!(plan = %replanner.current().summary(), predicted_ms = replanner.current().predicted_latency_ms, "initial plan");
            let state = PlannerState {
                cfg: pc.clone(),
                replanner,
                epoch: Instant::now(),
            };
            Ok((Some(Mutex::new(state)), Some(applied)))
        }
        (Some(_), None) => Err(NodeError::Config(
            "run-time planning needs a parent (a node without one answers everything)".into(),
        )),
        (None, _) => Ok((None, None)),
    }
}

/// Re-plan every `check_interval` (at least 10 ms) until the agent is dropped or drains.
pub(super) fn spawn_replanning(agent: &Agent) {
    let Some(every) = agent
        .inner
        .cfg
        .planning
        .as_ref()
        .map(|p| p.check_interval.max(Duration::from_millis(10)))
    else {
        return;
    };
    let weak = agent.downgrade();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(agent) = weak.upgrade() else { return };
            if agent.inner.draining.load(Ordering::Acquire) {
                return;
            }
            agent.check_plan();
        }
    });
}

/// The stage a new request runs at an entry node hosting `hosted` with `split_points`
/// when the plan cuts at `cut`: `None` when that cut is not loaded there. `cut: None` =
/// the whole hosted stage.
fn stage_at_cut(hosted: Stage, split_points: &[usize], cut: Option<usize>) -> Option<Stage> {
    match cut {
        None => Some(hosted),
        Some(c) if c == hosted.b => Some(hosted),
        Some(c) if hosted.a == 0 && split_points.contains(&c) => Some(Stage {
            a: 0,
            b: c,
            exit: true,
        }),
        Some(_) => None,
    }
}

impl Agent {
    /// The plan in force, when run-time planning is configured.
    pub fn current_plan(&self) -> Option<flow_partition::Plan> {
        let st = self.inner.planner.as_ref()?.lock().ok()?;
        Some(st.replanner.current().clone())
    }

    /// What the plan in force applies to new requests.
    pub fn applied_plan(&self) -> Option<Applied> {
        self.inner.applied.read().ok().and_then(|a| a.clone())
    }

    /// Re-plans so far.
    pub fn replans(&self) -> u64 {
        self.inner.replans.load(Ordering::Acquire)
    }

    /// Re-plans that moved this node's cut.
    pub fn split_moves(&self) -> u64 {
        self.inner.split_moves.load(Ordering::Acquire)
    }

    /// The stage a new request runs at this (entry) node when the plan cuts at `cut`:
    /// `None` when that cut is not loaded here. `cut: None` = the whole hosted stage.
    pub(super) fn session_stage(&self, cut: Option<usize>) -> Option<Stage> {
        stage_at_cut(self.inner.cfg.stage, &self.inner.cfg.split_points, cut)
    }

    /// Feed the live link estimate of the parent in use to the re-planner (done every
    /// `check_interval` by a background task; callable directly). Returns whether the plan
    /// changed.
    pub fn check_plan(&self) -> bool {
        let (Some(planner), Some(parents)) = (&self.inner.planner, &self.inner.parents) else {
            return false;
        };
        let Ok(mut st) = planner.lock() else {
            return false;
        };
        let mut input = st.cfg.input.clone();
        let est = parents.active().planning_estimate();
        if let Some(l) = input.links.first_mut() {
            *l = est;
        }
        pin_entry_cuts(
            &mut input.config.allowed_cuts,
            &self.inner.cfg,
            &st.cfg.exit_depths,
        );
        let now = st.epoch.elapsed().as_millis() as u64;
        let decision = match st.replanner.on_estimates(now, &input) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "re-planning failed; keeping the plan in force");
                return false;
            }
        };
        let flow_partition::Decision::Replan(plan) = decision else {
            return false;
        };
        match apply(&plan, &st.cfg.exit_depths, st.cfg.measure).and_then(|a| match a.cut {
            Some(c) if self.inner.cfg.stage.a == 0 && self.session_stage(Some(c)).is_none() => {
                Err(NodeError::Config(format!(
                    "the plan cuts at {c}, which this node has not loaded"
                )))
            }
            _ => Ok(a),
        }) {
            Ok(a) => {
                let old = self.applied_plan().and_then(|o| o.cut);
                if old != a.cut {
                    self.inner.split_moves.fetch_add(1, Ordering::AcqRel);
                    tracing::info!(from = ?old, to = ?a.cut, "split moved: new requests cut at the new layer, running ones keep theirs");
                }
                tracing::info!(
                    plan = %plan.summary(),
                    predicted_ms = plan.predicted_latency_ms,
                    rtt_ms = est.rtt_ms,
                    goodput_bps = est.goodput_bps,
                    "re-planned: new requests use the new plan, running ones keep theirs"
                );
                if let Ok(mut w) = self.inner.applied.write() {
                    *w = Some(a);
                }
                self.inner.replans.fetch_add(1, Ordering::AcqRel);
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "the new plan cannot be applied; keeping the old one");
                false
            }
        }
    }

    /// Prometheus lines for the parent links (live estimates, probes, fail-overs) and
    /// run-time planning (re-plans, predicted latency of the plan in force).
    pub fn planning_metrics(&self) -> String {
        use std::fmt::Write as _;
        let mut o = String::new();
        if let Some(ps) = &self.inner.parents {
            let gauges: [(&str, &str); 8] = [
                (
                    "aiflow_link_rtt_ms",
                    "Smoothed RTT of the parent link (ms).",
                ),
                (
                    "aiflow_link_goodput_bps",
                    "Smoothed goodput of the parent link (bit/s).",
                ),
                (
                    "aiflow_link_confidence",
                    "Confidence of the link estimate, 0..1.",
                ),
                (
                    "aiflow_link_probes_total",
                    "Probe rounds completed on the parent link.",
                ),
                (
                    "aiflow_link_up",
                    "1 when the last dial or probe of the parent link succeeded.",
                ),
                (
                    "aiflow_link_goodput_probes_total",
                    "Goodput probes sent (only for a stale estimate a planner reads, within --probe-budget).",
                ),
                (
                    "aiflow_link_transfer_samples_total",
                    "Goodput samples taken from request transfers instead of probes.",
                ),
                (
                    "aiflow_link_wire_bytes",
                    "Bytes on the wire both ways (IP packets) of the current connection, from QUIC's counters.",
                ),
            ];
            let active = ps.active();
            let rows: Vec<(String, [f64; 8])> = ps
                .all()
                .iter()
                .map(|l| {
                    let e = l.estimate();
                    (
                        format!(
                            "parent=\"{}\",active=\"{}\"",
                            l.addr(),
                            Arc::ptr_eq(l, &active)
                        ),
                        [
                            e.rtt_ms,
                            e.goodput_bps,
                            e.confidence,
                            l.probe_rounds() as f64,
                            f64::from(u8::from(l.reachable())),
                            l.goodput_probes() as f64,
                            l.transfer_samples() as f64,
                            l.wire_bytes() as f64,
                        ],
                    )
                })
                .collect();
            for (k, (name, help)) in gauges.iter().enumerate() {
                let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} gauge");
                for (labels, v) in &rows {
                    let _ = writeln!(o, "{name}{{{labels}}} {}", v[k]);
                }
            }
            let _ = writeln!(
                o,
                "# HELP aiflow_parent_failovers_total Requests moved to another parent after losing one.\n# TYPE aiflow_parent_failovers_total counter\naiflow_parent_failovers_total {}",
                ps.failovers()
            );
        }
        if let Some(p) = self.current_plan() {
            let _ = writeln!(
                o,
                "# HELP aiflow_replans_total Run-time re-plans.\n# TYPE aiflow_replans_total counter\naiflow_replans_total {}",
                self.replans()
            );
            let _ = writeln!(
                o,
                "# HELP aiflow_split_moves_total Re-plans that moved this node's cut.\n# TYPE aiflow_split_moves_total counter\naiflow_split_moves_total {}",
                self.split_moves()
            );
            let _ = writeln!(
                o,
                "# HELP aiflow_plan_predicted_ms Predicted latency per token of the plan in force (ms).\n# TYPE aiflow_plan_predicted_ms gauge\naiflow_plan_predicted_ms {}",
                p.predicted_latency_ms
            );
        }
        o
    }
}

/// The plan may cut an entry node only where it has loaded: boundary 0 of the planner
/// input is pinned to its split points and its hosted end (in planner depths). A node
/// further up (its layers do not start at 0) keeps the template's `allowed_cuts`.
fn pin_entry_cuts(allowed: &mut Vec<Vec<usize>>, cfg: &AgentConfig, exit_depths: &[(u32, usize)]) {
    if cfg.stage.a != 0 {
        return;
    }
    let depth = |p: usize| {
        exit_depths
            .iter()
            .find(|(e, _)| *e as usize == p)
            .map(|(_, d)| *d)
            .unwrap_or(p)
    };
    let mut cuts: Vec<usize> = cfg.split_points.iter().map(|&p| depth(p)).collect();
    cuts.push(depth(cfg.stage.b));
    cuts.sort_unstable();
    cuts.dedup();
    if allowed.is_empty() {
        allowed.push(cuts);
    } else {
        allowed[0] = cuts;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Agent;

    fn entry(b: usize, split_points: Vec<usize>) -> AgentConfig {
        Agent::builder("unused")
            .layers(0..b)
            .split_points(split_points)
            .config()
            .unwrap()
    }

    #[test]
    fn a_cut_maps_to_a_loaded_stage_or_none() {
        let hosted = Stage {
            a: 0,
            b: 8,
            exit: true,
        };
        let split = [3, 5];
        assert_eq!(stage_at_cut(hosted, &split, None), Some(hosted));
        assert_eq!(stage_at_cut(hosted, &split, Some(8)), Some(hosted));
        let at3 = stage_at_cut(hosted, &split, Some(3)).unwrap();
        assert_eq!((at3.a, at3.b, at3.exit), (0, 3, true));
        assert_eq!(stage_at_cut(hosted, &split, Some(4)), None);
        // Split points are for the entry node only.
        let upper = Stage { a: 2, ..hosted };
        assert_eq!(stage_at_cut(upper, &split, Some(3)), None);
    }

    #[test]
    fn entry_cuts_are_pinned_to_the_loaded_points_in_planner_depths() {
        let cfg = entry(8, vec![5, 3]);
        // Exit 8 (the deepest) sits at planner depth 9; 3 and 5 at their own points.
        let depths = [(3, 3), (5, 5), (8, 9)];
        let mut allowed = Vec::new();
        pin_entry_cuts(&mut allowed, &cfg, &depths);
        assert_eq!(allowed, vec![vec![3, 5, 9]]);
        // A template's further boundaries are kept; boundary 0 is replaced.
        let mut allowed = vec![vec![1, 2], vec![7]];
        pin_entry_cuts(&mut allowed, &cfg, &depths);
        assert_eq!(allowed, vec![vec![3, 5, 9], vec![7]]);
    }

    #[test]
    fn a_node_further_up_keeps_the_template_cuts() {
        let cfg = Agent::builder("unused").layers(4..8).config().unwrap();
        let mut allowed = vec![vec![1, 2]];
        pin_entry_cuts(&mut allowed, &cfg, &[(8, 8)]);
        assert_eq!(allowed, vec![vec![1, 2]]);
    }
}
