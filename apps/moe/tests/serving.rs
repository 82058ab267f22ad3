//! The serving loop with chunked prefill computes the same tokens as prefill-first
//! batching and as plain greedy decoding (chunking changes when work runs, not what).

use flow_familial::config::Layout;
use flow_familial::init::{init_checkpoint, Preset};
use flow_familial::tasks::{eval_set, Task};
use flow_familial::train::greedy_batch;
use flow_familial::FamilialModel;
use flow_moe::scheduler::{Policy, SchedulerConfig};
use flow_moe::serve::{replay, ReplayRequest};

#[test]
fn chunked_replay_matches_prefill_first_and_greedy() {
    let dir = tempfile::tempdir().unwrap();
    init_checkpoint(Preset::Tiny, Layout::Qwen2, 5, dir.path()).unwrap();
    let model = FamilialModel::load(dir.path()).unwrap();
    let point = *model.config().exit_points().last().unwrap();
    let mut reqs: Vec<ReplayRequest> = eval_set(Task::Lookup, 6, 0)
        .into_iter()
        .enumerate()
        .map(|(i, e)| ReplayRequest {
            arrival_ms: (i as u64) * 3,
            prompt: e.prompt,
            max_new: 5,
        })
        .collect();
    // One long prompt, chunked over several iterations.
    reqs[2].prompt = reqs
        .iter()
        .flat_map(|r| r.prompt.clone())
        .take(90)
        .collect();
    let cfg = |policy, budget| SchedulerConfig {
        token_budget: budget,
        kv_capacity: 4096,
        policy,
        time_limit: None,
    };
    let chunked = replay(&model, point, cfg(Policy::Chunked, 16), &reqs).unwrap();
    let first = replay(&model, point, cfg(Policy::PrefillFirst, 512), &reqs).unwrap();
    assert!(chunked.max_batch_tokens <= 16);
    assert!(first.max_batch_tokens >= 90);
    let prompts: Vec<Vec<u32>> = reqs.iter().map(|r| r.prompt.clone()).collect();
    // greedy_batch stops at <|eos|>; compare up to its length.
    let greedy = greedy_batch(&model, &prompts, point, 5).unwrap();
    for (i, g) in greedy.iter().enumerate() {
        assert_eq!(
            chunked.requests[i].output, first.requests[i].output,
            "request {i}"
        );
        assert_eq!(
            &chunked.requests[i].output[..g.len()],
            &g[..],
            "request {i}"
        );
        assert_eq!(chunked.requests[i].tokens.len(), 5);
    }
    assert_eq!(chunked.stats.finished, 6);
    assert_eq!(chunked.stats.stalled_iterations, 0);
}

#[test]
fn iteration_cost_is_measured_on_the_model_and_gives_a_budget() {
    use flow_moe::scheduler::attended_pairs;
    use flow_moe::serve::measure_iteration_cost;
    let dir = tempfile::tempdir().unwrap();
    init_checkpoint(Preset::Tiny, Layout::Qwen2, 5, dir.path()).unwrap();
    let model = FamilialModel::load(dir.path()).unwrap();
    let point = *model.config().exit_points().last().unwrap();
    let sizes = [1, 64, 256, 512];
    let contexts = [0, 256];
    // Timings on a tiny model are noisy on a shared 2-core machine: the fit may refuse a
    // run whose slope comes out negative ("measure larger iterations"); measure again.
    let (cost, samples) = (0..4)
        .find_map(|_| measure_iteration_cost(&model, point, &contexts, &sizes, 5).ok())
        .expect("a measurement whose cost grows with its tokens within 4 runs");
    assert_eq!(samples.len(), 8);
    assert_eq!(
        samples.iter().map(|s| s.tokens).collect::<Vec<_>>(),
        [sizes, sizes].concat()
    );
    assert_eq!(samples[5].attended, attended_pairs(256, 64));
    assert!(samples.iter().all(|s| s.seconds > 0.0), "{samples:?}");
    // A 512-token chunk is real work next to a single token on any machine.
    assert!(samples[7].seconds > samples[4].seconds, "{samples:?}");
    assert!(cost.per_token_s > 0.0 && cost.per_attended_s >= 0.0);
    // The budget for the predicted time of a 200-token chunk after 256 tokens is 200 (up
    // to rounding).
    let b = cost
        .budget_for(cost.seconds(200, attended_pairs(256, 200)), 256)
        .unwrap();
    assert!((199..=200).contains(&b), "{b} {cost:?}");
    // Chunks that do not fit the positions are refused, not truncated.
    assert!(measure_iteration_cost(&model, point, &[1000], &[64], 1).is_err());
    assert!(measure_iteration_cost(&model, point, &[0], &[0, 8], 1).is_err());
}
