//! Placeholder until its issue lands.

/// Certificates.
#[derive(clap::Subcommand, Debug)]
pub enum CertsCmd {
    /// Create a CA.
    Init {},
}

pub fn run(_c: CertsCmd) -> anyhow::Result<()> {
    anyhow::bail!("not built yet")
}
