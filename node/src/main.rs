//! `flow-node`: one binary for every tier of an aiflow cluster.

// Outside tests, failures are errors with context; an invariant that cannot fail says why
// under a scoped #[allow] (node/clippy.toml lets tests unwrap).
#![warn(clippy::unwrap_used, clippy::expect_used)]

use clap::{Parser, Subcommand};

mod commands;

/// Counts heap bytes so `flow-node bench finetune` can report peak training memory.
#[global_allocator]
static ALLOC: flow_finetune::mem::CountingAlloc = flow_finetune::mem::CountingAlloc;

/// aiflow node agent: device-edge-cloud collaborative inference with familial models.
///
/// Every tier runs this binary. The subcommands below build, inspect and benchmark the
/// model family, issue certificates, and run the cluster.
#[derive(Parser, Debug)]
#[command(name = "flow-node", version, about, long_about = None, propagate_version = true)]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    /// Run a node: `flow-node --role edge --model DIR --layers 1..3 --listen 0.0.0.0:7000 --parent CLOUD:7000 --ca ca.pem --cert edge.pem --key edge.key`.
    #[command(flatten)]
    node: commands::node::NodeArgs,
}

#[derive(Subcommand, Debug)]
#[allow(clippy::large_enum_variant)] // parsed once at start-up
enum Cmd {
    /// Device, edge and cloud on loopback in one process (real QUIC + mTLS), a short mixed
    /// workload in every mode, and a report. Start here.
    Demo(commands::demo::DemoArgs),
    /// Device, edge and cloud on loopback in one process, serving the OpenAI-compatible API
    /// on the device until Ctrl-C.
    Cluster(commands::cluster::ClusterArgs),
    /// Create, train, inspect and run familial model checkpoints; pull real models (GGUF)
    /// into the local cache.
    #[command(subcommand)]
    Model(commands::ModelCmd),
    /// Create the cluster CA and issue node certificates (mutual TLS).
    #[command(subcommand)]
    Certs(commands::certs::CertsCmd),
    /// Benchmarks; results are printed as tables (and JSON with --json).
    #[command(subcommand)]
    Bench(commands::BenchCmd),
    /// Plan where to cut the family across device, edge and cloud (predicted latency per
    /// tier and link, escalation thresholds), from a self-benchmark and link estimates.
    Plan(commands::plan::PlanArgs),
    /// The multi-host testbed on Docker: build the image, up/down, run a fault scenario
    /// with replayed load and write a report.
    #[command(subcommand)]
    Testbed(commands::testbed::TestbedCmd),
    /// Edge traffic management: SUMO closed loop, camera datasets.
    #[command(subcommand)]
    Traffic(commands::traffic::TrafficCmd),
    /// Mixture-of-Experts serving tools (expert profiling per task for pruning).
    #[command(subcommand)]
    Moe(commands::moe::MoeCmd),
    /// Sparse fine-tuning of the shallow member(s) on local data into a delta checkpoint
    /// (only changed tensors, with the base fingerprint) that devices apply.
    Finetune(Box<commands::finetune::FinetuneArgs>),
    /// Push fine-tuned deltas into a running cluster, roll them back, and run federated
    /// rounds (edges average their devices, the cloud its edges) over QUIC.
    #[command(subcommand)]
    Fleet(commands::finetune_fleet::FleetCmd),
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
    if !matches!(cli.cmd, None | Some(Cmd::Cluster(_))) {
        die_quietly_on_closed_pipe();
    }
    let Some(cmd) = cli.cmd else {
        return commands::node::run(cli.node);
    };
    match cmd {
        Cmd::Cluster(c) => commands::cluster::run(c),
        Cmd::Demo(d) => commands::demo::run(d),
        Cmd::Model(m) => commands::run_model(m),
        Cmd::Certs(c) => commands::certs::run(c),
        Cmd::Bench(b) => commands::run_bench(b),
        Cmd::Plan(p) => commands::plan::run(p),
        Cmd::Testbed(t) => commands::testbed::run(t),
        Cmd::Traffic(t) => commands::traffic::run(t),
        Cmd::Moe(m) => commands::moe::run(m),
        Cmd::Finetune(f) => commands::finetune::run(*f),
        Cmd::Fleet(f) => commands::finetune_fleet::run(f),
    }
}

/// A command whose output is cut short (`flow-node model inspect DIR | head`) ends quietly,
/// as other Unix tools do: SIGPIPE gets its default action back (Rust starts programs with
/// it ignored, so `println!` would panic on the closed pipe). Servers (a node, `cluster`)
/// keep it ignored: a closed log pipe must not kill a serving node.
#[cfg(unix)]
fn die_quietly_on_closed_pipe() {
    // SAFETY: `signal` with a valid signal number and `SIG_DFL` has no preconditions; it
    // runs before this program writes to stdout.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

#[cfg(not(unix))]
fn die_quietly_on_closed_pipe() {}
