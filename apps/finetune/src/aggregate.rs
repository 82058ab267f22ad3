//! Hierarchical federated averaging with deadlines.
//!
//! Devices fine-tune locally and send an [`Update`] (the trained tensors and their sample
//! count); an edge averages its devices' updates ([`fedavg`], weighted by samples) and the
//! cloud averages the edges' (an edge's update carries the sum of its devices' samples, so
//! the two levels give the flat sample-weighted mean of everyone who made the deadlines).
//!
//! [`run_round`] runs one level of one round: every participant's job is a task on the
//! tokio runtime; whatever has not answered at the deadline is aborted and reported as
//! dropped, so a round never waits for a dead node. [`federate`] repeats rounds over a
//! two-level tree until `max_rounds` or until the evaluation metric stops improving by
//! `min_improvement`. Time is tokio's, so tests pause and advance it.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use candle_core::{DType, Tensor};
use serde::Serialize;
use tokio::task::JoinSet;

use crate::error::{Error, Result};

/// Named tensors.
pub type Weights = HashMap<String, Tensor>;

/// A participant's contribution to a round.
#[derive(Debug, Clone)]
pub struct Update {
    /// Training samples behind it (the FedAvg weight).
    pub samples: u64,
    /// The participant's new values of the trained tensors.
    pub tensors: Weights,
    /// Leaf participants (devices) whose work it contains.
    pub contributors: Vec<String>,
}

/// The sample-weighted mean of `updates` (`Σ nᵢ·xᵢ / Σ nᵢ`, accumulated in f64). Every
/// update must hold the same tensor names and shapes.
pub fn fedavg(updates: &[Update]) -> Result<Update> {
    let first = updates
        .first()
        .ok_or_else(|| Error::Aggregate("no updates to average".into()))?;
    let total: u64 = updates.iter().map(|u| u.samples).sum();
    if total == 0 {
        return Err(Error::Aggregate("the updates carry 0 samples".into()));
    }
    let mut tensors = HashMap::new();
    for (name, t0) in &first.tensors {
        let mut acc: Option<Tensor> = None;
        for u in updates {
            let t = u
                .tensors
                .get(name)
                .ok_or_else(|| Error::Aggregate(format!("an update lacks `{name}`")))?;
            if t.dims() != t0.dims() {
                return Err(Error::Aggregate(format!(
                    "`{name}`: shapes {:?} and {:?} differ",
                    t.dims(),
                    t0.dims()
                )));
            }
            let term = (t.to_dtype(DType::F64)? * u.samples as f64)?;
            acc = Some(match acc {
                Some(a) => (a + term)?,
                None => term,
            });
        }
        let mean = match acc {
            Some(a) => (a / total as f64)?.to_dtype(t0.dtype())?,
            None => continue,
        };
        tensors.insert(name.clone(), mean);
    }
    if updates
        .iter()
        .any(|u| u.tensors.len() != first.tensors.len())
    {
        return Err(Error::Aggregate(
            "updates hold different sets of tensors".into(),
        ));
    }
    Ok(Update {
        samples: total,
        tensors,
        contributors: updates
            .iter()
            .flat_map(|u| u.contributors.clone())
            .collect(),
    })
}

/// A participant's work in a round.
pub type Job = Pin<Box<dyn Future<Output = Result<Update>> + Send>>;

/// Deadline and quorum of one level of a round.
#[derive(Debug, Clone, Copy)]
pub struct RoundConfig {
    /// How long the round waits for updates.
    pub deadline: Duration,
    /// Fewest updates worth aggregating (fewer: the round makes no update).
    pub min_participants: usize,
}

/// What one level of a round did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RoundOutcome {
    /// Participants whose update made the deadline.
    pub joined: Vec<String>,
    /// Participants still running at the deadline (aborted).
    pub dropped: Vec<String>,
    /// Participants that failed, with the error.
    pub failed: Vec<(String, String)>,
    /// Samples aggregated.
    pub samples: u64,
    #[serde(skip)]
    /// The aggregate (`None`: fewer than `min_participants` joined).
    pub aggregate: Option<Update>,
}

/// Run `jobs` concurrently until all answered or `cfg.deadline` passed, then average what
/// arrived.
pub async fn run_round(jobs: Vec<(String, Job)>, cfg: RoundConfig) -> RoundOutcome {
    let deadline = tokio::time::Instant::now() + cfg.deadline;
    let mut set = JoinSet::new();
    let mut names = HashMap::new();
    for (name, job) in jobs {
        let h = set.spawn(job);
        names.insert(h.id(), name);
    }
    let mut out = RoundOutcome::default();
    let mut updates = Vec::new();
    loop {
        tokio::select! {
            biased;
            r = set.join_next_with_id() => match r {
                None => break,
                Some(Ok((id, Ok(u)))) => {
                    out.joined.push(names.remove(&id).unwrap_or_default());
                    updates.push(u);
                }
                Some(Ok((id, Err(e)))) => {
                    out.failed.push((names.remove(&id).unwrap_or_default(), e.to_string()));
                }
                Some(Err(e)) => {
                    out.failed.push((names.remove(&e.id()).unwrap_or_default(), e.to_string()));
                }
            },
            _ = tokio::time::sleep_until(deadline) => break,
        }
    }
    set.abort_all();
    let mut dropped: Vec<String> = names.into_values().collect();
    dropped.sort();
    for d in &dropped {
        tracing::warn!(participant = %d, "dropped: no update before the round deadline");
    }
    out.dropped = dropped;
    if updates.len() >= cfg.min_participants.max(1) {
        match fedavg(&updates) {
            Ok(a) => {
                out.samples = a.samples;
                out.aggregate = Some(a);
            }
            Err(e) => out.failed.push(("aggregate".into(), e.to_string())),
        }
    }
    out
}

/// An edge's job: a round over its devices, answered with their average.
pub fn edge_job(edge: String, devices: Vec<(String, Job)>, cfg: RoundConfig) -> Job {
    Box::pin(async move {
        let out = run_round(devices, cfg).await;
        out.aggregate.ok_or_else(|| {
            Error::Aggregate(format!(
                "edge {edge}: {} of its devices answered (dropped {:?}, failed {:?})",
                out.joined.len(),
                out.dropped,
                out.failed
            ))
        })
    })
}

/// Rounds and stop condition of a federation.
#[derive(Debug, Clone, Copy)]
pub struct FederationConfig {
    /// Stop after this many rounds.
    pub max_rounds: u64,
    /// Stop when a round improves the metric (lower is better) by less than this.
    pub min_improvement: f64,
    /// Device → edge level (must be shorter than `cloud.deadline`).
    pub edge: RoundConfig,
    /// Edge → cloud level.
    pub cloud: RoundConfig,
}

/// One federated round, as reported.
#[derive(Debug, Clone, Serialize)]
pub struct RoundReport {
    pub round: u64,
    /// Edges that answered / were dropped / failed.
    pub edges: RoundOutcome,
    /// Devices whose work reached the cloud.
    pub devices: Vec<String>,
    /// The metric after the round (of the unchanged model if nothing was aggregated).
    pub metric: f64,
}

/// The per-round tree: for every edge, its devices' jobs, given the round and the global
/// weights.
pub type Tree = Vec<(String, Vec<(String, Job)>)>;

/// Run rounds until the stop condition. `global` holds the trained tensors; an aggregate
/// replaces them. `eval` scores weights (lower is better).
pub async fn federate(
    cfg: FederationConfig,
    mut global: Weights,
    mut tree: impl FnMut(u64, Arc<Weights>) -> Tree,
    mut eval: impl FnMut(&Weights) -> Result<f64>,
) -> Result<(Weights, Vec<RoundReport>)> {
    if cfg.edge.deadline >= cfg.cloud.deadline {
        return Err(Error::invalid(
            "federation",
            "the edge deadline must be shorter than the cloud's",
        ));
    }
    let mut reports = Vec::new();
    let mut metric = eval(&global)?;
    for round in 1..=cfg.max_rounds {
        let shared = Arc::new(global.clone());
        let jobs = tree(round, shared)
            .into_iter()
            .map(|(edge, devices)| {
                let job = edge_job(edge.clone(), devices, cfg.edge);
                (edge, job)
            })
            .collect();
        let mut out = run_round(jobs, cfg.cloud).await;
        let mut devices = out
            .aggregate
            .as_ref()
            .map(|a| a.contributors.clone())
            .unwrap_or_default();
        devices.sort();
        let before = metric;
        if let Some(a) = out.aggregate.take() {
            for (n, t) in a.tensors {
                global.insert(n, t);
            }
            metric = eval(&global)?;
        }
        tracing::info!(round, metric, devices = devices.len(), "federated round");
        reports.push(RoundReport {
            round,
            edges: out,
            devices,
            metric,
        });
        if before - metric < cfg.min_improvement {
            break;
        }
    }
    Ok((global, reports))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn upd(name: &str, samples: u64, v: &[f32]) -> Update {
        Update {
            samples,
            tensors: HashMap::from([("w".to_string(), Tensor::new(v, &Device::Cpu).unwrap())]),
            contributors: vec![name.to_string()],
        }
    }

    fn job_after(u: Update, after: Duration) -> Job {
        Box::pin(async move {
            tokio::time::sleep(after).await;
            Ok(u)
        })
    }

    fn dead() -> Job {
        Box::pin(std::future::pending())
    }

    #[test]
    fn fedavg_is_the_sample_weighted_mean() {
        let a = fedavg(&[
            upd("a", 1, &[1.0, 2.0, -4.0]),
            upd("b", 3, &[3.0, 6.0, 0.5]),
        ])
        .unwrap();
        assert_eq!(a.samples, 4);
        assert_eq!(
            a.tensors["w"].to_vec1::<f32>().unwrap(),
            vec![2.5, 5.0, -0.625]
        );
        assert_eq!(a.contributors, vec!["a", "b"]);
        assert!(fedavg(&[]).is_err());
        assert!(fedavg(&[upd("a", 0, &[1.0])]).is_err());
        assert!(fedavg(&[upd("a", 1, &[1.0]), upd("b", 1, &[1.0, 2.0])]).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_dead_participant_is_dropped_at_the_deadline() {
        let start = tokio::time::Instant::now();
        let cfg = RoundConfig {
            deadline: Duration::from_secs(5),
            min_participants: 1,
        };
        let jobs = vec![
            (
                "a".to_string(),
                job_after(upd("a", 1, &[0.0]), Duration::from_secs(1)),
            ),
            ("dead".to_string(), dead()),
            (
                "b".to_string(),
                job_after(upd("b", 3, &[4.0]), Duration::from_secs(2)),
            ),
        ];
        let out = run_round(jobs, cfg).await;
        assert_eq!(start.elapsed(), Duration::from_secs(5));
        assert_eq!(out.dropped, vec!["dead"]);
        assert_eq!(out.joined.len(), 2);
        let a = out.aggregate.unwrap();
        assert_eq!(a.tensors["w"].to_vec1::<f32>().unwrap(), vec![3.0]);

        // Everyone answered: the round ends as soon as the last update arrives.
        let start = tokio::time::Instant::now();
        let out = run_round(
            vec![(
                "a".to_string(),
                job_after(upd("a", 1, &[0.0]), Duration::from_secs(1)),
            )],
            cfg,
        )
        .await;
        assert_eq!(start.elapsed(), Duration::from_secs(1));
        assert!(out.dropped.is_empty() && out.aggregate.is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn hierarchical_rounds_weight_by_samples_and_stop() {
        let cfg = FederationConfig {
            max_rounds: 10,
            min_improvement: 0.5,
            edge: RoundConfig {
                deadline: Duration::from_secs(10),
                min_participants: 1,
            },
            cloud: RoundConfig {
                deadline: Duration::from_secs(20),
                min_participants: 1,
            },
        };
        let global =
            HashMap::from([("w".to_string(), Tensor::new(&[0f32], &Device::Cpu).unwrap())]);
        // Every device moves w to (its target); the metric is |w - 6|.
        let tree = |_round: u64, _g: Arc<Weights>| -> Tree {
            let s = Duration::from_secs(1);
            vec![
                (
                    "edge-a".to_string(),
                    vec![
                        ("d1".to_string(), job_after(upd("d1", 1, &[2.0]), s)),
                        ("d2".to_string(), job_after(upd("d2", 1, &[4.0]), s)),
                        ("d-dead".to_string(), dead()),
                    ],
                ),
                (
                    "edge-b".to_string(),
                    vec![("d3".to_string(), job_after(upd("d3", 2, &[9.0]), s))],
                ),
                ("edge-dead".to_string(), vec![("d4".to_string(), dead())]),
            ]
        };
        let eval = |w: &Weights| -> Result<f64> {
            Ok((f64::from(w["w"].to_vec1::<f32>()?[0]) - 6.0).abs())
        };
        let (w, reports) = federate(cfg, global, tree, eval).await.unwrap();
        // (1·2 + 1·4 + 2·9) / 4 = 6 after round 1; round 2 changes nothing -> stop.
        assert_eq!(w["w"].to_vec1::<f32>().unwrap(), vec![6.0]);
        assert_eq!(reports.len(), 2);
        assert_eq!(reports[0].edges.samples, 4);
        assert_eq!(reports[0].devices, vec!["d1", "d2", "d3"]);
        // edge-dead's only device never answers: the edge itself fails at its deadline.
        assert_eq!(reports[0].edges.failed.len(), 1);
        assert!(reports[0].edges.failed[0].0 == "edge-dead");
    }
}
