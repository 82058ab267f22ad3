//! Precise accuracy of the link shaper on loopback (numbers for `docs/benchmarks.md`).
//!
//! `cargo run -p flow-testbed --example shaper_accuracy`

use std::time::Duration;

use flow_testbed::shaper::bench::{measure_delay, measure_loss, measure_rate};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> flow_testbed::Result<()> {
    println!("| delay (ms) | samples | mean (ms) | p50 (ms) | p99 (ms) | min (ms) | mean error |");
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    for ms in [5, 20, 50, 100] {
        let m = measure_delay(Duration::from_millis(ms), 300, Duration::from_millis(5)).await?;
        println!(
            "| {:.0} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:+.2} % |",
            m.configured_ms,
            m.samples,
            m.mean_ms,
            m.p50_ms,
            m.p99_ms,
            m.min_ms,
            m.mean_error() * 100.0
        );
    }
    println!();
    println!("| rate (Mbit/s) | packets sent | received | measured (Mbit/s) | error |");
    println!("|---:|---:|---:|---:|---:|");
    for mbit in [1u64, 10, 50, 100] {
        let m = measure_rate(mbit * 1_000_000, 1200, Duration::from_secs(2)).await?;
        println!(
            "| {} | {} | {} | {:.3} | {:+.2} % |",
            mbit,
            m.sent,
            m.received,
            m.measured_bps / 1e6,
            m.error() * 100.0
        );
    }
    println!();
    println!("| loss | sent | received | measured | counted by shaper |");
    println!("|---:|---:|---:|---:|---:|");
    for loss in [0.01, 0.05, 0.2] {
        let m = measure_loss(loss, 10_000, 5).await?;
        println!(
            "| {} | {} | {} | {:.4} | {} |",
            m.configured, m.sent, m.received, m.measured, m.stats.up.dropped_loss
        );
    }
    Ok(())
}
