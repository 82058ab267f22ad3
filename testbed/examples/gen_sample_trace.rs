//! Regenerate `testbed/traces/sample_burstgpt.csv` (200 synthetic requests, seed 42, the
//! newer BurstGPT column layout).
//!
//! `cargo run -p flow-testbed --example gen_sample_trace`

use flow_testbed::trace::SyntheticConfig;

fn main() -> flow_testbed::Result<()> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/traces/sample_burstgpt.csv");
    let trace = SyntheticConfig::default().generate()?;
    let file = std::fs::File::create(path).map_err(|e| flow_testbed::Error::File {
        action: "writing",
        path: path.into(),
        source: e,
    })?;
    trace.write_csv(file)?;
    println!(
        "wrote {} requests over {:.1} s to {path}",
        trace.len(),
        trace.span()
    );
    Ok(())
}
