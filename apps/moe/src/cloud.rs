//! Pruned serving in a node that hosts a part of an MoE family (the cloud tier).
//!
//! A node that receives hidden states (not tokens) cannot compute the first MoE layer's
//! signature of the whole family when it hosts only deeper layers, so [`PrunedServing`]
//! takes signatures at the **first MoE layer the node hosts** ([`profile::signature_at`]
//! from the states of a session's prompt entering the node) and retrieves with the pattern
//! keys stored for that layer ([`TaskPattern::key_at`]). Each session keeps the pattern it
//! was assigned on its first step; before a batch of sessions sharing a pattern runs,
//! [`PrunedServing::prepare`] makes that pattern's top-`k` experts resident (lazy load from
//! the mmapped checkpoint, LRU eviction under the budget, router renormalised over them).
//! With `k` at least the number of experts every expert is resident and routing is
//! unrestricted: the node's output equals unpruned serving exactly.

use std::path::Path;

use candle_core::Tensor;
use flow_familial::weights::Checkpoint;
use flow_familial::FamilialModel;

use crate::error::{Error, Result};
use crate::experts::{all_expert_bytes, ExpertCache, ExpertStats};
use crate::profile::{self, TaskPattern};
use crate::store::{ExactIndex, PatternIndex, PatternStore};

/// Counters of pruned serving (exported in a node's `/metrics`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServingStats {
    /// The expert cache (resident experts and bytes, loads, evictions).
    pub experts: ExpertStats,
    /// Bytes every expert of the hosted MoE layers would take (unpruned).
    pub all_expert_bytes: usize,
    /// Sessions assigned a pattern by signature retrieval.
    pub retrievals: u64,
    /// Sessions first seen past position 0 (no whole prompt to sign): given the most
    /// recently used pattern.
    pub fallbacks: u64,
    /// Pattern switches (a batch of another task than the previous one).
    pub switches: u64,
}

/// Pattern retrieval and expert residency for a model part loaded without experts.
pub struct PrunedServing {
    store: PatternStore,
    index: ExactIndex,
    cache: ExpertCache,
    k: usize,
    layer: usize,
    prepared: Option<usize>,
    stats: ServingStats,
}

impl std::fmt::Debug for PrunedServing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrunedServing")
            .field("store", &self.store)
            .field("k", &self.k)
            .field("layer", &self.layer)
            .field("stats", &self.stats)
            .finish()
    }
}

impl PrunedServing {
    /// Serve `model` (a part loaded without experts, e.g. with
    /// [`FamilialModel::load_part_without_experts`]) with the patterns in `patterns`,
    /// keeping the top-`k` experts per layer of a request's task resident, paged from the
    /// checkpoint in `ckpt_dir` under `budget_bytes` of expert memory.
    pub fn open(
        model: &FamilialModel,
        ckpt_dir: &Path,
        patterns: &Path,
        k: usize,
        budget_bytes: usize,
    ) -> Result<Self> {
        if k == 0 {
            return Err(Error::Invalid(
                "--moe-experts must keep at least one expert per layer".into(),
            ));
        }
        let layer = *model.moe_layers().first().ok_or_else(|| {
            Error::Invalid(
                "expert pruning needs MoE layers, and this node hosts none of the family's".into(),
            )
        })?;
        let store = PatternStore::open(patterns)?;
        let mut index = ExactIndex::default();
        for (i, p) in store.patterns().iter().enumerate() {
            let key = p.key_at(layer).ok_or_else(|| Error::Pattern {
                path: patterns.join(format!("{}.json", p.task)),
                msg: format!(
                    "no retrieval key for MoE layer {layer} (the first this node hosts); re-run `flow-node moe profile` to store keys for every MoE layer"
                ),
            })?;
            index.insert(i, key.to_vec())?;
        }
        let s = Self {
            store,
            index,
            cache: ExpertCache::new(Checkpoint::open(ckpt_dir)?, budget_bytes),
            k,
            layer,
            prepared: None,
            stats: ServingStats {
                all_expert_bytes: all_expert_bytes(model)?,
                ..ServingStats::default()
            },
        };
        // Fail at start-up, not on the first request, when one pattern cannot fit.
        let per_pattern = s.need_bytes(model)?;
        if per_pattern > budget_bytes {
            return Err(Error::Budget {
                budget: budget_bytes,
                need: per_pattern,
                experts: model.moe_layers().len() * k,
            });
        }
        Ok(s)
    }

    fn need_bytes(&self, model: &FamilialModel) -> Result<usize> {
        let mut need = 0;
        for l in model.moe_layers() {
            let m = model.moe(l)?;
            need += self.k.min(m.spec.num_experts) * m.expert_bytes();
        }
        Ok(need)
    }

    /// The MoE layer signatures are taken at (the first one the node hosts).
    pub fn signature_layer(&self) -> usize {
        self.layer
    }

    /// Experts kept per layer.
    pub fn experts_kept(&self) -> usize {
        self.k
    }

    /// The pattern a session gets from `hidden`: the states of its whole prompt (positions
    /// `0..n`) entering trunk layer `from` (at or below [`Self::signature_layer`]).
    pub fn assign(&mut self, model: &FamilialModel, hidden: &Tensor, from: usize) -> Result<usize> {
        let sig = profile::signature_at(model, hidden, from, self.layer)?;
        let (id, _) = self.index.nearest(&sig).ok_or_else(|| {
            Error::Invalid(format!(
                "no stored pattern has a key of length {} (was the store profiled on another model?)",
                sig.len()
            ))
        })?;
        self.stats.retrievals += 1;
        Ok(id)
    }

    /// The pattern for a session whose prompt this node never saw from position 0: the
    /// most recently prepared one (the first stored pattern before any).
    pub fn fallback(&mut self) -> usize {
        self.stats.fallbacks += 1;
        self.prepared.unwrap_or(0)
    }

    /// The stored pattern `id`.
    pub fn pattern(&self, id: usize) -> Result<&TaskPattern> {
        self.store
            .patterns()
            .get(id)
            .ok_or_else(|| Error::Invalid(format!("unknown pattern {id}")))
    }

    /// Make pattern `id`'s experts resident and routing restricted to them (a no-op when
    /// it is the one prepared last).
    pub fn prepare(&mut self, model: &mut FamilialModel, id: usize) -> Result<()> {
        if self.prepared == Some(id) {
            return Ok(());
        }
        let pattern = self
            .store
            .patterns()
            .get(id)
            .ok_or_else(|| Error::Invalid(format!("unknown pattern {id}")))?;
        self.cache.prepare(model, pattern, self.k)?;
        if self.prepared.is_some() {
            self.stats.switches += 1;
        }
        self.prepared = Some(id);
        Ok(())
    }

    /// Counters.
    pub fn stats(&self) -> ServingStats {
        ServingStats {
            experts: self.cache.stats(),
            ..self.stats
        }
    }
}
