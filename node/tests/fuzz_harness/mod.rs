//! What the `openai_request`, `plan_file` and `calibration_file` cargo-fuzz targets run
//! (`fuzz/fuzz_targets/`), shared with `tests/fuzz_corpus.rs`, which replays the committed
//! inputs on stable.

use flow_node::http::params;

/// Any bytes as a `/v1/chat/completions` and a `/v1/completions` body: parsed or refused
/// with a 4xx that says something, never a panic.
pub fn openai_request(data: &[u8]) {
    let results = [
        params::chat(data).map(|r| (r.params, r.messages.len())),
        params::completion(data).map(|r| (r.params, r.prompts.len())),
    ];
    for r in results {
        match r {
            Ok((p, items)) => {
                assert!(items >= 1, "an accepted request has something to answer");
                assert!(p.n >= 1 && p.n as usize <= params::MAX_CHOICES);
                assert!(p.stop.len() <= params::MAX_STOPS);
                assert!((0.0..=2.0).contains(&p.temperature));
            }
            Err(e) => {
                assert!(e.status.is_client_error(), "{e:?}");
                assert!(!e.message.is_empty());
            }
        }
    }
}

/// The family the plan and calibration targets plan for: `models/small` (Ruyi layout, 8
/// layers, exits at 1, 3, 5 and 7).
fn family() -> flow_familial::ModelConfig {
    flow_familial::ModelConfig::from_json_str(include_str!("../../../models/small/config.json"))
        .expect("models/small/config.json is a valid config")
}

/// What a node does with an accepted planner input (`flow_node::agent`'s planner, without
/// the agent): the first link replaced by a live estimate, the initial plan, what it
/// applies, then a re-plan on a much worse uplink. Every step may refuse the input with an
/// error; none may panic, and an applied plan's thresholds name exits of the family.
fn run_planning(input: flow_partition::PlanInput) {
    use flow_node::planning::{apply, PlanningConfig};
    use flow_partition::{Decision, LinkEstimate, Replanner};
    let cfg = family();
    let pc = PlanningConfig::for_family(input, &cfg);
    let with_uplink = |rtt_ms: f64, bps: f64| {
        let mut i = pc.input.clone();
        if let Some(l) = i.links.first_mut() {
            *l = LinkEstimate::fixed(rtt_ms, bps);
        }
        i
    };
    let check = |plan: &flow_partition::Plan| {
        if let Ok(a) = apply(plan, &pc.exit_depths, pc.measure) {
            for t in &a.policy.thresholds {
                assert!(
                    pc.exit_depths.iter().any(|(p, _)| *p == t.exit),
                    "threshold at exit {} of no exit of the family",
                    t.exit
                );
            }
        }
    };
    let Ok(mut r) = Replanner::new(pc.replan, &with_uplink(5.0, 10e6)) else {
        return;
    };
    check(r.current());
    let worse = with_uplink(400.0, 1e4);
    for now in [1_000, 120_000, 240_000] {
        if let Ok(Decision::Replan(p)) = r.on_estimates(now, &worse) {
            check(&p);
        }
    }
}

/// Any bytes as a `--plan FILE` (`flow_node::planning::plan_input_from_json`, the parser
/// `flow-node --plan FILE` uses): refused with a configuration error, or planned with as a
/// node plans at start and re-plans.
pub fn plan_file(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match flow_node::planning::plan_input_from_json(text) {
        Ok(input) => run_planning(input),
        Err(e) => assert!(
            matches!(e, flow_node::NodeError::Config(ref m) if !m.is_empty()),
            "{e:?}"
        ),
    }
}

/// Any bytes as `MODEL/aiflow_calibration.json` (`flow_node::calibration::CalibrationFile`,
/// what nodes, `flow-node plan` and `--plan auto` read): refused with a configuration error,
/// or turned into the nodes' request policy and into the planner's exits for the family,
/// then planned with on three tiers.
pub fn calibration_file(data: &[u8]) {
    use flow_node::calibration::CalibrationFile;
    use flow_partition::planner::{ModelShape, TierRole, TierSpec};
    use flow_partition::profile::{BlockCost, Linear, NodeProfile, ProfileKey};
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let f = match CalibrationFile::from_json_str(text) {
        Ok(f) => f,
        Err(e) => {
            assert!(
                matches!(e, flow_node::NodeError::Config(ref m) if !m.is_empty()),
                "{e:?}"
            );
            return;
        }
    };
    let (thresholds, _) = f.policy();
    assert_eq!(thresholds.len(), f.exits.len() - 1);
    let cfg = family();
    let Ok(exits) = f.exit_specs(&cfg) else {
        return;
    };
    assert_eq!(exits.len(), cfg.exits.len());
    let l = cfg.num_layers;
    let depths: Vec<usize> = exits.iter().map(|e| e.depth).collect();
    let cost = |ms: f64| BlockCost {
        prefill: Linear { a: 0.1, b: ms },
        decode: Linear { a: ms, b: 1e-4 },
        weight_bytes: 1 << 20,
        kv_bytes_per_token: 1024,
    };
    let tier = |role, ms: f64| TierSpec {
        role,
        profile: NodeProfile::uniform(
            ProfileKey {
                model_fingerprint: f.model_fingerprint.clone(),
                cpu: "fuzz".into(),
            },
            l,
            cost(ms),
            &depths,
            cost(ms),
            cost(ms),
        ),
        memory_limit_bytes: 1 << 30,
        load_factor: 1.0,
        compute_power_w: 0.0,
        radio_power_w: 0.0,
    };
    let input = flow_partition::PlanInput {
        model: ModelShape {
            num_layers: l,
            hidden_size: cfg.hidden_size,
            token_id_bytes: 4,
            exits,
        },
        tiers: vec![
            tier(TierRole::Device, 4.0),
            tier(TierRole::Edge, 1.0),
            tier(TierRole::Cloud, 0.25),
        ],
        links: vec![
            flow_partition::LinkEstimate::fixed(20.0, 10e6),
            flow_partition::LinkEstimate::fixed(40.0, 100e6),
        ],
        config: flow_partition::PlannerConfig {
            accuracy_target: f.target_agreement,
            ..Default::default()
        },
    };
    run_planning(input);
}
