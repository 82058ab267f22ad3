//! Serving with only a task's top-`k` experts per layer resident.
//!
//! [`PrunedModel`] holds a family loaded **without** experts; [`PrunedModel::prepare`]
//! makes the experts a pattern keeps resident (paged in from the mmapped checkpoint on
//! first use), evicts least-recently-used experts of other patterns when the memory budget
//! requires it, and restricts every MoE router to the kept experts (renormalised over
//! them). Keeping every expert lifts the restriction: the output then equals the unpruned
//! model's exactly.

use std::collections::HashMap;
use std::path::Path;

use flow_familial::weights::Checkpoint;
use flow_familial::{FamilialModel, ModelConfig, Part};

use crate::error::{Error, Result};
use crate::profile::TaskPattern;

/// Counters of the expert cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExpertStats {
    pub loads: u64,
    pub evictions: u64,
    /// Experts resident now and their bytes.
    pub resident: usize,
    pub resident_bytes: usize,
}

/// Which experts of a model loaded without experts are resident: pages them in from the
/// mmapped checkpoint per task pattern, evicts least-recently-used ones under a memory
/// budget, and restricts routing to the pattern's experts. Works on any model part (e.g. a
/// cloud node hosting only the deep layers): only the hosted MoE layers are touched.
pub struct ExpertCache {
    ckpt: Checkpoint,
    budget: usize,
    /// (layer, expert) → last use (a logical clock).
    lru: HashMap<(usize, usize), u64>,
    clock: u64,
    stats: ExpertStats,
}

impl std::fmt::Debug for ExpertCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExpertCache")
            .field("checkpoint", &self.ckpt)
            .field("budget", &self.budget)
            .field("stats", &self.stats)
            .finish()
    }
}

/// Bytes of every expert of every hosted MoE layer of `model` (the unpruned expert memory).
pub fn all_expert_bytes(model: &FamilialModel) -> Result<usize> {
    let mut total = 0;
    for l in model.moe_layers() {
        let m = model.moe(l)?;
        total += m.spec.num_experts * m.expert_bytes();
    }
    Ok(total)
}

impl ExpertCache {
    /// A cache paging from `ckpt` with `budget_bytes` for resident experts; nothing resident.
    pub fn new(ckpt: Checkpoint, budget_bytes: usize) -> Self {
        Self {
            ckpt,
            budget: budget_bytes,
            lru: HashMap::new(),
            clock: 0,
            stats: ExpertStats::default(),
        }
    }

    /// Counters.
    pub fn stats(&self) -> ExpertStats {
        self.stats
    }

    /// Make `pattern`'s top-`k` experts of every MoE layer of `model` resident and restrict
    /// routing to them (`k >= experts`: every expert, no restriction). Returns the bytes
    /// the pattern keeps resident.
    pub fn prepare(
        &mut self,
        model: &mut FamilialModel,
        pattern: &TaskPattern,
        k: usize,
    ) -> Result<usize> {
        if k == 0 {
            return Err(Error::Invalid("keep at least one expert per layer".into()));
        }
        let layers = model.moe_layers();
        let mut want: Vec<(usize, Vec<usize>)> = Vec::new();
        let mut need = 0usize;
        for &l in &layers {
            let moe = model.moe(l)?;
            let n = moe.spec.num_experts;
            let experts: Vec<usize> = if k >= n {
                (0..n).collect()
            } else {
                let lp = pattern
                    .layers
                    .iter()
                    .find(|p| p.layer == l)
                    .ok_or_else(|| {
                        Error::Invalid(format!(
                            "pattern `{}` has no entry for MoE layer {l}",
                            pattern.task
                        ))
                    })?;
                if lp.ranking.len() != n {
                    return Err(Error::Invalid(format!(
                        "pattern `{}` ranks {} experts at layer {l}, the model has {n}",
                        pattern.task,
                        lp.ranking.len()
                    )));
                }
                lp.top(k).to_vec()
            };
            need += experts.len() * moe.expert_bytes();
            want.push((l, experts));
        }
        if need > self.budget {
            return Err(Error::Budget {
                budget: self.budget,
                need,
                experts: want.iter().map(|(_, e)| e.len()).sum(),
            });
        }
        self.clock += 1;
        for (l, experts) in &want {
            for &j in experts {
                self.lru.insert((*l, j), self.clock);
            }
        }
        // Evict least recently used experts not wanted now until the wanted ones fit.
        let wanted_new: usize = want
            .iter()
            .map(|(l, e)| {
                let moe = model.moe(*l)?;
                let res = moe.resident();
                Ok(e.iter().filter(|&&j| !res[j]).count() * moe.expert_bytes())
            })
            .sum::<Result<usize>>()?;
        while self.stats.resident_bytes + wanted_new > self.budget {
            let victim = self
                .lru
                .iter()
                .filter(|(_, &t)| t < self.clock)
                .min_by_key(|(key, &t)| (t, **key))
                .map(|(key, _)| *key);
            let Some((l, j)) = victim else { break };
            self.lru.remove(&(l, j));
            if model.evict_expert(l, j)? {
                self.stats.evictions += 1;
                self.stats.resident -= 1;
                self.stats.resident_bytes -= model.moe(l)?.expert_bytes();
            }
        }
        for (l, experts) in &want {
            let n = model.moe(*l)?.spec.num_experts;
            for &j in experts {
                if !model.moe(*l)?.resident()[j] {
                    let bytes = model.load_expert(&self.ckpt, *l, j)?;
                    self.stats.loads += 1;
                    self.stats.resident += 1;
                    self.stats.resident_bytes += bytes;
                }
            }
            let restriction = if experts.len() >= n {
                None
            } else {
                let mut mask = vec![false; n];
                for &j in experts {
                    mask[j] = true;
                }
                Some(mask)
            };
            // Resident experts of other patterns stay out of the routing.
            model.restrict_experts(*l, restriction.clone());
            if restriction.is_none() && model.moe(*l)?.resident().iter().any(|r| !r) {
                return Err(Error::Invalid(format!(
                    "internal: layer {l} should have every expert resident"
                )));
            }
        }
        Ok(need)
    }
}

/// A family whose experts are paged in per task pattern under a memory budget.
pub struct PrunedModel {
    model: FamilialModel,
    cache: ExpertCache,
}

impl std::fmt::Debug for PrunedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrunedModel")
            .field("cache", &self.cache)
            .finish()
    }
}

impl PrunedModel {
    /// Open the checkpoint in `dir` (whole family, `cfg`) with no expert resident and a
    /// budget of `budget_bytes` for resident experts.
    pub fn open(dir: &Path, cfg: ModelConfig, budget_bytes: usize) -> Result<Self> {
        let part = Part::full(&cfg);
        let model = FamilialModel::load_part_without_experts(dir, cfg, part)?;
        if model.moe_layers().is_empty() {
            return Err(Error::Invalid(format!(
                "{}: not an MoE family (no MoE layer)",
                dir.display()
            )));
        }
        Ok(Self {
            model,
            cache: ExpertCache::new(Checkpoint::open(dir)?, budget_bytes),
        })
    }

    /// The model (experts resident as last prepared).
    pub fn model(&self) -> &FamilialModel {
        &self.model
    }

    /// Counters.
    pub fn stats(&self) -> ExpertStats {
        self.cache.stats()
    }

    /// Bytes of every expert of every MoE layer (the unpruned expert memory).
    pub fn all_expert_bytes(&self) -> Result<usize> {
        all_expert_bytes(&self.model)
    }

    /// Make `pattern`'s top-`k` experts of every MoE layer resident and restrict routing to
    /// them (`k >= experts`: every expert, no restriction). Returns the resident bytes.
    pub fn prepare(&mut self, pattern: &TaskPattern, k: usize) -> Result<usize> {
        self.cache.prepare(&mut self.model, pattern, k)
    }
}
