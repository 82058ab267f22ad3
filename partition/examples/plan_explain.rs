//! Plans a made-up 12-layer family over device, edge and cloud on the benchmark's links
//! (device-edge 10 Mbit/s 20 ms, edge-cloud 100 Mbit/s 40 ms; then a degraded 1 Mbit/s
//! uplink) and prints the explanation and the baselines.
//!
//! `cargo run -p flow-partition --example plan_explain`

use flow_partition::planner::{
    best_static_split, cloud_only, device_only, plan, ExitSpec, ModelShape, PlanInput,
    PlannerConfig, TierRole, TierSpec,
};
use flow_partition::profile::{BlockCost, Linear, NodeProfile, ProfileKey};
use flow_partition::{CurvePoint, LinkEstimate};

const MB: u64 = 1_000_000;

fn pt(threshold: f64, agreement: f64, escalation: f64) -> CurvePoint {
    CurvePoint {
        threshold,
        agreement,
        escalation,
    }
}

fn tier(role: TierRole, layer_ms: f64, memory_limit_bytes: u64) -> TierSpec {
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
    let head = BlockCost {
        weight_bytes: 60 * MB,
        ..layer
    };
    let overhead = BlockCost {
        prefill: Linear::constant(0.2 * layer_ms),
        decode: Linear::constant(0.2 * layer_ms),
        weight_bytes: 60 * MB,
        kv_bytes_per_token: 0,
    };
    let key = ProfileKey {
        model_fingerprint: "example-family".into(),
        cpu: role.name().into(),
    };
    TierSpec {
        role,
        profile: NodeProfile::uniform(key, 12, layer, &[4, 8, 12], head, overhead),
        memory_limit_bytes,
        load_factor: 1.0,
        compute_power_w: 3.0,
        radio_power_w: 1.0,
    }
}

fn input(uplink_bps: f64) -> PlanInput {
    PlanInput {
        model: ModelShape {
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
        },
        tiers: vec![
            tier(TierRole::Device, 2.0, 320 * MB),
            tier(TierRole::Edge, 1.0, 8_000 * MB),
            tier(TierRole::Cloud, 0.25, 80_000 * MB),
        ],
        links: vec![
            LinkEstimate::fixed(20.0, uplink_bps),
            LinkEstimate::fixed(40.0, 100e6),
        ],
        config: PlannerConfig::default(),
    }
}

fn main() -> Result<(), flow_partition::Error> {
    for uplink in [10e6, 1e6] {
        let inp = input(uplink);
        println!("=== device-edge {} Mbit/s ===", uplink / 1e6);
        print!("{}", plan(&inp)?.explain());
        for (name, p) in [
            ("cloud-only", cloud_only(&inp)?),
            ("device-only", device_only(&inp)?),
            ("best static split", best_static_split(&inp)?),
        ] {
            println!(
                "{name:>18}: {:8.3} ms/token, agreement {:.4}  {}",
                p.predicted_latency_ms,
                p.predicted_agreement,
                p.summary()
            );
        }
        println!();
    }
    Ok(())
}
