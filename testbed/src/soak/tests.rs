use super::check::{judge, Bounds};
use super::sample::{Probe, GAUGES};
use super::*;

fn s(node: &str, t: f64, start: Option<u64>, rss: Option<u64>) -> NodeSample {
    NodeSample {
        t_s: t,
        node: node.into(),
        probe: Probe {
            rss_kb: rss,
            start_ticks: start,
            gauges: GAUGES.iter().map(|g| (g.to_string(), 0.0)).collect(),
            error: None,
        },
    }
}

#[test]
fn series_break_where_a_node_was_down_or_restarted() {
    let samples = vec![
        s("edge1", 0.0, Some(1), Some(10)),
        s("edge1", 1.0, Some(1), Some(11)),
        s("edge1", 2.0, None, None), // killed
        s("edge1", 3.0, Some(2), Some(5)),
        s("edge1", 4.0, Some(3), Some(6)), // restarted between two readings
        s("edge1", 5.0, Some(3), Some(7)),
    ];
    let series = node_series(&["edge1".into()], &samples, |x| {
        x.probe.rss_kb.map(|k| k as f64)
    });
    assert_eq!(
        series["edge1"],
        vec![
            vec![(0.0, 10.0), (1.0, 11.0)],
            vec![(3.0, 5.0)],
            vec![(4.0, 6.0), (5.0, 7.0)]
        ]
    );
}

#[test]
fn the_report_names_broken_bounds_and_writes_its_files() {
    let nodes = vec!["cloud".to_string()];
    let samples: Vec<_> = (0..40)
        .map(|i| s("cloud", i as f64, Some(1), Some(50_000 + i * 1000)))
        .collect();
    let end = vec![s("cloud", 41.0, Some(1), Some(90_000))];
    let verdict = judge(&nodes, &[], &[], &samples, &end, 40.0, &Bounds::default());
    assert!(!verdict.passed());
    let report = SoakReport {
        title: "soak test".into(),
        config: SoakConfig {
            scenario: "s".into(),
            duration_s: 40.0,
            cycle_s: 20.0,
            cycles: 2,
            sample_every_s: 1.0,
            drain_timeout_s: 30.0,
            load: "trace ×2".into(),
            bounds: Bounds::default(),
        },
        drain_s: 0.5,
        events: vec![(10.0, "kill edge1".into()), (15.0, "restart edge1".into())],
        verdict,
    };
    let dir = tempfile::tempdir().unwrap();
    let files = write_soak_report(dir.path(), &report, &nodes, &samples, &end).unwrap();
    assert_eq!(files.len(), 2 + 3 * 2);
    for f in &files {
        assert!(std::fs::metadata(f).unwrap().len() > 0, "{}", f.display());
    }
    let md = std::fs::read_to_string(dir.path().join("soak.md")).unwrap();
    assert!(md.contains("**FAILED**"), "{md}");
    assert!(md.contains("cloud: RSS grew"), "{md}");
    assert!(md.contains("![rss](rss.svg)"), "{md}");
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("soak.json")).unwrap()).unwrap();
    assert_eq!(json["samples"].as_array().unwrap().len(), 40);
    assert_eq!(json["verdict"]["nodes"][0]["node"], "cloud");
}
