//! Placeholder until its issue lands.

/// Arguments.
#[derive(clap::Args, Debug)]
pub struct BenchWireArgs {}

pub fn run(_a: BenchWireArgs) -> anyhow::Result<()> {
    anyhow::bail!("not built yet")
}
