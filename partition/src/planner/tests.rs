use super::*;
use crate::calibrate::CurvePoint;
use crate::error::Error;
use crate::link::LinkEstimate;
use crate::profile::{BlockCost, Linear, NodeProfile, ProfileKey, WireEncoding};
use proptest::prelude::*;

const MB: u64 = 1_000_000;

fn pt(threshold: f64, agreement: f64, escalation: f64) -> CurvePoint {
    CurvePoint {
        threshold,
        agreement,
        escalation,
    }
}

fn model() -> ModelShape {
    ModelShape {
        num_layers: 12,
        hidden_size: 1024,
        token_id_bytes: 4,
        exits: vec![
            ExitSpec {
                depth: 4,
                curve: vec![
                    pt(0.9, 0.995, 0.75),
                    pt(0.7, 0.985, 0.55),
                    pt(0.5, 0.97, 0.4),
                    pt(0.0, 0.85, 0.0),
                ],
            },
            ExitSpec {
                depth: 8,
                curve: vec![
                    pt(0.9, 0.998, 0.45),
                    pt(0.7, 0.99, 0.3),
                    pt(0.5, 0.975, 0.15),
                    pt(0.0, 0.93, 0.0),
                ],
            },
            ExitSpec {
                depth: 12,
                curve: vec![],
            },
        ],
    }
}

/// A node whose layer decode costs `layer_ms` (plus a little per context token).
fn profile(name: &str, layer_ms: f64) -> NodeProfile {
    let layer = BlockCost {
        prefill: Linear {
            a: 0.1 * layer_ms,
            b: 0.2 * layer_ms,
        },
        decode: Linear {
            a: layer_ms,
            b: layer_ms * 1e-4,
        },
        weight_bytes: 20 * MB,
        kv_bytes_per_token: 8 * 1024,
    };
    let exit = BlockCost {
        weight_bytes: 60 * MB,
        ..layer
    };
    let overhead = BlockCost {
        prefill: Linear::constant(0.2 * layer_ms),
        decode: Linear::constant(0.2 * layer_ms),
        weight_bytes: 60 * MB,
        kv_bytes_per_token: 0,
    };
    NodeProfile::uniform(
        ProfileKey {
            model_fingerprint: "test-family".into(),
            cpu: name.into(),
        },
        12,
        layer,
        &[4, 8, 12],
        exit,
        overhead,
    )
}

fn tier(role: TierRole, layer_ms: f64, mem: u64) -> TierSpec {
    TierSpec {
        role,
        profile: profile(role.name(), layer_ms),
        memory_limit_bytes: mem,
        load_factor: 1.0,
        compute_power_w: 3.0,
        radio_power_w: 1.0,
    }
}

pub(crate) fn input(de_bps: f64, device_layer_ms: f64) -> PlanInput {
    PlanInput {
        model: model(),
        tiers: vec![
            // Room for 8 layers and one exit head, not the whole model.
            tier(TierRole::Device, device_layer_ms, 320 * MB),
            tier(TierRole::Edge, 1.0, 8_000 * MB),
            tier(TierRole::Cloud, 0.25, 80_000 * MB),
        ],
        links: vec![
            LinkEstimate::fixed(20.0, de_bps),
            LinkEstimate::fixed(40.0, 100e6),
        ],
        config: PlannerConfig::default(),
    }
}

fn device_split(p: &Plan) -> usize {
    p.tiers[0].layer_end
}

fn check_memory(p: &Plan) {
    for t in &p.tiers {
        assert!(
            t.memory_bytes <= t.memory_limit_bytes,
            "{} over memory: {}",
            t.role.name(),
            p.explain()
        );
    }
}

#[test]
fn plans_the_reference_setup() {
    let inp = input(10e6, 4.0);
    let p = plan(&inp).unwrap();
    check_memory(&p);
    assert!(p.predicted_agreement >= 0.97);
    assert!(p.predicted_latency_ms > 0.0);
    let text = p.explain();
    for needle in [
        "device",
        "edge",
        "cloud",
        "link device->edge",
        "rejected alternatives",
    ] {
        assert!(text.contains(needle), "missing {needle}:\n{text}");
    }
    assert_eq!(p.alternatives.len(), inp.config.alternatives);
    // A faster plan below the accuracy target is named as such.
    assert!(
        p.alternatives
            .iter()
            .any(|a| matches!(a.verdict, Verdict::BelowAccuracy { .. })),
        "{text}"
    );
    // Breakdown adds up.
    let sum: f64 = p
        .tiers
        .iter()
        .map(|t| t.expected_ms + t.prefill_ms)
        .chain(p.links.iter().map(|l| l.expected_ms + l.prefill_ms))
        .sum();
    assert!((sum - p.predicted_latency_ms).abs() < 1e-9);
}

/// As device-edge goodput falls, the device keeps more layers (deeper exit, fewer
/// escalations) for as long as shipping hidden states pays; below the break-even point
/// the plan hands token ids to the edge instead (split 0) and stays there. Shipping ids
/// costs 4 bytes per token against a 4 KB hidden row per token plus the prompt's rows, so
/// on a slow enough link no contiguous split beats it.
#[test]
fn device_split_moves_toward_device_as_bandwidth_falls() {
    let mut seen = Vec::new();
    let mut bps = 1e9;
    while bps > 0.2e6 {
        let p = plan(&input(bps, 2.0)).unwrap();
        check_memory(&p);
        seen.push((bps, device_split(&p)));
        bps /= 1.25;
    }
    let hidden: Vec<usize> = seen
        .iter()
        .map(|&(_, s)| s)
        .take_while(|&s| s > 0)
        .collect();
    assert!(
        hidden.windows(2).all(|w| w[0] <= w[1]),
        "split moved toward the cloud while shipping hidden states: {seen:?}"
    );
    assert!(
        hidden.first() < hidden.last(),
        "the split never moved: {seen:?}"
    );
    assert!(
        seen[hidden.len()..].iter().all(|&(_, s)| s == 0),
        "after handing off token ids the split came back: {seen:?}"
    );
    // A 5 Mbit/s uplink keeps 8 layers on the device, a fast one 4.
    assert_eq!(device_split(&plan(&input(5e6, 2.0)).unwrap()), 8);
    assert_eq!(device_split(&plan(&input(1e9, 2.0)).unwrap()), 4);
}

#[test]
fn device_split_moves_toward_cloud_as_device_slows() {
    let mut last = usize::MAX;
    let mut seen = Vec::new();
    let mut ms = 0.25;
    while ms < 200.0 {
        let p = plan(&input(10e6, ms)).unwrap();
        let s = device_split(&p);
        seen.push((ms, s));
        assert!(
            s <= last,
            "split moved toward the device: {seen:?}\n{}",
            p.explain()
        );
        last = s;
        ms *= 1.5;
    }
    assert!(seen.first().unwrap().1 > seen.last().unwrap().1, "{seen:?}");
}

#[test]
fn memory_limits_are_respected() {
    // Room for the embedding, two layers and one exit head only.
    let mut inp = input(0.5e6, 1.0);
    inp.tiers[0].memory_limit_bytes = 60 * MB + 5 * 20 * MB + 60 * MB + 10 * MB;
    let p = plan(&inp).unwrap();
    check_memory(&p);
    assert!(device_split(&p) <= 4, "{}", p.explain());
    let text = p.explain();
    assert!(text.contains("over memory on device"), "{text}");
}

#[test]
fn infeasible_memory_is_a_typed_error_naming_the_tier() {
    let mut inp = input(10e6, 1.0);
    for t in &mut inp.tiers {
        t.memory_limit_bytes = 100 * MB;
    }
    match plan(&inp) {
        Err(Error::DoesNotFit { detail }) => {
            assert!(
                detail.contains("needs") && detail.contains("limit"),
                "{detail}"
            );
        }
        other => panic!("expected DoesNotFit, got {other:?}"),
    }
    // A single tier that cannot hold the model.
    let inp = PlanInput {
        tiers: vec![tier(TierRole::Device, 1.0, 250 * MB)],
        links: vec![],
        ..input(10e6, 1.0)
    };
    let e = plan(&inp).unwrap_err();
    assert!(e.to_string().contains("device needs"), "{e}");
    // Device-only falls back to the deepest exit that fits.
    let d = device_only(&inp).unwrap();
    assert_eq!(d.tiers[0].answers_with, Some(4));
    check_memory(&d);
}

#[test]
fn deterministic_output() {
    let inp = input(3e6, 2.0);
    let a = plan(&inp).unwrap();
    let b = plan(&inp.clone()).unwrap();
    assert_eq!(a, b);
    assert_eq!(a.explain(), b.explain());
    let json = serde_json::to_string(&a).unwrap();
    let back: Plan = serde_json::from_str(&json).unwrap();
    assert_eq!(back.explain(), a.explain());
    let json_in = serde_json::to_string(&inp).unwrap();
    let inp2: PlanInput = serde_json::from_str(&json_in).unwrap();
    assert_eq!(plan(&inp2).unwrap(), a);
}

#[test]
fn special_plans() {
    let inp = input(10e6, 4.0);
    let adaptive = plan(&inp).unwrap();
    let cloud = cloud_only(&inp).unwrap();
    let device = device_only(&inp).unwrap();
    let stat = best_static_split(&inp).unwrap();
    assert!(!cloud.tiers[0].is_active() && !cloud.tiers[1].is_active());
    assert_eq!(cloud.links[0].payload, Payload::TokenIds);
    assert_eq!(cloud.predicted_agreement, 1.0);
    assert!(device.tiers[0].answers_with.is_some());
    assert!(device.links.iter().all(|l| l.payload == Payload::Unused));
    assert!(stat.tiers.iter().all(|t| t.decision.is_none()));
    assert_eq!(stat.predicted_agreement, 1.0);
    assert!(adaptive.score <= stat.score + 1e-9);
    assert!(adaptive.score <= cloud.score + 1e-9);
    for p in [&cloud, &device, &stat] {
        check_memory(p);
        assert!(!p.explain().is_empty());
    }
}

#[test]
fn lossy_encodings_only_when_allowed() {
    let mut inp = input(1e6, 1.0);
    inp.config.encodings = vec![
        EncodingChoice {
            encoding: WireEncoding::Int8,
            agreement_loss: 0.001,
            zstd_ratio: None,
        },
        EncodingChoice {
            encoding: WireEncoding::F16,
            agreement_loss: 0.0,
            zstd_ratio: Some(0.9),
        },
    ];
    let strict = plan(&inp).unwrap();
    let hidden_encodings = |p: &Plan| -> Vec<WireEncoding> {
        p.links
            .iter()
            .filter_map(|l| match l.payload {
                Payload::Hidden { encoding, .. } => Some(encoding),
                _ => None,
            })
            .collect()
    };
    assert!(hidden_encodings(&strict).iter().all(|e| !e.is_lossy()));
    inp.config.allow_lossy = true;
    let lossy = plan(&inp).unwrap();
    assert!(lossy.score <= strict.score);
    assert!(
        hidden_encodings(&lossy).iter().any(|e| e.is_lossy()),
        "{}",
        lossy.explain()
    );
    assert!(lossy.predicted_agreement >= inp.config.accuracy_target);
    // A loss that breaks the target is never chosen.
    inp.config.encodings[0].agreement_loss = 0.5;
    inp.config.encodings[1].agreement_loss = 0.5;
    let p = plan(&inp).unwrap();
    assert!(hidden_encodings(&p).iter().all(|e| !e.is_lossy()));
}

#[test]
fn invalid_numbers_are_rejected() {
    let mut inp = input(10e6, 1.0);
    inp.tiers[1].load_factor = f64::NAN;
    let e = plan(&inp).unwrap_err();
    assert!(e.to_string().contains("tiers[1].load_factor"), "{e}");
    let mut inp = input(10e6, 1.0);
    inp.links[0].goodput_bps = 0.0;
    assert!(plan(&inp).is_err());
    let mut inp = input(10e6, 1.0);
    inp.model.exits[0].curve[0].agreement = 1.5;
    assert!(plan(&inp).is_err());
    let mut inp = input(10e6, 1.0);
    inp.tiers[0].profile.layers[3].decode.a = -1.0;
    assert!(plan(&inp).is_err());
    let mut inp = input(10e6, 1.0);
    inp.links.pop();
    assert!(plan(&inp).is_err());
}

#[test]
fn objective_weights_shift_the_plan() {
    let mut inp = input(100e6, 1.0);
    let base = plan(&inp).unwrap();
    inp.config.objective.device_energy_ms_per_joule = 1e6;
    let frugal = plan(&inp).unwrap();
    assert!(frugal.device_energy_j <= base.device_energy_j);
    inp.config.objective = Objective {
        device_energy_ms_per_joule: 0.0,
        cloud_cost_ms_per_compute_ms: 1e3,
    };
    let cheap = plan(&inp).unwrap();
    assert!(cheap.cloud_compute_ms <= base.cloud_compute_ms);
}

#[test]
fn reevaluate_reproduces_and_repredicts() {
    let inp = input(5e6, 2.0);
    let p = plan(&inp).unwrap();
    let (same, verdict) = reevaluate(&inp, &p).unwrap();
    assert_eq!(verdict, None);
    assert_eq!(same.predicted_latency_ms, p.predicted_latency_ms);
    assert_eq!(same.tiers, p.tiers);
    let slow = input(0.5e6, 2.0);
    let (worse, _) = reevaluate(&slow, &p).unwrap();
    assert!(worse.predicted_latency_ms > p.predicted_latency_ms);
    assert_eq!(worse.placement(), p.placement());
    let two_tiers = PlanInput {
        tiers: slow.tiers[..2].to_vec(),
        links: slow.links[..1].to_vec(),
        ..slow
    };
    assert!(reevaluate(&two_tiers, &p).is_err());
}

#[test]
fn critical_path_backfill_costs_more() {
    let mut inp = input(10e6, 4.0);
    let bg = plan(&inp).unwrap();
    inp.config.backfill = BackfillMode::CriticalPath;
    let cp = plan(&inp).unwrap();
    assert!(cp.predicted_latency_ms >= bg.predicted_latency_ms);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    #[test]
    fn random_inputs_give_sound_deterministic_plans(
        de in 0.2e6f64..1e9,
        ec in 1e6f64..1e10,
        rtt in 0.0f64..200.0,
        dev_ms in 0.1f64..50.0,
        load in 1.0f64..4.0,
        dev_mem in 0u64..400,
    ) {
        let mut inp = input(de, dev_ms);
        inp.links[1] = LinkEstimate::fixed(rtt, ec);
        inp.tiers[1].load_factor = load;
        inp.tiers[0].memory_limit_bytes = dev_mem * MB;
        let a = plan(&inp).unwrap();
        prop_assert_eq!(&a, &plan(&inp).unwrap());
        for t in &a.tiers {
            prop_assert!(t.memory_bytes <= t.memory_limit_bytes);
        }
        prop_assert!(a.predicted_agreement >= inp.config.accuracy_target - 1e-12);
        prop_assert!(a.predicted_latency_ms.is_finite() && a.predicted_latency_ms > 0.0);
    }
}

#[test]
#[ignore]
fn print_sweeps() {
    for prompt in [16u32, 128] {
        for dev in [1.0, 2.0, 3.0] {
            for bps in [1e9, 100e6, 30e6, 10e6, 5e6, 2e6, 1e6, 0.3e6] {
                let mut inp = input(bps, dev);
                inp.config.workload.prompt_tokens = prompt;
                let p = plan(&inp).unwrap();
                println!(
                    "prompt {prompt} dev {dev} bps {bps:e}: {:.2} ms {}",
                    p.predicted_latency_ms,
                    p.summary()
                );
            }
        }
    }
}

/// Ruyi-sized search (28 layers, 5 exits with 16 curve points each, 4 encodings):
/// `cargo test -p flow-partition ruyi_sized -- --ignored --nocapture` prints the time.
#[test]
#[ignore]
fn ruyi_sized_search_time() {
    let depths = [11usize, 15, 19, 23, 28];
    let exits = depths
        .iter()
        .map(|&d| ExitSpec {
            depth: d,
            curve: if d == 28 {
                vec![]
            } else {
                (0..16)
                    .map(|k| {
                        let t = 1.0 - k as f64 / 16.0;
                        pt(t, 1.0 - 0.01 * k as f64 * (28 - d) as f64 / 17.0, t * 0.8)
                    })
                    .collect()
            },
        })
        .collect();
    let mut inp = input(10e6, 1.0);
    inp.model = ModelShape {
        num_layers: 28,
        hidden_size: 3584,
        token_id_bytes: 4,
        exits,
    };
    for t in &mut inp.tiers {
        let mut p = profile(t.role.name(), 1.0);
        p.layers = vec![p.layers[0]; 28];
        p.exits = depths
            .iter()
            .map(|&depth| crate::profile::ExitCost {
                depth,
                cost: p.exits[0].cost,
            })
            .collect();
        t.profile = p;
        t.memory_limit_bytes = 100_000 * MB;
    }
    inp.config.allow_lossy = true;
    inp.config.encodings = WireEncoding::ALL
        .iter()
        .map(|&encoding| EncodingChoice {
            encoding,
            agreement_loss: if encoding.is_lossy() { 0.001 } else { 0.0 },
            zstd_ratio: None,
        })
        .collect();
    let start = std::time::Instant::now();
    let p = plan(&inp).unwrap();
    println!("{:?} for {}", start.elapsed(), p.summary());
}

#[test]
fn config_fields_default_when_missing() {
    let c: PlannerConfig = serde_json::from_str(r#"{"accuracy_target": 0.95}"#).unwrap();
    assert_eq!(c.accuracy_target, 0.95);
    assert_eq!(c.workload, Workload::default());
}

#[test]
fn allowed_cuts_pin_the_split_and_keep_the_decisions_free() {
    let mut inp = input(5e6, 2.0);
    inp.config.allowed_cuts = vec![vec![4], vec![8]];
    let p = plan(&inp).unwrap();
    assert_eq!(
        p.placement(),
        vec![(0, 4), (4, 8), (8, 12)],
        "{}",
        p.explain()
    );
    // A slow uplink keeps more tokens on the device within the same placement.
    let mut slow = inp.clone();
    slow.links[0] = LinkEstimate::fixed(400.0, 0.5e6);
    let q = plan(&slow).unwrap();
    assert_eq!(q.placement(), p.placement());
    assert!(
        q.tiers[1].reach <= p.tiers[1].reach,
        "{}\n{}",
        p.explain(),
        q.explain()
    );
    // Out-of-range cuts and too many entries are refused with the field named.
    let mut bad = inp.clone();
    bad.config.allowed_cuts = vec![vec![13]];
    assert!(plan(&bad)
        .unwrap_err()
        .to_string()
        .contains("allowed_cuts[0]"));
    bad.config.allowed_cuts = vec![vec![], vec![], vec![]];
    assert!(plan(&bad).unwrap_err().to_string().contains("allowed_cuts"));
}

/// The prompt's rows ride on the first escalation past a link, whose round trip is one of
/// the per-token RTTs: the prefill adds their serialisation only, no extra half RTT. On a
/// cloud-only plan (every token crosses) that is the whole prompt's token ids once per
/// request, amortised over the generated tokens.
#[test]
fn prompt_upload_adds_serialisation_not_another_round_trip() {
    let inp = input(10e6, 4.0);
    let p = cloud_only(&inp).unwrap();
    let w = inp.config.workload;
    let (prompt, gen) = (f64::from(w.prompt_tokens), f64::from(w.gen_tokens));
    for (j, l) in p.links.iter().enumerate() {
        assert_eq!(l.reach, 1.0);
        let ids = prompt * inp.model.token_id_bytes as f64;
        let want = inp.links[j].serialisation_ms(ids) / gen;
        assert!(
            (l.prefill_ms - want).abs() < 1e-9,
            "link {j}: {} vs {want}\n{}",
            l.prefill_ms,
            p.explain()
        );
        // One round trip and one row each way per token, nothing else.
        let per_token = inp.links[j].rtt_ms
            + inp.links[j].serialisation_ms(
                inp.model.token_id_bytes as f64 + inp.config.return_bytes_per_token as f64,
            );
        assert!((l.expected_ms - per_token).abs() < 1e-9);
    }
}

/// An upper tier prefills the prompt (and the link carries its rows) only in requests that
/// reach it. With `CriticalPath` backfill that is the first escalation of the request,
/// `1 − (1 − reach)^G` of the requests for independent tokens; with `Background`
/// streaming only a first token that escalates itself waits, `reach` of them.
#[test]
fn prefill_is_charged_to_the_requests_that_reach_the_tier() {
    let mut bg = input(10e6, 4.0);
    bg.config.allowed_cuts = vec![vec![4], vec![8]];
    bg.config.workload.gen_tokens = 6;
    let p = plan(&bg).unwrap();
    let rho = p.links[0].reach;
    assert!(rho > 0.0 && rho < 1.0, "{}", p.explain());
    let gen = 6.0;
    let row = inp_row_bytes(&bg);
    let upload =
        bg.links[0].serialisation_ms(f64::from(bg.config.workload.prompt_tokens) * row) / gen;
    assert!((p.links[0].prefill_ms - rho * upload).abs() < 1e-9);

    let mut cp = bg.clone();
    cp.config.backfill = BackfillMode::CriticalPath;
    let (q, _) = reevaluate(&cp, &p).unwrap();
    let share = 1.0 - (1.0 - rho).powf(gen);
    assert!((q.links[0].prefill_ms - share * upload).abs() < 1e-9);
    // The edge's prefill scales the same way; the device always prefills its own prompt.
    let edge_bg = p.tiers[1].prefill_ms;
    assert!(edge_bg > 0.0);
    assert!((q.tiers[1].prefill_ms / edge_bg - share / rho).abs() < 1e-9);
    assert!((q.tiers[0].prefill_ms - p.tiers[0].prefill_ms).abs() < 1e-12);
    // More tokens per request: more requests reach the edge, but each pays it over more
    // tokens.
    let mut long = cp.clone();
    long.config.workload.gen_tokens = 60;
    let (l, _) = reevaluate(&long, &p).unwrap();
    let share_long = 1.0 - (1.0 - rho).powf(60.0);
    assert!(share_long > share);
    let upload_long =
        long.links[0].serialisation_ms(f64::from(long.config.workload.prompt_tokens) * row) / 60.0;
    assert!((l.links[0].prefill_ms - share_long * upload_long).abs() < 1e-9);
}

fn inp_row_bytes(inp: &PlanInput) -> f64 {
    crate::profile::activation_bytes(inp.model.hidden_size, WireEncoding::F32, 1, None)
}

/// A family of `l` layers with an exit every 4 layers, each with a curve of `points`
/// points, on the three reference tiers with every encoding allowed.
fn big_input(l: usize, points: usize) -> PlanInput {
    let depths: Vec<usize> = (1..=l / 4).map(|k| 4 * k).collect();
    let curve: Vec<CurvePoint> = (0..points)
        .map(|k| {
            let t = 1.0 - k as f64 / points as f64;
            pt(t, 0.9 + 0.1 * t, t)
        })
        .collect();
    let mut inp = input(10e6, 4.0);
    inp.model.num_layers = l;
    inp.model.exits = depths
        .iter()
        .map(|&depth| ExitSpec {
            depth,
            curve: if depth == l { vec![] } else { curve.clone() },
        })
        .collect();
    for t in &mut inp.tiers {
        let p = &t.profile;
        t.profile = NodeProfile::uniform(
            p.key.clone(),
            l,
            p.layers[0],
            &depths,
            p.exits[0].cost,
            p.overhead,
        );
    }
    inp.config.allow_lossy = true;
    inp.config.encodings = WireEncoding::ALL
        .iter()
        .map(|&encoding| EncodingChoice {
            encoding,
            ..EncodingChoice::F32
        })
        .collect();
    inp
}

#[test]
fn a_large_family_plans_within_the_search_limit() {
    // 64 layers, 16 exits with 24-point curves (calibrate's default), three tiers and
    // every encoding: searched, not refused.
    let inp = big_input(64, 24);
    let t = std::time::Instant::now();
    let p = plan(&inp).unwrap();
    eprintln!("64 layers, 24 points: planned in {:?}", t.elapsed());
    assert!(p.predicted_latency_ms > 0.0);
}

#[test]
fn an_input_past_the_search_limits_is_refused_naming_why() {
    // Curves of 4096 points: too many candidates (the node would search for minutes).
    let e = plan(&big_input(16, 4096)).unwrap_err();
    match &e {
        Error::InvalidInput { field, reason } => {
            assert_eq!(field, "model.exits");
            assert!(reason.contains("curve points"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    // Many tiers over many layers: too many splits.
    let mut inp = big_input(64, 2);
    for _ in 0..6 {
        inp.tiers.push(inp.tiers[2].clone());
        inp.links.push(inp.links[1]);
    }
    let e = inp.validate().unwrap_err().to_string();
    assert!(e.contains("splits") && e.contains("`tiers`"), "{e}");
    assert_eq!(super::input::split_count(64, 9), 11_969_016_345);
    assert_eq!(super::input::split_count(128, 4), 366_145);
    assert_eq!(super::input::split_count(7, 1), 1);
    assert_eq!(super::input::split_count(usize::MAX, 64), u64::MAX);
}
