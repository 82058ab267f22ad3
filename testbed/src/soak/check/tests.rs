use super::*;
use crate::soak::sample::{Probe, KV_BYTES, RUNNING, SESSIONS, WAITING};

fn rec(id: u64, outcome: Outcome) -> RequestRecord {
    RequestRecord {
        id,
        scheduled_ms: id as f64,
        sent_ms: Some(id as f64),
        outcome,
        latency_ms: Some(1.0),
        ttft_ms: None,
        prompt_tokens: 4,
        tokens_out: 1,
        tier: None,
        escalated: false,
        degraded: false,
        text: None,
    }
}

fn err(e: &str) -> Outcome {
    Outcome::Error(e.into())
}

#[test]
fn fates_follow_the_load_generators_error_texts() {
    assert_eq!(fate(&Outcome::Answered), Fate::Answered);
    assert_eq!(fate(&Outcome::Shed), Fate::Shed);
    assert_eq!(fate(&err("HTTP 502: parent link is down")), Fate::Refused);
    assert_eq!(
        fate(&err("HTTP 429 with a body that is not JSON")),
        Fate::Refused
    );
    assert_eq!(fate(&err("timeout")), Fate::Hung);
    assert_eq!(
        fate(&err(
            "http://10.231.0.21:8080/v1/completions: no complete answer within 15s"
        )),
        Fate::Hung
    );
    assert_eq!(
        fate(&err("connecting to 10.231.0.21:8080: Connection refused")),
        Fate::Broken
    );
}

#[test]
fn requests_are_tallied_and_lost_ones_found() {
    let recs = vec![
        rec(0, Outcome::Answered),
        rec(1, err("HTTP 502: down")),
        rec(2, err("timeout")),
        rec(3, err("reset by peer")),
        rec(4, Outcome::Shed),
        rec(4, Outcome::Answered),
        rec(9, Outcome::Answered),
    ];
    let t = RequestTally::count(&[0, 1, 2, 3, 4, 5], &recs);
    assert_eq!(
        (t.scheduled, t.answered, t.refused, t.hung, t.broken, t.shed),
        (6, 1, 1, 1, 1, 1)
    );
    assert_eq!((t.lost, t.unexpected), (1, 2));
    assert_eq!(t.bad_errors.len(), 2);
}

fn sample(node: &str, t: f64, start: u64, rss: u64, gauges: &[(&str, f64)]) -> NodeSample {
    NodeSample {
        t_s: t,
        node: node.into(),
        probe: Probe {
            rss_kb: Some(rss),
            start_ticks: Some(start),
            gauges: gauges.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            error: None,
        },
    }
}

fn zeros() -> Vec<(&'static str, f64)> {
    GAUGES.iter().map(|g| (*g, 0.0)).collect()
}

#[test]
fn a_clean_soak_passes_and_a_leak_or_leftover_session_fails_with_the_node_named() {
    let nodes = vec!["cloud".to_string(), "edge1".to_string()];
    let mut samples = Vec::new();
    for i in 0..100 {
        let t = i as f64;
        samples.push(sample("cloud", t, 1, 50_000 + (i % 3) * 100, &[]));
        // edge1 is restarted at t = 30 and t = 60: its runs are too short to check
        let start = 1 + i / 30;
        samples.push(sample("edge1", t, start, 40_000 + (i % 30) * 1000, &[]));
    }
    let end = vec![
        sample("cloud", 101.0, 1, 50_000, &zeros()),
        sample("edge1", 101.0, 4, 40_000, &zeros()),
    ];
    let recs: Vec<_> = (0..10).map(|i| rec(i, Outcome::Answered)).collect();
    let ids: Vec<u64> = (0..10).collect();
    let b = Bounds::default();
    let v = judge(&nodes, &ids, &recs, &samples, &end, 100.0, &b);
    assert!(v.passed(), "{:?}", v.violations);
    assert!(v.nodes[0].growth_checked);
    assert!(!v.nodes[1].growth_checked);
    assert!(v.nodes[1]
        .note
        .as_deref()
        .unwrap()
        .contains("restarted 3 times"));

    // the cloud leaks, edge1 keeps a session and its KV, one request hangs
    let leaky: Vec<_> = samples
        .iter()
        .cloned()
        .map(|mut s| {
            if s.node == "cloud" {
                s.probe.rss_kb = Some(50_000 + (s.t_s as u64) * 200);
            }
            s
        })
        .collect();
    let mut end2 = end.clone();
    end2[1] = sample(
        "edge1",
        101.0,
        4,
        40_000,
        &[
            (SESSIONS, 1.0),
            (KV_BYTES, 4096.0),
            (RUNNING, 0.0),
            (WAITING, 0.0),
        ],
    );
    let mut recs2 = recs.clone();
    recs2[3].outcome = err("timeout");
    let v = judge(&nodes, &ids, &recs2, &leaky, &end2, 100.0, &b);
    let all = v.violations.join("\n");
    assert!(!v.passed());
    assert!(all.contains("cloud: RSS grew"), "{all}");
    assert!(all.contains("bound 10 %"), "{all}");
    assert!(
        all.contains("edge1 at the end: aiflow_engine_sessions = 1"),
        "{all}"
    );
    assert!(all.contains("aiflow_engine_kv_bytes = 4096"), "{all}");
    assert!(all.contains("hung requests: 1"), "{all}");
    assert_eq!(v.violations.len(), 4, "{all}");
}

#[test]
fn missing_end_metrics_and_missing_samples_are_violations() {
    let nodes = vec!["device1".to_string()];
    let mut end = sample("device1", 5.0, 1, 10, &[]);
    end.probe.error = Some("/metrics: connection refused".into());
    let v = judge(&nodes, &[], &[], &[], &[end], 10.0, &Bounds::default());
    let all = v.violations.join("\n");
    assert!(all.contains("device1: RSS growth not measurable"), "{all}");
    assert!(all.contains("connection refused"), "{all}");
}
