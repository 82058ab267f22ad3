//! [`FamilialModel`]: one family of early-exit members sharing a trunk, possibly only a part
//! of it (the layers and exits one node hosts).
//!
//! The split API the agent calls:
//! - [`FamilialModel::embed`] token ids → hidden `[tokens, hidden]`;
//! - [`FamilialModel::run_layers`] trunk layers `a..b` over one or more segments with KV;
//! - [`FamilialModel::exit`] exit `e` (its own block, norm and head) → logits;
//! - [`FamilialModel::backfill`] fill a deeper member's KV for positions that exited earlier.
//!
//! Exit `e` reads the hidden state after trunk layers `[0, e)` — the same tensor that is
//! shipped to the next tier when the exit is not confident, so a tier continues from layer
//! `e` with no recomputation.

use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;

use candle_core::Tensor;

use crate::config::{ExitBlock, HeadRef, ModelConfig, NormRef};
use crate::error::{Error, Result};
use crate::kv::{LayerKv, SeqCache};
use crate::layers::{check_compute_dtype, rms_norm, Block, FfnBlock, Mode, Moe, Rope, Seg};
use crate::proj::{Embedding, Proj};
use crate::weights::{Checkpoint, TensorSource};

/// Which part of a family a node hosts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    /// Whether the token embedding is loaded (the entry node needs it).
    pub embed: bool,
    /// Trunk layers `[start, end)`.
    pub trunk: Range<usize>,
    /// Exit points hosted (each needs its block, norm and head).
    pub exits: Vec<usize>,
}

impl Part {
    /// Everything.
    pub fn full(cfg: &ModelConfig) -> Self {
        Self {
            embed: true,
            trunk: 0..cfg.num_layers,
            exits: cfg.exit_points(),
        }
    }
}

/// Which rows of an exit's input get logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rows {
    /// The last position of every segment (generation).
    Last,
    /// Every position (scoring, verification of drafts, tests).
    All,
}

/// A familial model or a part of one, ready to run.
#[derive(Debug)]
pub struct FamilialModel {
    cfg: ModelConfig,
    part: Part,
    embed: Option<Embedding>,
    trunk: Vec<Option<Block>>,
    exit_blocks: Vec<Option<Block>>,
    norms: HashMap<NormRef, Tensor>,
    heads: HashMap<HeadRef, Proj>,
    rope: Rope,
    mode: Mode,
    allowed_experts: HashMap<usize, Vec<bool>>,
}

fn layer_prefix(i: usize) -> String {
    format!("model.layers.{i}")
}

fn exit_block_prefix(i: usize) -> String {
    format!("model.eelayers.{i}")
}

fn norm_name(n: NormRef) -> String {
    match n {
        NormRef::Own(i) => format!("model.norms.{i}.weight"),
        NormRef::Final => "model.norm.weight".into(),
    }
}

fn head_name(h: HeadRef) -> String {
    match h {
        HeadRef::Own(i) => format!("lm_head.{i}.weight"),
        HeadRef::Shared => "lm_head.weight".into(),
        HeadRef::TiedEmbedding => "model.embed_tokens.weight".into(),
    }
}

impl FamilialModel {
    /// Load the whole family from an HF checkpoint directory.
    pub fn load(dir: &Path) -> Result<Self> {
        let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
        let part = Part::full(&cfg);
        let ck = Checkpoint::open(dir)?;
        Self::from_source(cfg, part, &ck, Mode::Infer)
    }

    /// Load only `part` of the family in `dir` (with `cfg`, e.g. after declaring exits).
    pub fn load_part(dir: &Path, cfg: ModelConfig, part: Part) -> Result<Self> {
        let ck = Checkpoint::open(dir)?;
        Self::from_source(cfg, part, &ck, Mode::Infer)
    }

    /// Load `part` of the family in `dir` with **no MoE expert resident**: routers, shared
    /// experts and everything else are loaded; experts are paged in one at a time from the
    /// mapping with [`FamilialModel::load_expert`] (expert pruning, lazy loading).
    pub fn load_part_without_experts(dir: &Path, cfg: ModelConfig, part: Part) -> Result<Self> {
        let ck = Checkpoint::open(dir)?;
        Self::from_source_with(cfg, part, &ck, Mode::Infer, false)
    }

    /// Build from any tensor source.
    pub fn from_source(
        cfg: ModelConfig,
        part: Part,
        src: &dyn TensorSource,
        mode: Mode,
    ) -> Result<Self> {
        Self::from_source_with(cfg, part, src, mode, true)
    }

    fn from_source_with(
        cfg: ModelConfig,
        part: Part,
        src: &dyn TensorSource,
        mode: Mode,
        experts: bool,
    ) -> Result<Self> {
        if part.trunk.end > cfg.num_layers || part.trunk.start > part.trunk.end {
            return Err(Error::Invalid(format!(
                "trunk range {:?} does not fit a model of {} layers",
                part.trunk, cfg.num_layers
            )));
        }
        let h = cfg.hidden_size;
        let embed = if part.embed || needs_tied(&cfg, &part)? {
            Some(Embedding::load(
                src,
                "model.embed_tokens.weight",
                &[cfg.vocab_size, h],
            )?)
        } else {
            None
        };
        let mut trunk: Vec<Option<Block>> = (0..cfg.num_layers).map(|_| None).collect();
        let mut want: Vec<usize> = part.trunk.clone().collect();
        for &p in &part.exits {
            let spec = cfg.exits[cfg.exit_index(p)?];
            if let ExitBlock::Trunk(l) = spec.block {
                want.push(l);
            }
        }
        for l in want {
            if trunk[l].is_none() {
                trunk[l] = Some(Block::load_with(
                    src,
                    &layer_prefix(l),
                    &cfg,
                    &cfg.ffn[l],
                    experts,
                )?);
            }
        }
        let mut exit_blocks: Vec<Option<Block>> =
            (0..cfg.exit_block_ffn.len()).map(|_| None).collect();
        let mut norms = HashMap::new();
        let mut heads = HashMap::new();
        for &p in &part.exits {
            let spec = cfg.exits[cfg.exit_index(p)?];
            if let ExitBlock::Own(i) = spec.block {
                exit_blocks[i] = Some(Block::load(
                    src,
                    &exit_block_prefix(i),
                    &cfg,
                    &cfg.exit_block_ffn[i],
                )?);
            }
            if let std::collections::hash_map::Entry::Vacant(e) = norms.entry(spec.norm) {
                e.insert(src.get(&norm_name(spec.norm), &[h])?);
            }
            if let std::collections::hash_map::Entry::Vacant(e) = heads.entry(spec.head) {
                let head = match spec.head {
                    HeadRef::TiedEmbedding => embed
                        .as_ref()
                        .map(Embedding::as_head)
                        .ok_or_else(|| Error::Invalid("tied head needs the embedding".into()))?,
                    other => {
                        let name = head_name(other);
                        let name = name.trim_end_matches(".weight");
                        Proj::load(src, name, cfg.vocab_size, h, false)?
                    }
                };
                e.insert(head);
            }
        }
        let embed = if part.embed { embed } else { None };
        let rope = Rope::new(cfg.head_dim, cfg.rope.theta, cfg.max_position_embeddings)?
            .interleaved(cfg.rope.interleaved);
        Ok(Self {
            cfg,
            part,
            embed,
            trunk,
            exit_blocks,
            norms,
            heads,
            rope,
            mode,
            allowed_experts: HashMap::new(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// What this model part hosts.
    pub fn part(&self) -> &Part {
        &self.part
    }

    /// A fresh, empty KV cache for one sequence.
    pub fn new_cache(&self) -> SeqCache {
        SeqCache::new(self.cfg.num_layers, self.cfg.exits.len())
    }

    /// Tensor names this part reads, for fingerprints and accounting.
    pub fn tensor_names(cfg: &ModelConfig, part: &Part) -> Result<Vec<String>> {
        let mut v = Vec::new();
        if part.embed {
            v.push("model.embed_tokens.weight".to_string());
        }
        let mut layers: Vec<usize> = part.trunk.clone().collect();
        for &p in &part.exits {
            let spec = cfg.exits[cfg.exit_index(p)?];
            match spec.block {
                ExitBlock::Trunk(l) => layers.push(l),
                ExitBlock::Own(i) => v.extend(Block::tensor_names(
                    &exit_block_prefix(i),
                    cfg,
                    &cfg.exit_block_ffn[i],
                )),
            }
            v.push(norm_name(spec.norm));
            v.push(head_name(spec.head));
        }
        layers.sort_unstable();
        layers.dedup();
        for l in layers {
            v.extend(Block::tensor_names(&layer_prefix(l), cfg, &cfg.ffn[l]));
        }
        v.sort();
        v.dedup();
        Ok(v)
    }

    /// Restrict the router of MoE trunk layer `layer` to the experts marked `true`
    /// (renormalised over them); `None` lifts the restriction.
    pub fn restrict_experts(&mut self, layer: usize, allowed: Option<Vec<bool>>) {
        match allowed {
            Some(a) => {
                self.allowed_experts.insert(layer, a);
            }
            None => {
                self.allowed_experts.remove(&layer);
            }
        }
    }

    /// Record the router auxiliary losses of every MoE FFN (trunk and exit blocks) of this
    /// [`Mode::Train`] model into `sink` (`None`: stop); used by the trainer's
    /// load-balancing loss.
    pub fn set_router_aux_sink(&mut self, sink: Option<crate::layers::RouterAuxSink>) {
        for b in self
            .trunk
            .iter_mut()
            .chain(self.exit_blocks.iter_mut())
            .flatten()
        {
            if let FfnBlock::Moe(m) = &mut b.ffn {
                m.set_aux_sink(sink.clone());
            }
        }
    }

    /// The hosted trunk layers whose FFN is MoE, in order.
    pub fn moe_layers(&self) -> Vec<usize> {
        (0..self.trunk.len())
            .filter(|&l| self.moe(l).is_ok())
            .collect()
    }

    /// The MoE FFN of hosted trunk layer `layer`.
    pub fn moe(&self, layer: usize) -> Result<&Moe> {
        match self.trunk.get(layer).and_then(Option::as_ref) {
            Some(Block {
                ffn: FfnBlock::Moe(m),
                ..
            }) => Ok(m),
            Some(_) => Err(Error::Invalid(format!("layer {layer} is not an MoE layer"))),
            None => Err(self.not_hosted(format!("trunk layer {layer}"))),
        }
    }

    fn moe_mut(&mut self, layer: usize) -> Result<&mut Moe> {
        self.moe(layer)?;
        match self.trunk.get_mut(layer).and_then(Option::as_mut) {
            Some(Block {
                ffn: FfnBlock::Moe(m),
                ..
            }) => Ok(m),
            _ => Err(Error::Invalid(format!("layer {layer} is not an MoE layer"))),
        }
    }

    /// Page expert `expert` of MoE layer `layer` in from `src` (e.g. the mmapped
    /// [`Checkpoint`]); a no-op when it is resident. Returns the bytes one expert holds.
    pub fn load_expert(
        &mut self,
        src: &dyn TensorSource,
        layer: usize,
        expert: usize,
    ) -> Result<usize> {
        self.moe_mut(layer)?.load_expert(src, expert)
    }

    /// Drop expert `expert` of MoE layer `layer`; the router then skips it (renormalised
    /// over the resident experts). Returns whether it was resident.
    pub fn evict_expert(&mut self, layer: usize, expert: usize) -> Result<bool> {
        Ok(self.moe_mut(layer)?.evict_expert(expert))
    }

    fn not_hosted(&self, what: String) -> Error {
        Error::NotHosted {
            what,
            hosted: self.part.trunk.clone(),
            exits: self.part.exits.clone(),
        }
    }

    /// Token ids → hidden states `[tokens, hidden]`.
    pub fn embed(&self, tokens: &[u32]) -> Result<Tensor> {
        let e = self
            .embed
            .as_ref()
            .ok_or_else(|| self.not_hosted("the token embedding".into()))?;
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= self.cfg.vocab_size) {
            return Err(Error::Invalid(format!(
                "token id {t} is outside the vocabulary (size {})",
                self.cfg.vocab_size
            )));
        }
        e.lookup(tokens)
    }

    fn check_batch(&self, hidden: &Tensor, segs: &[Seg], n_caches: usize) -> Result<()> {
        check_compute_dtype(hidden)?;
        let (n, h) = hidden.dims2()?;
        if h != self.cfg.hidden_size {
            return Err(Error::Invalid(format!(
                "hidden states have width {h}, the model's hidden_size is {}",
                self.cfg.hidden_size
            )));
        }
        let total: usize = segs.iter().map(|s| s.len).sum();
        if total != n || segs.is_empty() || segs.iter().any(|s| s.len == 0) {
            return Err(Error::Invalid(format!(
                "segments {segs:?} do not cover the {n} rows of the hidden states"
            )));
        }
        if n_caches != segs.len() {
            return Err(Error::Invalid(format!(
                "{} segments but {n_caches} caches",
                segs.len()
            )));
        }
        Ok(())
    }

    /// Run trunk layers `layers` on `hidden` (`[tokens, hidden]`, the state after layer
    /// `layers.start`), one segment per sequence, each appending to its cache.
    pub fn run_layers(
        &self,
        hidden: &Tensor,
        layers: Range<usize>,
        segs: &[Seg],
        caches: &mut [&mut SeqCache],
    ) -> Result<Tensor> {
        self.check_batch(hidden, segs, caches.len())?;
        let mut x = hidden.clone();
        for l in layers {
            let block = self
                .trunk
                .get(l)
                .and_then(Option::as_ref)
                .ok_or_else(|| self.not_hosted(format!("trunk layer {l}")))?;
            let mut kvs: Vec<&mut LayerKv> = caches
                .iter_mut()
                .map(|c| c.trunk.get_mut(l))
                .collect::<Option<_>>()
                .ok_or_else(|| Error::Kv(format!("cache has no slot for layer {l}")))?;
            let what = || format!("trunk layer {l}");
            x = block.forward(
                &x,
                segs,
                &mut kvs,
                &self.rope,
                self.mode,
                self.allowed_experts.get(&l).map(Vec::as_slice),
                &what,
            )?;
        }
        Ok(x)
    }

    /// Run exit `point`'s block on `hidden` (the state after trunk layers `[0, point)`),
    /// appending to the exit block's caches, and return the block output.
    pub fn exit_block(
        &self,
        hidden: &Tensor,
        point: usize,
        segs: &[Seg],
        caches: &mut [&mut SeqCache],
    ) -> Result<Tensor> {
        self.check_batch(hidden, segs, caches.len())?;
        let idx = self.cfg.exit_index(point)?;
        if !self.part.exits.contains(&point) {
            return Err(self.not_hosted(format!("exit {point}")));
        }
        let spec = self.cfg.exits[idx];
        let block = match spec.block {
            ExitBlock::Own(i) => self.exit_blocks.get(i).and_then(Option::as_ref),
            ExitBlock::Trunk(l) => self.trunk.get(l).and_then(Option::as_ref),
        }
        .ok_or_else(|| self.not_hosted(format!("the block of exit {point}")))?;
        let mut kvs: Vec<&mut LayerKv> = caches
            .iter_mut()
            .map(|c| c.exits.get_mut(idx))
            .collect::<Option<_>>()
            .ok_or_else(|| Error::Kv(format!("cache has no slot for exit {point}")))?;
        let what = || format!("the block of exit {point}");
        let layer_for_experts = match spec.block {
            ExitBlock::Trunk(l) => Some(l),
            ExitBlock::Own(_) => None,
        };
        block.forward(
            hidden,
            segs,
            &mut kvs,
            &self.rope,
            self.mode,
            layer_for_experts
                .and_then(|l| self.allowed_experts.get(&l))
                .map(Vec::as_slice),
            &what,
        )
    }

    /// Exit `point`'s norm and head on block outputs → logits `[rows, vocab]`.
    pub fn exit_head(&self, block_out: &Tensor, point: usize) -> Result<Tensor> {
        let spec = self.cfg.exits[self.cfg.exit_index(point)?];
        let norm = self
            .norms
            .get(&spec.norm)
            .ok_or_else(|| self.not_hosted(format!("the norm of exit {point}")))?;
        let head = self
            .heads
            .get(&spec.head)
            .ok_or_else(|| self.not_hosted(format!("the head of exit {point}")))?;
        let x = rms_norm(block_out, norm, self.cfg.rms_norm_eps, self.mode)?;
        head.forward(&x)
    }

    /// Exit `point` (Ruyi semantics: its block, then its norm and head) on `hidden`, the
    /// state after trunk layers `[0, point)`. Logits `[rows, vocab]` for `rows`.
    pub fn exit(
        &self,
        hidden: &Tensor,
        point: usize,
        segs: &[Seg],
        caches: &mut [&mut SeqCache],
        rows: Rows,
    ) -> Result<Tensor> {
        let out = self.exit_block(hidden, point, segs, caches)?;
        let out = match rows {
            Rows::All => out,
            Rows::Last => last_rows(&out, segs)?,
        };
        self.exit_head(&out, point)
    }

    /// Fill this part's KV for positions that exited below it: run trunk layers `layers`
    /// on `hidden` (the state after layer `layers.start` for those positions, shipped by the
    /// shallower tier) and the blocks of `exits` whose point lies in
    /// `layers.start..=layers.end`. Returns the state after `layers.end`.
    pub fn backfill(
        &self,
        hidden: &Tensor,
        layers: Range<usize>,
        exits: &[usize],
        segs: &[Seg],
        caches: &mut [&mut SeqCache],
    ) -> Result<Tensor> {
        let mut sorted: Vec<usize> = exits.to_vec();
        sorted.sort_unstable();
        for &p in &sorted {
            if p < layers.start || p > layers.end {
                return Err(Error::Invalid(format!(
                    "exit {p} is outside the backfilled range {}..={}",
                    layers.start, layers.end
                )));
            }
        }
        let mut x = hidden.clone();
        let mut at = layers.start;
        for p in sorted {
            x = self.run_layers(&x, at..p, segs, caches)?;
            at = p;
            self.exit_block(&x, p, segs, caches)?;
        }
        self.run_layers(&x, at..layers.end, segs, caches)
    }

    /// Single-sequence full forward at exit `point`: embed, trunk `[0, point)`, exit.
    /// Logits for every position. Convenience for tests and scoring.
    pub fn forward_exit(
        &self,
        tokens: &[u32],
        point: usize,
        cache: &mut SeqCache,
    ) -> Result<Tensor> {
        let start = cache
            .trunk_len(0)
            .max(cache.exit_len(self.cfg.exit_index(point)?));
        let segs = [Seg::new(start, tokens.len())];
        let h = self.embed(tokens)?;
        let h = self.run_layers(&h, 0..point, &segs, &mut [cache])?;
        self.exit(&h, point, &segs, &mut [cache], Rows::All)
    }

    /// Router logits of MoE trunk layer `layer` for `hidden` (the layer's input), computed
    /// without touching any cache: attention runs on a scratch cache over `seg`.
    pub fn router_logits(&self, hidden: &Tensor, layer: usize, seg: Seg) -> Result<Tensor> {
        let block = self
            .trunk
            .get(layer)
            .and_then(Option::as_ref)
            .ok_or_else(|| self.not_hosted(format!("trunk layer {layer}")))?;
        let FfnBlock::Moe(moe) = &block.ffn else {
            return Err(Error::Invalid(format!("layer {layer} is not an MoE layer")));
        };
        // A prompt signature covers a whole prompt, so a scratch cache from position 0 holds
        // everything attention needs.
        if seg.start != 0 {
            return Err(Error::Invalid(
                "router signatures need whole prompts (start 0)".into(),
            ));
        }
        let mut scratch = LayerKv::default();
        let what = || format!("trunk layer {layer} (scratch)");
        let mid =
            block.attention_residual(hidden, &[seg], &mut [&mut scratch], &self.rope, &what)?;
        moe.router_logits(&block.post_attention_input(&mid)?)
    }
}

fn needs_tied(cfg: &ModelConfig, part: &Part) -> Result<bool> {
    for &p in &part.exits {
        if cfg.exits[cfg.exit_index(p)?].head == HeadRef::TiedEmbedding {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The last row of every segment.
pub fn last_rows(x: &Tensor, segs: &[Seg]) -> Result<Tensor> {
    let mut idx = Vec::with_capacity(segs.len());
    let mut off = 0u32;
    for s in segs {
        off += s.len as u32;
        idx.push(off - 1);
    }
    if idx.len() == 1 {
        return Ok(x.narrow(0, idx[0] as usize, 1)?);
    }
    let idx = Tensor::from_vec(idx, segs.len(), x.device())?;
    Ok(x.index_select(&idx, 0)?)
}
