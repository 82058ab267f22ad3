//! `flow-node`: one binary for every tier of an aiflow cluster.

use clap::{Parser, Subcommand};

mod commands;

/// aiflow node agent: device-edge-cloud collaborative inference with familial models.
///
/// Every tier runs this binary. The subcommands below build, inspect and benchmark the
/// model family, issue certificates, and run the cluster.
#[derive(Parser, Debug)]
#[command(name = "flow-node", version, about, long_about = None, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Device, edge and cloud on loopback in one process (real QUIC + mTLS), a short mixed
    /// workload in every mode, and a report. Start here.
    Demo(commands::demo::DemoArgs),
    /// Create, train, inspect and run familial model checkpoints.
    #[command(subcommand)]
    Model(commands::ModelCmd),
    /// Create the cluster CA and issue node certificates (mutual TLS).
    #[command(subcommand)]
    Certs(commands::certs::CertsCmd),
    /// Benchmarks; results are printed as tables (and JSON with --json).
    #[command(subcommand)]
    Bench(commands::BenchCmd),
}

fn main() {
    if let Err(e) = real_main() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn real_main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Demo(d) => commands::demo::run(d),
        Cmd::Model(m) => commands::run_model(m),
        Cmd::Certs(c) => commands::certs::run(c),
        Cmd::Bench(b) => commands::run_bench(b),
    }
}
