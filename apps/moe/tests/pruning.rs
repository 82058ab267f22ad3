//! Expert pruning and retrieval on a seeded `moe-small` family (qwen2_moe layout).

use flow_familial::config::Layout;
use flow_familial::init::{init_checkpoint, Preset};
use flow_familial::tasks::{eval_set, Task};
use flow_familial::train::greedy_batch;
use flow_familial::FamilialModel;
use flow_moe::experts::PrunedModel;
use flow_moe::profile::{profile, signature};
use flow_moe::store::{save_pattern, PatternStore};
use flow_moe::Error;

fn logits(model: &FamilialModel, tokens: &[u32]) -> Vec<Vec<f32>> {
    let point = *model.config().exit_points().last().unwrap();
    let mut cache = model.new_cache();
    model
        .forward_exit(tokens, point, &mut cache)
        .unwrap()
        .to_vec2()
        .unwrap()
}

#[test]
fn profile_retrieve_and_prune() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = init_checkpoint(Preset::MoeSmall, Layout::Qwen2Moe, 3, dir.path()).unwrap();
    let full = FamilialModel::load(dir.path()).unwrap();
    let store_dir = dir.path().join("patterns");
    for t in Task::CONCRETE {
        let ex = eval_set(t, 12, 1);
        let seqs: Vec<Vec<u32>> = ex.iter().map(|e| e.tokens()).collect();
        let prompts: Vec<Vec<u32>> = ex.iter().map(|e| e.prompt.clone()).collect();
        let p = profile(&full, t.name(), &seqs, &prompts).unwrap();
        assert_eq!(p.layers.len(), 4);
        for l in &p.layers {
            assert!((l.scores.iter().sum::<f32>() - 1.0).abs() < 1e-4);
            assert!(l.scores[l.ranking[0]] >= l.scores[l.ranking[7]]);
        }
        save_pattern(&store_dir, &p).unwrap();
    }
    let store = PatternStore::open(&store_dir).unwrap();

    // Retrieval on held-out prompts (another eval split): well above chance (1/3).
    let (mut right, mut total) = (0, 0);
    for t in Task::CONCRETE {
        for ex in eval_set(t, 20, 2) {
            let sig = signature(&full, &ex.prompt).unwrap();
            right += usize::from(store.retrieve(&sig).unwrap().task == t.name());
            total += 1;
        }
    }
    let acc = right as f64 / total as f64;
    eprintln!("retrieval accuracy on held-out prompts: {right}/{total} = {acc:.3}");
    assert!(acc >= 0.8, "retrieval accuracy {acc}");

    // k = all experts: exactly the unpruned model.
    let add = store.get("add").unwrap().clone();
    let mut pruned = PrunedModel::open(dir.path(), cfg.clone(), usize::MAX).unwrap();
    let all = pruned.all_expert_bytes().unwrap();
    assert_eq!(pruned.prepare(&add, 8).unwrap(), all);
    let prompts: Vec<Vec<u32>> = eval_set(Task::Add, 6, 3)
        .into_iter()
        .map(|e| e.prompt)
        .collect();
    for p in &prompts {
        assert_eq!(logits(pruned.model(), p), logits(&full, p));
    }
    assert_eq!(
        greedy_batch(pruned.model(), &prompts, 7, 6).unwrap(),
        greedy_batch(&full, &prompts, 7, 6).unwrap()
    );

    // Half the experts: half the memory, and the output differs from the unpruned one.
    assert_eq!(pruned.prepare(&add, 4).unwrap(), all / 2);
    assert_ne!(
        logits(pruned.model(), &prompts[0]),
        logits(&full, &prompts[0])
    );

    // A budget for 2 experts per layer: switching tasks evicts; a pattern that cannot fit
    // is refused with a budget error.
    let per_layer = all / 4 / 8; // bytes of one expert
    let mut small = PrunedModel::open(dir.path(), cfg, 4 * 2 * per_layer).unwrap();
    small.prepare(&add, 2).unwrap();
    assert_eq!(small.stats().resident, 8);
    let rev = store.get("reverse").unwrap();
    small.prepare(rev, 2).unwrap();
    let s = small.stats();
    assert!(s.resident_bytes <= 4 * 2 * per_layer, "{s:?}");
    let moved: usize = add
        .layers
        .iter()
        .zip(&rev.layers)
        .map(|(a, r)| r.top(2).iter().filter(|j| !a.top(2).contains(j)).count())
        .sum();
    assert_eq!(s.evictions as usize, moved, "{s:?}");
    assert_eq!(s.loads as usize, 8 + moved);
    assert!(matches!(small.prepare(rev, 3), Err(Error::Budget { .. })));
    assert!(small.prepare(rev, 0).is_err());
}

/// The committed, trained `models/moe-small`: retrieval of held-out prompts of each task.
#[test]
fn retrieval_on_the_trained_family() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/moe-small");
    let model = FamilialModel::load(&dir).unwrap();
    let store_dir = tempfile::tempdir().unwrap();
    for t in Task::CONCRETE {
        let ex = eval_set(t, 24, 1);
        let seqs: Vec<Vec<u32>> = ex.iter().map(|e| e.tokens()).collect();
        let prompts: Vec<Vec<u32>> = ex.iter().map(|e| e.prompt.clone()).collect();
        save_pattern(
            store_dir.path(),
            &profile(&model, t.name(), &seqs, &prompts).unwrap(),
        )
        .unwrap();
    }
    let store = PatternStore::open(store_dir.path()).unwrap();
    let mut total = 0.0;
    for t in Task::CONCRETE {
        let held_out = eval_set(t, 30, 0);
        let right = held_out
            .iter()
            .filter(|e| {
                let sig = signature(&model, &e.prompt).unwrap();
                store.retrieve(&sig).unwrap().task == t.name()
            })
            .count();
        let acc = right as f64 / held_out.len() as f64;
        eprintln!("trained moe-small, task {t}: retrieval {right}/30 = {acc:.3}");
        // Chance is 1/3 (measured: add 1.00, lookup 0.93, reverse 1.00).
        assert!(acc >= 0.7, "task {t}: retrieval accuracy {acc}");
        total += acc / 3.0;
    }
    assert!(total >= 0.85, "mean retrieval accuracy {total}");
}
