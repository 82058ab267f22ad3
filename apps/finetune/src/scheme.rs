//! Sparse update schemes: which slices of a member are trained.
//!
//! A scheme is plain configuration ([`Scheme`], parsed from names like `channels:1:0.25`);
//! [`Scheme::plan`] turns it into [`ParamSpec`]s over the tensor names of the member(s) being
//! fine-tuned. Every sparse scheme trains the exit heads (norm + LM head of every target
//! exit), as tiny-training always updates the classifier; the rest of the plan is what
//! distinguishes the schemes. A head tied to the token embedding (llama/SmolLM2:
//! `tie_word_embeddings`) is the whole vocabulary matrix, trained only by `full`: a sparse
//! scheme trains the exit's norm there, not a fifth of the model. "Blocks" are the decoder blocks on a member's path, shallowest
//! first: trunk layers `[0, e)` then the exit's own block; "the last `n` blocks" counts back
//! from the exit block.

use std::fmt;
use std::str::FromStr;

use flow_familial::config::{ExitBlock, HeadRef, NormRef};
use flow_familial::init::block_tensor_names;
use flow_familial::{FamilialModel, ModelConfig, Part};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A sparse (or full) update scheme.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Scheme {
    /// Norm and LM head of every target exit.
    ExitHeads,
    /// Exit heads + biases and norm weights of the last `last` blocks (norms only on
    /// architectures without biases, llama).
    BiasNorm { last: usize },
    /// Exit heads + every tensor of the last `last` blocks (classic last-k fine-tuning).
    Blocks { last: usize },
    /// Exit heads + biases/norms of the last `last` blocks + a `ratio` of the output
    /// channels (rows) of every weight matrix there, the rows of largest L2 norm.
    Channels { last: usize, ratio: f64 },
    /// Exit heads + rank-`rank` LoRA adapters on every projection of the last `last` blocks.
    Lora { last: usize, rank: usize },
    /// Exit heads + a `ratio` of the output channels (rows of largest L2 norm) of the FFN
    /// output projection (`down_proj`) of the last `last` blocks (tiny-training: the later
    /// layers matter most). With `last` 1 the backward pass stops at that projection's
    /// input: nothing else in the block needs a gradient, so its activations are not kept.
    FfnOut { last: usize, ratio: f64 },
    /// Every tensor of the member (the baseline).
    Full,
}

impl Scheme {
    /// The schemes `--scheme auto` considers for a member of `blocks` blocks, cheapest first.
    pub fn candidates(blocks: usize) -> Vec<Scheme> {
        let mut v = vec![Scheme::ExitHeads, Scheme::BiasNorm { last: blocks }];
        for last in [1, 2].into_iter().filter(|l| *l <= blocks) {
            for ratio in [0.25, 0.5] {
                v.push(Scheme::Channels { last, ratio });
            }
        }
        v.push(Scheme::FfnOut {
            last: 1,
            ratio: 1.0,
        });
        v.push(Scheme::Lora { last: 1, rank: 8 });
        v.push(Scheme::Full);
        v
    }

    /// The schemes `--scheme auto` considers for a deep pretrained member of `blocks`
    /// blocks (SmolLM2: 30), cheapest first: norms of every block, the last blocks whole,
    /// LoRA and channel slices of the last blocks, full.
    pub fn candidates_pretrained(blocks: usize) -> Vec<Scheme> {
        let k = |n: usize| n.min(blocks).max(1);
        vec![
            Scheme::BiasNorm { last: blocks },
            Scheme::Channels {
                last: k(2),
                ratio: 0.25,
            },
            Scheme::Lora {
                last: k(4),
                rank: 8,
            },
            Scheme::Blocks { last: k(1) },
            Scheme::Blocks { last: k(2) },
            Scheme::Full,
        ]
    }

    fn check(&self) -> Result<()> {
        match *self {
            Scheme::BiasNorm { last }
            | Scheme::Blocks { last }
            | Scheme::Lora { last, .. }
            | Scheme::Channels { last, .. }
            | Scheme::FfnOut { last, .. }
                if last == 0 =>
            {
                Err(Error::invalid(
                    "scheme",
                    format!("`{self}`: needs at least 1 block"),
                ))
            }
            Scheme::Channels { ratio, .. } | Scheme::FfnOut { ratio, .. }
                if !(ratio > 0.0 && ratio <= 1.0) =>
            {
                Err(Error::invalid(
                    "scheme",
                    format!("`{self}`: ratio must be in (0, 1]"),
                ))
            }
            Scheme::Lora { rank: 0, .. } => Err(Error::invalid(
                "scheme",
                format!("`{self}`: rank must be >= 1"),
            )),
            _ => Ok(()),
        }
    }

    /// The trainable slices of the member(s) ending at exit `points` of `cfg`.
    pub fn plan(&self, cfg: &ModelConfig, points: &[usize]) -> Result<Vec<ParamSpec>> {
        self.check()?;
        let part = member_part(cfg, points)?;
        let mut specs: Vec<ParamSpec> = Vec::new();
        let mut add = |name: String, kind: SliceKind| {
            if !specs.iter().any(|s| s.name == name) {
                specs.push(ParamSpec { name, kind });
            }
        };
        if *self == Scheme::Full {
            for n in FamilialModel::tensor_names(cfg, &part)? {
                add(n, SliceKind::Full);
            }
            return Ok(specs);
        }
        for &p in points {
            let spec = cfg.exits[cfg.exit_index(p)?];
            add(norm_name(spec.norm), SliceKind::Full);
            if spec.head != HeadRef::TiedEmbedding {
                add(head_name(spec.head), SliceKind::Full);
            }
        }
        let last = match *self {
            Scheme::BiasNorm { last }
            | Scheme::Blocks { last }
            | Scheme::Channels { last, .. }
            | Scheme::Lora { last, .. }
            | Scheme::FfnOut { last, .. } => last,
            _ => 0,
        };
        for &p in points {
            let blocks = member_blocks(cfg, p)?;
            for (prefix, ffn) in blocks.iter().rev().take(last) {
                for n in block_tensor_names(prefix, cfg, ffn) {
                    let small = n.ends_with(".bias") || n.contains("norm");
                    match (self, small) {
                        (Scheme::Blocks { .. }, _) => add(n, SliceKind::Full),
                        (Scheme::BiasNorm { .. } | Scheme::Channels { .. }, true) => {
                            add(n, SliceKind::Full)
                        }
                        (Scheme::Channels { ratio, .. }, false) => add(n, SliceKind::Rows(*ratio)),
                        (Scheme::Lora { rank, .. }, false) => add(n, SliceKind::Lora(*rank)),
                        (Scheme::FfnOut { ratio, .. }, false)
                            if n.ends_with("down_proj.weight") =>
                        {
                            if *ratio >= 1.0 {
                                add(n, SliceKind::Full)
                            } else {
                                add(n, SliceKind::Rows(*ratio))
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
        Ok(specs)
    }
}

impl fmt::Display for Scheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scheme::ExitHeads => f.write_str("exit-heads"),
            Scheme::BiasNorm { last } => write!(f, "bias-norm:{last}"),
            Scheme::Blocks { last } => write!(f, "blocks:{last}"),
            Scheme::Channels { last, ratio } => write!(f, "channels:{last}:{ratio}"),
            Scheme::Lora { last, rank } => write!(f, "lora:{last}:{rank}"),
            Scheme::FfnOut { last, ratio } => write!(f, "ffn-out:{last}:{ratio}"),
            Scheme::Full => f.write_str("full"),
        }
    }
}

impl FromStr for Scheme {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let parts: Vec<&str> = s.split(':').collect();
        let num = |i: usize| -> Result<usize> {
            parts
                .get(i)
                .and_then(|x| x.parse().ok())
                .ok_or_else(|| Error::invalid("scheme", format!("`{s}`: field {i} is not a count")))
        };
        let bad = || {
            Error::invalid(
                "scheme",
                format!(
                    "`{s}` (use exit-heads, bias-norm:N, blocks:N, channels:N:RATIO, ffn-out:N:RATIO, lora:N:RANK or full)"
                ),
            )
        };
        let scheme = match (parts[0], parts.len()) {
            ("exit-heads", 1) => Scheme::ExitHeads,
            ("full", 1) => Scheme::Full,
            ("bias-norm", 2) => Scheme::BiasNorm { last: num(1)? },
            ("blocks", 2) => Scheme::Blocks { last: num(1)? },
            ("lora", 3) => Scheme::Lora {
                last: num(1)?,
                rank: num(2)?,
            },
            ("channels", 3) => Scheme::Channels {
                last: num(1)?,
                ratio: parts[2].parse().map_err(|_| bad())?,
            },
            ("ffn-out", 3) => Scheme::FfnOut {
                last: num(1)?,
                ratio: parts[2].parse().map_err(|_| bad())?,
            },
            _ => return Err(bad()),
        };
        scheme.check()?;
        Ok(scheme)
    }
}

/// How a tensor is trained.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SliceKind {
    /// The whole tensor is one variable.
    Full,
    /// This fraction of the rows (output channels), by L2 norm; the other rows stay frozen.
    Rows(f64),
    /// A LoRA adapter of this rank; the tensor itself stays frozen.
    Lora(usize),
}

/// One trainable slice of the plan.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamSpec {
    pub name: String,
    pub kind: SliceKind,
}

/// The part of the family the member(s) ending at `points` need: embedding, trunk up to the
/// deepest of them, and their exits.
pub fn member_part(cfg: &ModelConfig, points: &[usize]) -> Result<Part> {
    let max = points
        .iter()
        .copied()
        .max()
        .ok_or_else(|| Error::invalid("exits", "no exit to fine-tune"))?;
    for &p in points {
        cfg.exit_index(p)?;
    }
    Ok(Part {
        embed: true,
        trunk: 0..max,
        exits: points.to_vec(),
    })
}

/// The blocks (tensor prefix, FFN) on exit `point`'s path, shallowest first.
pub fn member_blocks(
    cfg: &ModelConfig,
    point: usize,
) -> Result<Vec<(String, flow_familial::config::Ffn)>> {
    let spec = cfg.exits[cfg.exit_index(point)?];
    let mut v: Vec<_> = (0..point)
        .map(|l| (format!("model.layers.{l}"), cfg.ffn[l].clone()))
        .collect();
    match spec.block {
        ExitBlock::Own(i) => v.push((format!("model.eelayers.{i}"), cfg.exit_block_ffn[i].clone())),
        ExitBlock::Trunk(l) => v.push((format!("model.layers.{l}"), cfg.ffn[l].clone())),
    }
    Ok(v)
}

/// Tensor name of an exit norm.
pub fn norm_name(n: NormRef) -> String {
    match n {
        NormRef::Own(i) => format!("model.norms.{i}.weight"),
        NormRef::Final => "model.norm.weight".into(),
    }
}

/// Tensor name of an exit head.
pub fn head_name(h: HeadRef) -> String {
    match h {
        HeadRef::Own(i) => format!("lm_head.{i}.weight"),
        HeadRef::Shared => "lm_head.weight".into(),
        HeadRef::TiedEmbedding => "model.embed_tokens.weight".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flow_familial::config::Layout;
    use flow_familial::init::{preset_config, Preset};

    #[test]
    fn names_round_trip_and_bad_names_are_refused() {
        for s in [
            "exit-heads",
            "bias-norm:2",
            "blocks:3",
            "channels:1:0.25",
            "ffn-out:1:0.5",
            "ffn-out:1:1",
            "lora:1:8",
            "full",
        ] {
            let sc: Scheme = s.parse().unwrap();
            assert_eq!(sc.to_string(), s);
        }
        for s in [
            "",
            "channels:1",
            "channels:1:1.5",
            "lora:0:8",
            "bias-norm:x",
            "nope",
        ] {
            assert!(s.parse::<Scheme>().is_err(), "{s}");
        }
    }

    /// On a tied llama (SmolLM2's shape) sparse schemes leave the tied embedding alone,
    /// `blocks:N` takes every tensor of the last N blocks, `bias-norm` only norms.
    #[test]
    fn tied_llama_plans_leave_the_embedding_to_full() {
        let mut cfg = preset_config(Preset::Tiny, Layout::Llama).unwrap();
        cfg.tie_word_embeddings = true;
        let last = cfg.num_layers - 1;
        cfg.declare_exits(&[last]).unwrap();
        for s in Scheme::candidates_pretrained(cfg.num_layers) {
            let plan = s.plan(&cfg, &[last]).unwrap();
            let embed = plan.iter().any(|p| p.name == "model.embed_tokens.weight");
            assert_eq!(embed, s == Scheme::Full, "{s}");
        }
        let b = Scheme::Blocks { last: 2 }.plan(&cfg, &[last]).unwrap();
        assert!(b.iter().all(|p| p.kind == SliceKind::Full));
        let l = |i| format!("model.layers.{i}.");
        assert!(b.iter().any(|p| p.name.starts_with(&l(last - 1))));
        assert!(!b.iter().any(|p| p.name.starts_with(&l(last - 2))));
        let bn = Scheme::BiasNorm { last: 3 }.plan(&cfg, &[last]).unwrap();
        assert!(bn.iter().all(|p| p.name.contains("norm")), "{bn:?}");
        assert_eq!(bn.len(), 1 + 2 * 3);
    }

    #[test]
    fn plans_pick_the_documented_slices() {
        let cfg = preset_config(Preset::Tiny, Layout::RuyiQwen2).unwrap();
        let p = cfg.exit_points()[0];
        let heads = Scheme::ExitHeads.plan(&cfg, &[p]).unwrap();
        assert_eq!(heads.len(), 2);
        let bn = Scheme::BiasNorm { last: 1 }.plan(&cfg, &[p]).unwrap();
        assert!(bn.len() > 2);
        assert!(bn
            .iter()
            .all(|s| s.kind == SliceKind::Full && !s.name.contains("_proj.weight")));
        let ch = Scheme::Channels {
            last: 1,
            ratio: 0.5,
        }
        .plan(&cfg, &[p])
        .unwrap();
        assert!(ch.iter().any(|s| s.kind == SliceKind::Rows(0.5)));
        let fo = Scheme::FfnOut {
            last: 1,
            ratio: 1.0,
        }
        .plan(&cfg, &[p])
        .unwrap();
        assert_eq!(fo.len(), 3);
        assert!(fo[2].name.ends_with("mlp.down_proj.weight") && fo[2].kind == SliceKind::Full);
        let full = Scheme::Full.plan(&cfg, &[p]).unwrap();
        let part = member_part(&cfg, &[p]).unwrap();
        assert_eq!(
            full.len(),
            FamilialModel::tensor_names(&cfg, &part).unwrap().len()
        );
    }
}
