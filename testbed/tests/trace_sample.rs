//! The shipped sample trace parses, and is exactly what the generator makes (seed 42).

use flow_testbed::loadgen::{Schedule, ScheduleOptions};
use flow_testbed::trace::{SyntheticConfig, Trace};

const SAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/traces/sample_burstgpt.csv");

#[test]
fn sample_parses_in_the_newer_layout() {
    let t = Trace::load(SAMPLE).unwrap();
    assert_eq!(t.len(), 200);
    assert_eq!(t.records[0].line, 2);
    assert!(
        t.records.iter().any(|r| r.failed()),
        "the sample keeps failed requests"
    );
    assert!(t.records.iter().any(|r| r.session_id.is_some()));
    assert!(t.records.iter().all(|r| r.elapsed.is_some()));
    assert!(t.records.iter().any(|r| r.model == "GPT-4"));
    let s = Schedule::from_trace(&t, &ScheduleOptions::default()).unwrap();
    assert_eq!(s.len(), 200);
    assert!(s.requests.windows(2).all(|w| w[0].send_at <= w[1].send_at));
}

#[test]
fn sample_is_reproducible_from_its_generator() {
    let mut want = Vec::new();
    SyntheticConfig::default()
        .generate()
        .unwrap()
        .write_csv(&mut want)
        .unwrap();
    let have = std::fs::read(SAMPLE).unwrap();
    assert!(have == want, "traces/sample_burstgpt.csv differs: rerun `cargo run -p flow-testbed --example gen_sample_trace`");
}
