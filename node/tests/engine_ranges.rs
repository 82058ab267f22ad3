//! The engine runs per-session sub-ranges of the layers it loaded (the split point moved
//! at run time): sessions with different ranges, stepped concurrently in one engine, each
//! give the logits a whole-family model gives at their exit; a session may also start
//! from a layer inside the loaded range (hidden states); ranges it has not loaded are
//! refused with a clear error.

use flow_familial::init::{init_checkpoint, Preset};
use flow_familial::weights::Checkpoint;
use flow_familial::{FamilialModel, Layout, Mode, ModelConfig, Part, Seg};
use flow_node::engine::{EngineHandle, Input, StepJob};
use flow_node::{EngineConfig, Stage};

const PROMPT: &[u32] = &[256, 49, 50, 43, 51, 52, 61];
const NEXT: &[u32] = &[70, 71, 72];

fn stage(a: usize, b: usize) -> Option<Stage> {
    Some(Stage { a, b, exit: true })
}

fn job(session: u64, start: usize, input: Input, st: Option<Stage>) -> StepJob {
    StepJob {
        session,
        start,
        input,
        backfill: None,
        logit_rows: 1,
        exit_kv: true,
        exit_backfill: None,
        stage: st,
    }
}

/// Last-row logits at exit `point` of the whole family after `tokens`.
fn reference(full: &FamilialModel, tokens: &[u32], point: usize) -> Vec<f32> {
    let mut cache = full.new_cache();
    let l: Vec<Vec<f32>> = full
        .forward_exit(tokens, point, &mut cache)
        .unwrap()
        .to_vec2()
        .unwrap();
    l.last().unwrap().clone()
}

fn close(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-3)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_with_different_cuts_share_an_engine_exactly() {
    let dir = tempfile::tempdir().unwrap();
    init_checkpoint(Preset::Tiny, Layout::RuyiQwen2, 21, dir.path()).unwrap();
    let cfg = ModelConfig::from_file(&dir.path().join("config.json")).unwrap();
    let ck = Checkpoint::open(dir.path()).unwrap();
    let full = FamilialModel::from_source(cfg.clone(), Part::full(&cfg), &ck, Mode::Infer).unwrap();
    // Loaded: layers 0..3 with the exits at 1 and 3 (split points 1 and 3).
    let part = Part {
        embed: true,
        trunk: 0..3,
        exits: vec![1, 3],
    };
    let model = FamilialModel::from_source(cfg.clone(), part, &ck, Mode::Infer).unwrap();
    let engine = EngineHandle::spawn(
        model,
        Stage {
            a: 0,
            b: 3,
            exit: true,
        },
        EngineConfig::default(),
    )
    .unwrap();

    // Hidden states after layer 1 for the prompt: what a child cut at 1 ships.
    let h1 = {
        let mut c = full.new_cache();
        let x = full.embed(PROMPT).unwrap();
        full.run_layers(&x, 0..1, &[Seg::new(0, PROMPT.len())], &mut [&mut c])
            .unwrap()
    };

    // Three sessions stepped concurrently: cut at 1, cut at 3 (the loaded default), and
    // one continuing from layer 1 to 3.
    let (a, b, c) = tokio::join!(
        engine.step(job(1, 0, Input::Tokens(PROMPT.to_vec()), stage(0, 1))),
        engine.step(job(2, 0, Input::Tokens(PROMPT.to_vec()), None)),
        engine.step(job(3, 0, Input::Hidden(h1), stage(1, 3))),
    );
    let last = |o: flow_node::engine::StepOut| o.logits.unwrap().pop().unwrap();
    assert!(close(&last(a.unwrap()), &reference(&full, PROMPT, 1)));
    assert!(close(&last(b.unwrap()), &reference(&full, PROMPT, 3)));
    assert!(close(&last(c.unwrap()), &reference(&full, PROMPT, 3)));

    // Decode steps keep each session's range; KV stays exact.
    let mut seq = PROMPT.to_vec();
    for &t in NEXT {
        let pos = seq.len();
        seq.push(t);
        let (a, b) = tokio::join!(
            engine.step(job(1, pos, Input::Tokens(vec![t]), stage(0, 1))),
            engine.step(job(2, pos, Input::Tokens(vec![t]), stage(0, 3))),
        );
        assert!(close(&last(a.unwrap()), &reference(&full, &seq, 1)));
        assert!(close(&last(b.unwrap()), &reference(&full, &seq, 3)));
    }
    // Session 1 holds KV only for the layers it ran: less than session 2.
    let all = engine.stats().await;
    assert_eq!(all.sessions, 3);
    engine.close(2).await;
    let without_2 = engine.stats().await.kv_bytes;
    engine.close(3).await;
    let only_1 = engine.stats().await.kv_bytes;
    assert!(
        only_1 > 0 && only_1 < all.kv_bytes - without_2,
        "session 1: {only_1} bytes, session 2: {}",
        all.kv_bytes - without_2
    );

    // Refusals name what was asked and what is loaded.
    let e = refused(
        &engine,
        job(9, 0, Input::Tokens(PROMPT.to_vec()), stage(0, 4)),
    )
    .await;
    assert!(
        e.contains("layers 0..4") && e.contains("hosts layers 0..3"),
        "{e}"
    );
    let e = refused(
        &engine,
        job(9, 0, Input::Tokens(PROMPT.to_vec()), stage(0, 2)),
    )
    .await;
    assert!(e.contains("exit at layer 2") && e.contains("[1, 3]"), "{e}");
    let e = refused(
        &engine,
        job(10, 0, Input::Tokens(PROMPT.to_vec()), stage(1, 3)),
    )
    .await;
    assert!(e.contains("needs hidden states"), "{e}");
}

async fn refused(e: &EngineHandle, j: StepJob) -> String {
    e.step(j).await.unwrap_err().to_string()
}
