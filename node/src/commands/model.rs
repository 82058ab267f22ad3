//! Placeholder until its issue lands.

#[derive(clap::Args, Debug)]
pub struct InitArgs {}
#[derive(clap::Args, Debug)]
pub struct InspectArgs {}
#[derive(clap::Args, Debug)]
pub struct RunArgs {}

pub fn init(_a: InitArgs) -> anyhow::Result<()> {
    anyhow::bail!("not built yet")
}
pub fn inspect(_a: InspectArgs) -> anyhow::Result<()> {
    anyhow::bail!("not built yet")
}
pub fn run(_a: RunArgs) -> anyhow::Result<()> {
    anyhow::bail!("not built yet")
}
