//! Replays the committed inputs of the `openai_request`, `plan_file` and `calibration_file`
//! cargo-fuzz targets (`fuzz/`, docs/fuzzing.md) through the code they run
//! (`fuzz_harness/mod.rs`), on stable and without a fuzzer, then mutates the request bodies
//! with proptest (truncations, byte flips, values of every JSON type under every key the API
//! knows): no body may panic the request checks, no plan or calibration file the node.
//!
//! Regenerate the generated plan and calibration seeds with
//! `cargo test -p flow-node --test fuzz_corpus -- --ignored`.

mod fuzz_harness;

use std::path::Path;

/// A named way to break a valid seed.
type Breaker = (&'static str, fn(&mut Value));

use proptest::prelude::*;
use serde_json::{json, Value};

fn corpus(target: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz_corpus")
        .join(target)
}

/// The inputs of `target`'s corpus, sorted by name.
fn inputs(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = corpus(target);
    let mut v: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).expect("readable seed"),
            )
        })
        .collect();
    v.sort();
    v
}

fn seeds() -> Vec<Vec<u8>> {
    inputs("openai_request")
        .into_iter()
        .map(|(_, b)| b)
        .collect()
}

/// Runs `f` on every input of `target`, naming the one that panicked.
fn replay(target: &str, min: usize, f: impl Fn(&[u8])) {
    let all = inputs(target);
    assert!(all.len() >= min, "{target}: seed corpus missing");
    for (name, data) in &all {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(data)));
        assert!(r.is_ok(), "{target}/{name} panicked");
    }
}

#[test]
fn plan_file_corpus() {
    replay("plan_file", 8, fuzz_harness::plan_file);
}

#[test]
fn calibration_file_corpus() {
    replay("calibration_file", 8, fuzz_harness::calibration_file);
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

/// Writes the generated seeds of `plan_file` and `calibration_file` (deterministic):
/// planner inputs for the family the harness plans for (`models/small`), in both forms
/// `--plan` takes, calibration files derived from `models/small`'s, and one broken input
/// per check.
#[test]
#[ignore = "writes the committed seed corpus"]
fn write_seeds() {
    use flow_partition::planner::{ExitSpec, ModelShape, TierRole, TierSpec};
    use flow_partition::profile::{BlockCost, Linear, NodeProfile, ProfileKey};
    use flow_partition::{LinkEstimate, PlanInput, PlannerConfig};

    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let small = root.join("models/small");
    let write = |target: &str, name: &str, v: &Value| {
        let dir = corpus(target);
        std::fs::create_dir_all(&dir).unwrap();
        // Planner inputs compact (three profiles of 8 layers), calibration files as written.
        let text = if target == "plan_file" {
            serde_json::to_string(v)
        } else {
            serde_json::to_string_pretty(v)
        };
        std::fs::write(dir.join(name), text.unwrap()).unwrap();
    };

    // The calibration file of models/small, as committed, and variants.
    let cal: Value = serde_json::from_str(
        &std::fs::read_to_string(small.join("aiflow_calibration.json")).unwrap(),
    )
    .unwrap();
    write("calibration_file", "valid-small.json", &cal);
    let family = root.join("models/smollm2-family/aiflow_calibration.json");
    let fam: Value = serde_json::from_str(&std::fs::read_to_string(family).unwrap()).unwrap();
    write("calibration_file", "valid-other-family.json", &fam);
    let mut short = cal.clone();
    for e in short["exits"].as_array_mut().unwrap() {
        let c = e["curve"].as_array().unwrap();
        let keep: Vec<Value> = c.iter().step_by(8).cloned().collect();
        e["curve"] = Value::from(keep);
    }
    short.as_object_mut().unwrap().remove("cascade");
    short["bound"] = Value::Null;
    short["measure"] = json!("neg_entropy");
    write(
        "calibration_file",
        "valid-short-curves-teacher-forced.json",
        &short,
    );
    let mut never = short.clone();
    for e in never["exits"].as_array_mut().unwrap() {
        e["threshold"] = Value::Null;
    }
    never["measure"] = json!("margin");
    write("calibration_file", "valid-always-escalate.json", &never);
    let broken: [Breaker; 7] = [
        ("bad-format.json", |v| {
            v["format"] = json!("aiflow-calibration/0")
        }),
        ("bad-no-exits.json", |v| v["exits"] = json!([])),
        ("bad-unsorted-exits.json", |v| {
            v["exits"][0]["point"] = json!(4)
        }),
        ("bad-point-past-u32.json", |v| {
            v["exits"][2]["point"] = json!(1u64 << 32);
            v["exits"][3]["point"] = json!((1u64 << 32) + 1);
            v["deepest_exit"] = json!((1u64 << 32) + 1);
        }),
        ("bad-deepest-exit.json", |v| v["deepest_exit"] = json!(8)),
        ("bad-target.json", |v| v["target_agreement"] = json!(1.5)),
        ("bad-curve-agreement.json", |v| {
            v["exits"][1]["curve"][0]["agreement"] = json!(-0.25)
        }),
    ];
    for (name, f) in broken {
        let mut v = short.clone();
        f(&mut v);
        write("calibration_file", name, &v);
    }

    // Planner inputs for the 8 layers of models/small (exit depths 1, 3, 5, 8).
    let curves: Vec<Value> = cal["exits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let c = e["curve"].as_array().unwrap();
            Value::from(c.iter().step_by(4).cloned().collect::<Vec<_>>())
        })
        .collect();
    let depths = [1usize, 3, 5, 8];
    let cost = |ms: f64| BlockCost {
        prefill: Linear { a: 0.1, b: ms },
        decode: Linear { a: ms, b: 1e-4 },
        weight_bytes: 1 << 20,
        kv_bytes_per_token: 1024,
    };
    let tier = |role, ms: f64, mem: u64| TierSpec {
        role,
        profile: NodeProfile::uniform(
            ProfileKey {
                model_fingerprint: "967952f88083f5e7".into(),
                cpu: "seed".into(),
            },
            8,
            cost(ms),
            &depths,
            cost(ms),
            cost(ms),
        ),
        memory_limit_bytes: mem,
        load_factor: 1.0,
        compute_power_w: 2.0,
        radio_power_w: 1.0,
    };
    let exits: Vec<ExitSpec> = depths
        .iter()
        .zip(&curves)
        .map(|(&depth, c)| ExitSpec {
            depth,
            curve: if depth == 8 {
                vec![]
            } else {
                serde_json::from_value(c.clone()).unwrap()
            },
        })
        .collect();
    let three = PlanInput {
        model: ModelShape {
            num_layers: 8,
            hidden_size: 128,
            token_id_bytes: 4,
            exits,
        },
        tiers: vec![
            tier(TierRole::Device, 4.0, 6 << 20),
            tier(TierRole::Edge, 1.0, 1 << 30),
            tier(TierRole::Cloud, 0.25, 1 << 34),
        ],
        links: vec![
            LinkEstimate::fixed(20.0, 10e6),
            LinkEstimate::fixed(40.0, 100e6),
        ],
        config: PlannerConfig::default(),
    };
    let three_v = serde_json::to_value(&three).unwrap();
    write("plan_file", "valid-three-tier.json", &three_v);
    write(
        "plan_file",
        "valid-report-form.json",
        &json!({ "input": three_v, "adaptive": { "summary": "seed" } }),
    );
    let mut two = three.clone();
    two.tiers.remove(0);
    two.links.remove(0);
    write(
        "plan_file",
        "valid-edge-cloud.json",
        &serde_json::to_value(&two).unwrap(),
    );
    let mut lossy = serde_json::to_value(&three).unwrap();
    lossy["config"]["allow_lossy"] = json!(true);
    lossy["config"]["encodings"] = json!([
        { "encoding": "int8", "agreement_loss": 0.01, "zstd_ratio": 0.5 },
        { "encoding": "f16", "agreement_loss": 0.0, "zstd_ratio": null },
        { "encoding": "f32", "agreement_loss": 0.0, "zstd_ratio": 0.9 }
    ]);
    lossy["config"]["allowed_cuts"] = json!([[1, 3], [5, 8]]);
    lossy["config"]["backfill"] = json!("critical_path");
    lossy["config"]["host_fallback_exits"] = json!(true);
    write("plan_file", "valid-lossy-pinned-cuts.json", &lossy);
    let broken: [Breaker; 6] = [
        ("bad-no-layers.json", |v| {
            v["model"]["num_layers"] = json!(0)
        }),
        ("bad-links.json", |v| {
            v["links"].as_array_mut().unwrap().pop();
        }),
        ("bad-load-factor.json", |v| {
            v["tiers"][1]["load_factor"] = json!(-1.0)
        }),
        ("bad-cut-past-end.json", |v| {
            v["config"]["allowed_cuts"] = json!([[9]])
        }),
        ("bad-exit-order.json", |v| {
            v["model"]["exits"][1]["depth"] = json!(1)
        }),
        ("bad-report-without-adaptive.json", |v| {
            *v = json!({ "input": v.clone() })
        }),
    ];
    for (name, f) in broken {
        let mut v = three_v.clone();
        f(&mut v);
        write("plan_file", name, &v);
    }
}
