//! Placeholder until its issue lands.

/// Arguments.
#[derive(clap::Args, Debug)]
pub struct BenchModelArgs {}

pub fn run(_a: BenchModelArgs) -> anyhow::Result<()> {
    anyhow::bail!("not built yet")
}
