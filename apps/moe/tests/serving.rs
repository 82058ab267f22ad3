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
