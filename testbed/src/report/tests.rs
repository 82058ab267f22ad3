use super::*;
use crate::loadgen::{Outcome, RequestRecord};
use crate::shaper::{DirectionStats, ShaperStats};

fn rec(id: u64, outcome: Outcome, latency: Option<f64>, tier: Option<&str>) -> RequestRecord {
    let sent = (outcome != Outcome::Shed).then_some(id as f64 * 100.0);
    RequestRecord {
        id,
        scheduled_ms: id as f64 * 100.0,
        sent_ms: sent,
        outcome,
        latency_ms: latency,
        ttft_ms: latency.map(|l| l / 4.0),
        prompt_tokens: 10,
        tokens_out: 20,
        tier: tier.map(str::to_string),
        escalated: tier == Some("cloud"),
        degraded: false,
        text: None,
    }
}

/// 100 requests over 10 s: 90 answered (device/edge/cloud), 6 errors, 4 shed.
pub(super) fn sample_input() -> ReportInput {
    let mut records = Vec::new();
    for id in 0..100u64 {
        let r = match id % 25 {
            0..=2 => rec(
                id,
                Outcome::Error(if id % 2 == 0 {
                    "timeout".into()
                } else {
                    "reset".into()
                }),
                Some(500.0),
                None,
            ),
            3 => rec(id, Outcome::Shed, None, None),
            k => {
                let tier = ["device", "edge", "cloud"][(k % 3) as usize];
                let base = match tier {
                    "device" => 40.0,
                    "edge" => 120.0,
                    _ => 300.0,
                };
                let mut r = rec(
                    id,
                    Outcome::Answered,
                    Some(base + (id % 7) as f64 * 10.0),
                    Some(tier),
                );
                r.degraded = id == 55;
                r
            }
        };
        records.push(r);
    }
    let scenario = crate::scenario::Scenario::parse(
        "name = \"edge restart\"\nduration_s = 12\n[topology]\nnodes = [\"cloud\", \"edge1\", \"device1\"]\n\
         links = [\"device1:edge1\", \"edge1:cloud\"]\n\
         [[event]]\nat_s = 4\naction = \"kill\"\ntarget = \"edge1\"\n\
         [[event]]\nat_s = 6\naction = \"restart\"\ntarget = \"edge1\"\n\
         [[event]]\nat_s = 8\naction = \"degrade_link\"\ntarget = \"edge1:cloud\"\nparams = { delay_ms = 80 }\n",
    )
    .ok();
    let stats = DirectionStats {
        packets_in: 10,
        bytes_in: 12_000,
        packets_out: 9,
        bytes_out: 10_800,
        dropped_loss: 1,
        ..Default::default()
    };
    ReportInput {
        title: "unit test run".into(),
        records,
        links: vec![LinkBytes {
            name: "device1:edge1".into(),
            stats: ShaperStats {
                up: stats,
                down: stats,
                clients_evicted: 0,
            },
        }],
        scenario,
        versions: [(
            "flow-testbed".to_string(),
            env!("CARGO_PKG_VERSION").to_string(),
        )]
        .into(),
    }
}

#[test]
fn percentiles_nearest_rank() {
    let v: Vec<f64> = (1..=100).map(f64::from).collect();
    let p = Percentiles::of(&v).unwrap();
    assert_eq!(
        (p.p50, p.p95, p.p99, p.max, p.count),
        (50.0, 95.0, 99.0, 100.0, 100)
    );
    assert!((p.mean - 50.5).abs() < 1e-9);
    assert_eq!(Percentiles::of(&[]), None);
    assert_eq!(Percentiles::of(&[7.0]).unwrap().p99, 7.0);
}

#[test]
fn summary_accounts_for_every_request() {
    let input = sample_input();
    let s = Summary::compute(&input);
    assert_eq!((s.sent, s.answered, s.errored, s.shed), (100, 84, 12, 4));
    assert!(s.all_accounted);
    assert_eq!(s.errors.values().sum::<u64>(), 12);
    assert_eq!(s.degraded, 1);
    let share: f64 = s.tier_share.values().sum();
    assert!((share - 1.0).abs() < 1e-9);
    assert!((s.escalation_rate - s.tier_share["cloud"]).abs() < 1e-9);
    assert!(
        s.throughput_rps > 8.0 && s.throughput_rps < 9.0,
        "{}",
        s.throughput_rps
    );
    assert_eq!(s.scenario.as_ref().map(|(_, e)| e.len()), Some(3));

    // a duplicated id is caught
    let mut dup = input.clone();
    dup.records.push(dup.records[5].clone());
    assert!(!Summary::compute(&dup).all_accounted);
}

#[test]
fn empty_run_does_not_panic() {
    let s = Summary::compute(&ReportInput::default());
    assert_eq!(s.sent, 0);
    assert!(s.all_accounted && s.latency_ms.is_none());
    let dir = tempfile::tempdir().unwrap();
    write_report(dir.path(), &ReportInput::default()).unwrap();
}

#[test]
fn writes_json_markdown_and_plots() {
    let dir = tempfile::tempdir().unwrap();
    let (summary, files) = write_report(dir.path(), &sample_input()).unwrap();
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&files.json).unwrap()).unwrap();
    assert_eq!(json["summary"]["answered"], 84);
    assert_eq!(json["requests"].as_array().map(Vec::len), Some(100));
    let md = std::fs::read_to_string(&files.markdown).unwrap();
    for needle in [
        "| 100 | 84 | 12 | 4 | yes |",
        "p99",
        "device1:edge1",
        "degrade_link",
        "flow-testbed",
        "latency_cdf.svg",
    ] {
        assert!(md.contains(needle), "`{needle}` missing from:\n{md}");
    }
    assert_eq!(files.plots.len(), 10);
    for p in &files.plots {
        let bytes = std::fs::read(p).unwrap();
        assert!(bytes.len() > 1000, "{} is too small", p.display());
        if p.extension().is_some_and(|e| e == "png") {
            assert_eq!(&bytes[1..4], b"PNG");
        } else {
            let svg = String::from_utf8(bytes).unwrap();
            assert!(
                svg.contains("<svg")
                    && (svg.contains("s since start")
                        || svg.contains("latency (ms)")
                        || svg.contains("device1:edge1")),
                "{}",
                p.display()
            );
        }
    }
    let tiers = std::fs::read_to_string(dir.path().join("tiers.svg")).unwrap();
    assert!(tiers.contains("answered by") && tiers.contains("degraded"));
    assert!(summary.all_accounted);
}
