//! Subcommands of `flow-node`.

use clap::Subcommand;

pub mod bench_model;
pub mod bench_split;
pub mod bench_wire;
pub mod calibrate;
pub mod certs;
pub mod cluster;
pub mod demo;
pub mod model;
pub mod node;
pub mod plan;
pub mod train;

/// `flow-node model ...`
#[derive(Subcommand, Debug)]
#[allow(clippy::large_enum_variant)] // parsed once at start-up
pub enum ModelCmd {
    /// Write a seeded checkpoint (config.json, model.safetensors, tokenizer.json) in an HF layout.
    Init(model::InitArgs),
    /// Train every exit of a family jointly (sum of exit losses) on synthetic tasks or a text file.
    Train(Box<train::TrainArgs>),
    /// Show members, exits, parameters and bytes per member of a checkpoint.
    Inspect(model::InspectArgs),
    /// Greedy generation at one exit.
    Run(model::RunArgs),
    /// Per-exit escalation thresholds meeting a target agreement with the deepest exit.
    Calibrate(calibrate::CalibrateArgs),
}

/// `flow-node bench ...`
#[derive(Subcommand, Debug)]
pub enum BenchCmd {
    /// Prefill/decode tokens/s per exit and peak RSS, against a plain candle-nn reference loop.
    Model(bench_model::BenchModelArgs),
    /// Wire encodings, encode/decode time, QUIC round trip and goodput vs raw quinn.
    Wire(bench_wire::BenchWireArgs),
    /// Single node vs device+edge+cloud (escalate-always, speculate) on loopback: decode tokens/s, TTFT, bytes per token per link.
    Split(bench_split::BenchSplitArgs),
}

pub fn run_model(cmd: ModelCmd) -> anyhow::Result<()> {
    match cmd {
        ModelCmd::Init(a) => model::init(a),
        ModelCmd::Train(a) => train::run(*a),
        ModelCmd::Inspect(a) => model::inspect(a),
        ModelCmd::Run(a) => model::run(a),
        ModelCmd::Calibrate(a) => calibrate::run(a),
    }
}

pub fn run_bench(cmd: BenchCmd) -> anyhow::Result<()> {
    match cmd {
        BenchCmd::Model(a) => bench_model::run(a),
        BenchCmd::Wire(a) => bench_wire::run(a),
        BenchCmd::Split(a) => bench_split::run(a),
    }
}
