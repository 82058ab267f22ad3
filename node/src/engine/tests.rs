//! The engine on a tiny random model: fast path, chunked prefill, exit catch-up.

use flow_familial::config::Layout;
use flow_familial::init::{init_checkpoint, Preset};
use std::time::Duration;

use crate::agent::wait_until;

use super::*;

fn engine(dir: &std::path::Path, budget: usize) -> EngineHandle {
    let model = FamilialModel::load(dir).unwrap();
    let stage = Stage {
        a: 0,
        b: 5,
        exit: true,
    };
    let cfg = EngineConfig {
        max_batch_tokens: budget,
        ..Default::default()
    };
    EngineHandle::spawn(model, stage, cfg).unwrap()
}

/// Decode steps on an idle engine run on the caller's thread and give the same logits
/// as steps through the queue; a truncate sent before a step is applied before it.
#[tokio::test(flavor = "current_thread")]
async fn inline_steps_match_queued_steps() {
    let dir = tempfile::tempdir().unwrap();
    init_checkpoint(Preset::Tiny, Layout::Qwen2, 3, dir.path()).unwrap();
    let stage = Stage {
        a: 0,
        b: 5,
        exit: true,
    };
    let spawn = |inline_max_rows| {
        let model = FamilialModel::load(dir.path()).unwrap();
        let cfg = EngineConfig {
            inline_max_rows,
            ..Default::default()
        };
        EngineHandle::spawn(model, stage, cfg).unwrap()
    };
    let (fast, queued) = (spawn(8), spawn(0));
    let prompt: Vec<u32> = (0..12).map(|i| 40 + i).collect();
    let mut got = Vec::new();
    for e in [&fast, &queued] {
        let mut logits = Vec::new();
        // The prompt (12 rows) is over the fast-path size: it goes through the queue.
        logits.push(e.step(step(1, 0, prompt.clone(), 1)).await.unwrap().logits);
        for (i, t) in [70u32, 71, 72, 73, 74, 75].into_iter().enumerate() {
            // Idle before each decode step (the engine thread may still be finishing
            // the previous answer), so the fast path is taken where it is on.
            assert!(wait_until(Duration::from_secs(30), || e.idle()).await);
            logits.push(e.step(step(1, 12 + i, vec![t], 1)).await.unwrap().logits);
        }
        // Roll back to 13 positions and decode position 13 again with another token.
        assert!(wait_until(Duration::from_secs(30), || e.idle()).await);
        e.truncate(1, 13).await;
        logits.push(e.step(step(1, 13, vec![90], 1)).await.unwrap().logits);
        got.push(logits);
    }
    for (x, y) in got[0].iter().zip(&got[1]) {
        let (x, y) = (x.as_ref().unwrap(), y.as_ref().unwrap());
        for (p, q) in x[0].iter().zip(&y[0]) {
            assert!((p - q).abs() < 1e-5, "{p} vs {q}");
        }
    }
    let (f, q) = (fast.stats().await, queued.stats().await);
    // The first decode step is queued (no small step measured yet); later ones run
    // inline unless the last small step took longer than INLINE_MAX_COMPUTE_US (a
    // tiny-model step on a very loaded machine: then it is measured again).
    assert!(f.inline_steps >= 1, "{f:?}");
    assert_eq!(f.queued_steps + f.inline_steps, 8, "{f:?}");
    assert_eq!((q.queued_steps, q.inline_steps), (8, 0), "{q:?}");
}

/// Steps that skip the exit block, then one that fills its KV from the skipped steps'
/// states (`exit_backfill`) and answers: the same logits as running the exit on every
/// step; without the backfill, the hole is a clear error.
#[tokio::test(flavor = "current_thread")]
async fn a_skipped_exit_catches_up_from_kept_states_exactly() {
    let dir = tempfile::tempdir().unwrap();
    init_checkpoint(Preset::Tiny, Layout::Qwen2, 3, dir.path()).unwrap();
    let e = engine(dir.path(), 4096);
    let prompt: Vec<u32> = (0..6).map(|i| 40 + i).collect();
    let toks = [70u32, 71, 72];
    // Eager: the exit runs on every step (session 1).
    e.step(step(1, 0, prompt.clone(), 0)).await.unwrap();
    for (i, &t) in toks.iter().enumerate() {
        e.step(step(1, 6 + i, vec![t], 0)).await.unwrap();
    }
    let eager = e.step(step(1, 9, vec![73], 1)).await.unwrap();
    // Lazy: the same steps without the exit (session 2), states kept.
    let skip = |start, tokens: Vec<u32>| StepJob {
        exit_kv: false,
        ..step(2, start, tokens, 0)
    };
    let mut kept = vec![e.step(skip(0, prompt.clone())).await.unwrap().hidden];
    for (i, &t) in toks.iter().enumerate() {
        kept.push(e.step(skip(6 + i, vec![t])).await.unwrap().hidden);
    }
    let hole = e.step(step(2, 9, vec![73], 1)).await.unwrap_err();
    assert!(
        hole.to_string().contains("backfill the missing positions"),
        "{hole}"
    );
    // (the failed step got through the trunk layers before the exit refused it)
    e.truncate(2, 9).await;
    let states = Tensor::cat(&kept, 0).unwrap();
    let lazy = e
        .step(StepJob {
            exit_backfill: Some((0, states)),
            ..step(2, 9, vec![73], 1)
        })
        .await
        .unwrap();
    let (a, b) = (&eager.logits.unwrap()[0], &lazy.logits.unwrap()[0]);
    let d = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(d < 1e-5, "max |Δlogit| {d}");
}

fn step(session: u64, start: usize, tokens: Vec<u32>, logit_rows: usize) -> StepJob {
    StepJob {
        session,
        start,
        input: Input::Tokens(tokens),
        backfill: None,
        logit_rows,
        exit_kv: true,
        exit_backfill: None,
        stage: None,
    }
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// A prompt longer than the token budget is split into chunks across iterations (while
/// another session decodes) and gives the same states and logits as one whole step.
#[tokio::test(flavor = "current_thread")]
async fn long_prefill_is_chunked_and_exact() {
    let dir = tempfile::tempdir().unwrap();
    init_checkpoint(Preset::Tiny, Layout::Qwen2, 3, dir.path()).unwrap();
    let prompt: Vec<u32> = (0..50).map(|i| 40 + (i * 7 % 60) as u32).collect();
    let whole = engine(dir.path(), 4096);
    let chunked = engine(dir.path(), 8);
    let a = whole.step(step(1, 0, prompt.clone(), 2)).await.unwrap();
    // Session 2 is decoding while session 1's prompt arrives.
    chunked.step(step(2, 0, vec![65, 66, 67], 1)).await.unwrap();
    let (b, d) = tokio::join!(
        chunked.step(step(1, 0, prompt.clone(), 2)),
        chunked.step(step(2, 3, vec![68], 1)),
    );
    let (b, d) = (b.unwrap(), d.unwrap());
    assert_eq!(d.logits.as_ref().map(Vec::len), Some(1));
    assert_eq!(b.hidden.dims(), a.hidden.dims());
    assert!(max_diff(&a.hidden, &b.hidden) < 1e-4);
    let (la, lb) = (a.logits.unwrap(), b.logits.unwrap());
    assert_eq!(lb.len(), 2);
    for (x, y) in la.iter().flatten().zip(lb.iter().flatten()) {
        assert!((x - y).abs() < 1e-3, "{x} vs {y}");
    }
    let s = chunked.stats().await;
    // 50 rows at <= 8 per iteration: at least 6 chunks leave rows for later.
    assert!(s.partial_chunks >= 6, "{s:?}");
    assert_eq!(whole.stats().await.partial_chunks, 0);
    // The next decode of session 1 continues from position 50 in both.
    let a2 = whole.step(step(1, 50, vec![70], 1)).await.unwrap();
    let b2 = chunked.step(step(1, 50, vec![70], 1)).await.unwrap();
    for (x, y) in a2.logits.unwrap()[0].iter().zip(&b2.logits.unwrap()[0]) {
        assert!((x - y).abs() < 1e-3);
    }
}
