//! End-to-end demo of the library parts without an agent: replay the sample trace (20× faster)
//! open-loop against a simulated 3-tier system whose edge is killed and restarted, then write
//! the report.
//!
//! `cargo run -p flow-testbed --example report_demo -- [OUT_DIR]` (default `target/report-demo`)

use std::time::Duration;

use flow_testbed::loadgen::{run_open_loop, OpenLoopConfig, Reply, Schedule, ScheduleOptions};
use flow_testbed::report::{write_report, ReportInput};
use flow_testbed::scenario::Scenario;
use flow_testbed::trace::Trace;

const SCENARIO: &str = r#"
name = "edge restart (simulated)"
duration_s = 9
[topology]
nodes = ["cloud", "edge1", "device1"]
links = ["device1:edge1", "edge1:cloud"]
[[event]]
at_s = 3
action = "kill"
target = "edge1"
[[event]]
at_s = 4.5
action = "restart"
target = "edge1"
"#;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> flow_testbed::Result<()> {
    let out = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "target/report-demo".to_string());
    let trace = Trace::load(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/traces/sample_burstgpt.csv"
    ))?
    .speed_up(20.0)?;
    let schedule = Schedule::from_trace(&trace, &ScheduleOptions::default())?;
    let scenario = Scenario::parse(SCENARIO)?;
    let start = tokio::time::Instant::now();
    let cfg = OpenLoopConfig {
        max_in_flight: 16,
        request_timeout: Duration::from_secs(2),
    };
    let records = run_open_loop(&schedule, &cfg, move |req| async move {
        // a toy tier policy: short prompts stay on the device, long ones go to the cloud
        let (tier, base_ms) = match req.prompt_tokens {
            0..=64 => ("device", 30),
            65..=512 => ("edge", 120),
            _ => ("cloud", 300),
        };
        let t = start.elapsed().as_secs_f64();
        let edge_down = (3.0..4.5).contains(&t);
        if edge_down && tier != "device" {
            tokio::time::sleep(Duration::from_millis(50)).await;
            return Err("edge1 unreachable".to_string());
        }
        let ms = base_ms + u64::from(req.max_tokens) / 2;
        tokio::time::sleep(Duration::from_millis(ms)).await;
        Ok(Reply {
            ttft: Some(Duration::from_millis(base_ms / 2)),
            tokens_out: req.max_tokens,
            tier: Some(tier.to_string()),
            escalated: tier != "device",
            degraded: false,
            text: None,
        })
    })
    .await;
    let input = ReportInput {
        title: "report demo (simulated tiers)".to_string(),
        records,
        links: Vec::new(),
        scenario: Some(scenario),
        versions: [(
            "flow-testbed".to_string(),
            env!("CARGO_PKG_VERSION").to_string(),
        )]
        .into(),
    };
    let (summary, files) = write_report(&out, &input)?;
    println!(
        "sent {} answered {} errored {} shed {} (all accounted: {}); p50 {:?} ms",
        summary.sent,
        summary.answered,
        summary.errored,
        summary.shed,
        summary.all_accounted,
        summary.latency_ms.map(|p| p.p50)
    );
    println!("report: {}", files.markdown.display());
    Ok(())
}
