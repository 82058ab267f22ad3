//! Replays the committed inputs of the `openai_request` cargo-fuzz target (`fuzz/`,
//! docs/fuzzing.md) through the code it runs (`fuzz_harness/mod.rs`), on stable and without
//! a fuzzer, then mutates them with proptest (truncations, byte flips, values of every JSON
//! type under every key the API knows): no body may panic the request checks.

mod fuzz_harness;

use std::path::Path;

use proptest::prelude::*;
use serde_json::{json, Value};

fn seeds() -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz_corpus/openai_request");
    let mut v: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|e| {
            (
                e.file_name(),
                std::fs::read(e.path()).expect("readable seed"),
            )
        })
        .collect();
    v.sort();
    v.into_iter().map(|(_, b)| b).collect()
}

#[test]
fn openai_request_corpus() {
    let seeds = seeds();
    assert!(seeds.len() >= 10, "seed corpus missing");
    for s in &seeds {
        fuzz_harness::openai_request(s);
    }
}

const KEYS: &[&str] = &[
    "model",
    "messages",
    "prompt",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "n",
    "stop",
    "stop_token_ids",
    "stream",
    "stream_options",
    "logprobs",
    "top_logprobs",
    "echo",
    "suffix",
    "user",
    "aiflow",
    "response_format",
    "tools",
    "tool_choice",
    "logit_bias",
    "best_of",
    "presence_penalty",
];

fn value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| json!(f)),
        ".{0,8}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::btree_map("[a-z]{1,6}", inner, 0..3)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn mutated_seeds_never_panic(i in any::<prop::sample::Index>(), cut in any::<prop::sample::Index>(),
                                 flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4)) {
        let seeds = seeds();
        let mut b = seeds[i.index(seeds.len())].clone();
        for (at, byte) in flips {
            let n = b.len().max(1);
            if let Some(x) = b.get_mut(at.index(n)) {
                *x = byte;
            }
        }
        let keep = cut.index(b.len() + 1);
        b.truncate(keep);
        fuzz_harness::openai_request(&b);
    }

    #[test]
    fn any_value_under_any_key_never_panics(entries in prop::collection::vec((prop::sample::select(KEYS), value()), 0..6)) {
        let mut m = serde_json::Map::new();
        for (k, v) in entries {
            m.insert(k.to_string(), v);
        }
        fuzz_harness::openai_request(Value::Object(m).to_string().as_bytes());
    }
}
