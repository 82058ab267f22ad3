//! Training reduces the loss, and save + resume continues bit-for-bit.

use candle_core::DType;
use flow_familial::config::Layout;
use flow_familial::init::{init_weights, preset_config, Preset};
use flow_familial::tasks::Task;
use flow_familial::train::{evaluate_task, Data, TrainOptions, Trainer};

mod common;
use common::max_diff;

fn opts() -> TrainOptions {
    TrainOptions {
        steps: 6,
        batch: 4,
        lr: 3e-3,
        warmup: 2,
        seed: 9,
        ..Default::default()
    }
}

#[test]
fn resume_is_exact() {
    let cfg = preset_config(Preset::Tiny, Layout::RuyiQwen2).unwrap();
    let w = init_weights(&cfg, 1).unwrap();
    let data = Data::Task(Task::Mix);
    let o = opts();

    let mut straight = Trainer::new(cfg.clone(), &w, o.clone()).unwrap();
    for s in 0..o.steps {
        straight
            .train_step(&data.batch(o.batch, o.seed, s))
            .unwrap();
    }

    let dir = tempfile::tempdir().unwrap();
    let mut first = Trainer::new(cfg, &w, o.clone()).unwrap();
    for s in 0..3 {
        first.train_step(&data.batch(o.batch, o.seed, s)).unwrap();
    }
    first
        .save(dir.path(), DType::F16, serde_json::json!({"task": "mix"}))
        .unwrap();
    drop(first);
    let (mut resumed, state) = Trainer::resume(dir.path(), None).unwrap();
    assert_eq!(state.step, 3);
    assert_eq!(resumed.step_count(), 3);
    assert_eq!(state.extra["task"], "mix");
    for s in 3..o.steps {
        resumed.train_step(&data.batch(o.batch, o.seed, s)).unwrap();
    }
    let a = straight.tensors().unwrap();
    let b = resumed.tensors().unwrap();
    for (n, t) in &a {
        let d = max_diff(t, &b[n]);
        assert_eq!(d, 0.0, "{n} differs by {d} after resume");
    }
    // The HF checkpoint written next to the state loads as a normal model.
    let m = flow_familial::FamilialModel::load(dir.path()).unwrap();
    assert_eq!(m.config().exit_points(), vec![1, 3, 5]);
}

#[test]
fn loss_goes_down_and_eval_reports_every_exit() {
    let cfg = preset_config(Preset::Tiny, Layout::RuyiQwen2).unwrap();
    let w = init_weights(&cfg, 2).unwrap();
    let o = TrainOptions {
        steps: 40,
        batch: 8,
        lr: 3e-3,
        warmup: 5,
        seed: 1,
        ..Default::default()
    };
    let data = Data::Task(Task::Add);
    let mut t = Trainer::new(cfg, &w, o.clone()).unwrap();
    let mut first = None;
    let mut last = 0.0;
    for s in 0..o.steps {
        let st = t.train_step(&data.batch(o.batch, o.seed, s)).unwrap();
        assert_eq!(st.exit_losses.len(), 3);
        first.get_or_insert(st.loss);
        last = st.loss;
    }
    let first = first.unwrap();
    assert!(last < 0.6 * first, "loss {first} -> {last}");
    let m = t.infer_model().unwrap();
    let rep = evaluate_task(&m, Task::Mix, 8, 0).unwrap();
    assert_eq!(rep.len(), 3);
    for r in &rep {
        assert_eq!(r.exits.len(), 3);
        assert!(r
            .exits
            .iter()
            .all(|e| e.loss.is_finite() && (0.0..=1.0).contains(&e.exact)));
    }
}

#[test]
fn greedy_matches_teacher_forced_argmax() {
    // Greedy decoding with the KV cache agrees with a full forward at every step.
    let cfg = preset_config(Preset::Tiny, Layout::RuyiQwen2).unwrap();
    let w = init_weights(&cfg, 4).unwrap();
    let t = Trainer::new(cfg, &w, TrainOptions::default()).unwrap();
    let m = t.infer_model().unwrap();
    let prompt = flow_familial::tasks::encode_prompt("12+34=");
    for p in m.config().exit_points() {
        let got =
            flow_familial::train::greedy_batch(&m, std::slice::from_ref(&prompt), p, 4).unwrap();
        let mut seq = prompt.clone();
        for &tok in &got[0] {
            let mut c = m.new_cache();
            let logits = m.forward_exit(&seq, p, &mut c).unwrap();
            let last = logits.get(seq.len() - 1).unwrap();
            let want = last.argmax(0).unwrap().to_scalar::<u32>().unwrap();
            assert_eq!(tok, want, "exit {p}");
            seq.push(tok);
        }
    }
}

#[test]
fn text_mode_trains_on_every_byte() {
    let text = "the quick brown fox jumps over the lazy dog. ".repeat(40);
    let corpus = flow_familial::tasks::TextCorpus::from_bytes(text.into_bytes(), 24).unwrap();
    let cfg = preset_config(Preset::Tiny, Layout::RuyiQwen2).unwrap();
    let w = init_weights(&cfg, 6).unwrap();
    let o = TrainOptions {
        steps: 15,
        batch: 4,
        lr: 3e-3,
        warmup: 2,
        ..Default::default()
    };
    let data = Data::Text(corpus.clone());
    let mut t = Trainer::new(cfg, &w, o.clone()).unwrap();
    let before =
        flow_familial::train::evaluate_loss(&t.infer_model().unwrap(), &corpus.eval_windows(4))
            .unwrap();
    for s in 0..o.steps {
        let b = data.batch(o.batch, o.seed, s);
        let st = t.train_step(&b).unwrap();
        assert_eq!(st.loss_tokens, 4 * 24, "loss on every byte of every window");
    }
    let after =
        flow_familial::train::evaluate_loss(&t.infer_model().unwrap(), &corpus.eval_windows(4))
            .unwrap();
    for (b, a) in before.iter().zip(&after) {
        assert!(a < b, "held-out text loss {before:?} -> {after:?}");
    }
}
