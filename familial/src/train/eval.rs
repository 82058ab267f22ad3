//! Losses over exits, batch packing, greedy decoding and per-exit evaluation (the parts
//! of training that only read a model).

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::kv::SeqCache;
use crate::layers::Seg;
use crate::model::{FamilialModel, Rows};
use crate::tasks::{Example, Sequence, Task};
use crate::tokenizer::BYTE_EOS;

/// Summed next-token negative log-likelihood at every exit (shallowest first) over the
/// loss positions of `batch`, sharing one trunk pass. Works in both modes; in
/// [`Mode::Train`](crate::layers::Mode::Train) the sums are differentiable.
pub fn exit_nll_sums(model: &FamilialModel, batch: &[Sequence]) -> Result<Vec<Tensor>> {
    exit_nll_sums_at(model, batch, &model.config().exit_points())
}

/// [`exit_nll_sums`] for the exit points `points` only (ascending): the trunk runs up to the
/// last of them, so a model part hosting only those exits (e.g. a device member being
/// fine-tuned) is enough.
pub fn exit_nll_sums_at(
    model: &FamilialModel,
    batch: &[Sequence],
    points: &[usize],
) -> Result<Vec<Tensor>> {
    if points.windows(2).any(|w| w[0] >= w[1]) {
        return Err(Error::Invalid(format!(
            "exit points {points:?} must be strictly ascending"
        )));
    }
    let Packed {
        inputs,
        rows,
        targets,
        segs,
    } = pack(batch)?;
    if rows.is_empty() {
        return points
            .iter()
            .map(|_| Ok(Tensor::zeros((), DType::F32, &Device::Cpu)?))
            .collect();
    }
    let rows = Tensor::from_vec(rows.clone(), rows.len(), &Device::Cpu)?;
    let targets = Tensor::from_vec(targets.clone(), (targets.len(), 1), &Device::Cpu)?;
    let mut caches: Vec<SeqCache> = batch.iter().map(|_| model.new_cache()).collect();
    let mut refs: Vec<&mut SeqCache> = caches.iter_mut().collect();
    let mut h = model.embed(&inputs)?;
    let mut at = 0;
    let mut out = Vec::with_capacity(points.len());
    for &p in points {
        h = model.run_layers(&h, at..p, &segs, &mut refs)?;
        at = p;
        let b = model.exit_block(&h, p, &segs, &mut refs)?;
        let logits = model.exit_head(&b.index_select(&rows, 0)?, p)?;
        out.push(nll_sum(&logits, &targets)?);
    }
    Ok(out)
}

/// A batch of sequences laid out for one forward: inputs concatenated (each sequence
/// without its last token), one segment per sequence, and the loss rows with their next
/// tokens (positions predicting `tokens[loss_from..]`).
pub(crate) struct Packed {
    pub inputs: Vec<u32>,
    pub rows: Vec<u32>,
    pub targets: Vec<u32>,
    pub segs: Vec<Seg>,
}

/// Lay out `batch` (see [`Packed`]); every sequence needs 2 tokens or more.
pub(crate) fn pack(batch: &[Sequence]) -> Result<Packed> {
    let mut p = Packed {
        inputs: Vec::new(),
        rows: Vec::new(),
        targets: Vec::new(),
        segs: Vec::with_capacity(batch.len()),
    };
    let mut off = 0usize;
    for s in batch {
        if s.tokens.len() < 2 {
            return Err(Error::Invalid(
                "a training sequence needs 2 tokens or more".into(),
            ));
        }
        let n = s.tokens.len() - 1;
        p.inputs.extend_from_slice(&s.tokens[..n]);
        for i in 0..n {
            if i + 1 >= s.loss_from {
                p.rows.push((off + i) as u32);
                p.targets.push(s.tokens[i + 1]);
            }
        }
        p.segs.push(Seg::new(0, n));
        off += n;
    }
    Ok(p)
}

/// `-Σ log softmax(logits)[target]` over rows; `targets` is `[rows, 1]` u32. Built from
/// primitive ops only, so it has a backward pass.
pub fn nll_sum(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let max = logits.max_keepdim(1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(1)?.log()?;
    let logp = shifted.broadcast_sub(&lse)?;
    Ok(logp.gather(targets, 1)?.sum_all()?.neg()?)
}

/// Score of one exit on a set of examples.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ExitScore {
    /// Exit point.
    pub point: usize,
    /// Fraction of examples whose greedy answer (up to `<|eos|>`) is exactly right.
    pub exact: f64,
    /// Mean cross-entropy per answer token (teacher forced, `<|eos|>` included).
    pub loss: f64,
}

/// Per-exit scores of one concrete task.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TaskReport {
    pub task: String,
    pub examples: usize,
    pub exits: Vec<ExitScore>,
}

/// Greedy decoding at exit `point` for several prompts at once (each with its own KV
/// cache): up to `max_new` tokens each, cut after the first `<|eos|>` (which is kept).
pub fn greedy_batch(
    model: &FamilialModel,
    prompts: &[Vec<u32>],
    point: usize,
    max_new: usize,
) -> Result<Vec<Vec<u32>>> {
    if prompts.is_empty() || max_new == 0 {
        return Ok(vec![Vec::new(); prompts.len()]);
    }
    let eos: Vec<u32> = if model.config().eos_token_ids.is_empty() {
        vec![BYTE_EOS]
    } else {
        model.config().eos_token_ids.clone()
    };
    let mut caches: Vec<SeqCache> = prompts.iter().map(|_| model.new_cache()).collect();
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); prompts.len()];
    let mut done = vec![false; prompts.len()];
    let mut segs: Vec<Seg> = prompts.iter().map(|p| Seg::new(0, p.len())).collect();
    let mut input: Vec<u32> = prompts.concat();
    for _ in 0..max_new {
        let mut refs: Vec<&mut SeqCache> = caches.iter_mut().collect();
        let h = model.embed(&input)?;
        let h = model.run_layers(&h, 0..point, &segs, &mut refs)?;
        let logits = model.exit(&h, point, &segs, &mut refs, Rows::Last)?;
        let next: Vec<u32> = logits.argmax(1)?.to_vec1()?;
        for (i, &t) in next.iter().enumerate() {
            if !done[i] {
                out[i].push(t);
                done[i] = eos.contains(&t);
            }
        }
        if done.iter().all(|d| *d) {
            break;
        }
        segs = segs.iter().map(|s| Seg::new(s.start + s.len, 1)).collect();
        input = next;
    }
    Ok(out)
}

/// Greedy answer of one prompt at exit `point`, `<|eos|>` not included.
pub fn greedy_answer(
    model: &FamilialModel,
    prompt: &[u32],
    point: usize,
    max_new: usize,
) -> Result<Vec<u32>> {
    let mut v = greedy_batch(model, &[prompt.to_vec()], point, max_new)?.remove(0);
    if v.last()
        .is_some_and(|t| model.config().eos_token_ids.contains(t) || *t == BYTE_EOS)
    {
        v.pop();
    }
    Ok(v)
}

/// Per-exit exact-match accuracy (greedy decoding) and answer loss on `examples`.
pub fn evaluate_examples(model: &FamilialModel, examples: &[Example]) -> Result<Vec<ExitScore>> {
    let points = model.config().exit_points();
    if examples.is_empty() {
        return Ok(points
            .iter()
            .map(|&point| ExitScore {
                point,
                exact: 0.0,
                loss: 0.0,
            })
            .collect());
    }
    const CHUNK: usize = 32;
    let mut correct = vec![0usize; points.len()];
    let mut nll = vec![0f64; points.len()];
    let mut count = 0usize;
    for ex in examples.chunks(CHUNK) {
        let seqs: Vec<Sequence> = ex.iter().map(Sequence::from).collect();
        count += seqs.iter().map(Sequence::loss_positions).sum::<usize>();
        for (i, s) in exit_nll_sums(model, &seqs)?.iter().enumerate() {
            nll[i] += f64::from(s.to_scalar::<f32>()?);
        }
        let prompts: Vec<Vec<u32>> = ex.iter().map(|e| e.prompt.clone()).collect();
        let max_new = ex.iter().map(|e| e.answer.len() + 1).max().unwrap_or(1);
        for (i, &p) in points.iter().enumerate() {
            let got = greedy_batch(model, &prompts, p, max_new)?;
            correct[i] += got
                .iter()
                .zip(ex)
                .filter(|(g, e)| **g == e.target())
                .count();
        }
    }
    Ok(points
        .iter()
        .enumerate()
        .map(|(i, &point)| ExitScore {
            point,
            exact: correct[i] as f64 / examples.len() as f64,
            loss: nll[i] / count.max(1) as f64,
        })
        .collect())
}

/// Per-exit mean cross-entropy over the loss positions of `seqs` (text evaluation).
pub fn evaluate_loss(model: &FamilialModel, seqs: &[Sequence]) -> Result<Vec<f64>> {
    let n = model.config().exits.len();
    let mut nll = vec![0f64; n];
    let mut count = 0usize;
    for ch in seqs.chunks(16) {
        count += ch.iter().map(Sequence::loss_positions).sum::<usize>();
        for (i, s) in exit_nll_sums(model, ch)?.iter().enumerate() {
            nll[i] += f64::from(s.to_scalar::<f32>()?);
        }
    }
    Ok(nll.iter().map(|s| s / count.max(1) as f64).collect())
}

/// Evaluate every component task of `task` on its held-out set (`n` examples each, eval
/// split `split`).
pub fn evaluate_task(
    model: &FamilialModel,
    task: Task,
    n: usize,
    split: u64,
) -> Result<Vec<TaskReport>> {
    task.components()
        .into_iter()
        .map(|t| {
            let ex = crate::tasks::eval_set(t, n, split);
            Ok(TaskReport {
                task: t.name().to_string(),
                examples: ex.len(),
                exits: evaluate_examples(model, &ex)?,
            })
        })
        .collect()
}
