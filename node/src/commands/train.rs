//! Placeholder until its issue lands.

/// Arguments.
#[derive(clap::Args, Debug)]
pub struct TrainArgs {}

pub fn run(_a: TrainArgs) -> anyhow::Result<()> {
    anyhow::bail!("not built yet")
}
