//! Subcommands of `flow-node`.

use clap::Subcommand;

/// The OS clock, for commands that time synchronous work (a load, a benchmark's loop, a
/// training run, a testbed's schedule) on their own threads, outside any tokio runtime.
/// Async code uses `tokio::time::Instant`, the runtime's clock.
#[allow(clippy::disallowed_types)]
pub type OsInstant = std::time::Instant;

pub mod api_args;
pub mod bench_api;
pub mod bench_batching;
pub mod bench_finetune;
pub mod bench_finetune_real;
pub mod bench_gguf;
pub mod bench_model;
pub mod bench_moe;
pub mod bench_plan;
pub mod bench_split;
pub mod bench_wire;
pub mod calibrate;
pub mod certs;
pub mod cluster;
pub mod demo;
pub mod finetune;
pub mod finetune_fleet;
pub mod finetune_real;
pub mod model;
pub mod model_family;
pub mod model_pull;
pub mod moe;
pub mod node;
pub mod plan;
pub mod testbed;
pub mod testbed_compose;
pub mod testbed_faults;
pub mod testbed_greedy;
pub mod testbed_link;
pub mod testbed_load;
pub mod testbed_probe;
pub mod testbed_run;
pub mod testbed_soak;
pub mod traffic;
pub mod traffic_bench;
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
    /// Attach exits to a pretrained model (GGUF/HF) and train them by distillation; writes a family overlay.
    Family(Box<model_family::FamilyArgs>),
    /// Download a known model (GGUF) into the local cache, or import one with --file.
    Pull(model_pull::PullArgs),
    /// Show the models in the local cache (name, size, sha256, path).
    List(model_pull::ListArgs),
}

/// `flow-node bench ...`
#[derive(Subcommand, Debug)]
pub enum BenchCmd {
    /// Prefill/decode tokens/s per exit and peak RSS, against a plain candle-nn reference loop.
    Model(bench_model::BenchModelArgs),
    /// HTTP API overhead: one-token requests from wrk vs an in-process Agent::generate loop; SSE streaming vs non-streamed ms/token.
    Api(bench_api::BenchApiArgs),
    /// Wire encodings, encode/decode time, QUIC round trip and goodput vs raw quinn.
    Wire(bench_wire::BenchWireArgs),
    /// Single node vs device+edge+cloud (escalate-always, speculate) on loopback: decode tokens/s, TTFT, bytes per token per link.
    Split(bench_split::BenchSplitArgs),
    /// MoE expert pruning: task accuracy and resident expert memory vs experts kept (all, 1/2, 1/4, 1/8), with pattern retrieval.
    Moe(bench_moe::BenchMoeArgs),
    /// Continuous batching on a BurstGPT-style replay: p50/p99 time-between-tokens and throughput, chunked prefill vs prefill-first.
    Batching(bench_batching::BenchBatchingArgs),
    /// Cloud-only, device-only, static split and the adaptive planner on shaped loopback links: ms/token, agreement, predicted vs measured.
    Plan(bench_plan::BenchPlanArgs),
    /// Traffic app: fixed/adaptive/preempt controllers in SUMO per camera condition, detector accuracy per exit, frames escalated.
    Traffic(traffic_bench::BenchTrafficArgs),
    /// Sparse fine-tuning schemes vs full fine-tuning on a domain shift: peak memory, time per step, device-exit accuracy.
    Finetune(bench_finetune::BenchFinetuneArgs),
}

pub fn run_model(cmd: ModelCmd) -> anyhow::Result<()> {
    match cmd {
        ModelCmd::Init(a) => model::init(a),
        ModelCmd::Train(a) => train::run(*a),
        ModelCmd::Inspect(a) => model::inspect(a),
        ModelCmd::Run(a) => model::run(a),
        ModelCmd::Calibrate(a) => calibrate::run(a),
        ModelCmd::Family(a) => model_family::run(*a),
        ModelCmd::Pull(a) => model_pull::pull_cmd(a),
        ModelCmd::List(a) => model_pull::list_cmd(a),
    }
}

pub fn run_bench(cmd: BenchCmd) -> anyhow::Result<()> {
    match cmd {
        BenchCmd::Model(a) => bench_model::run(a),
        BenchCmd::Api(a) => bench_api::run(a),
        BenchCmd::Wire(a) => bench_wire::run(a),
        BenchCmd::Split(a) => bench_split::run(a),
        BenchCmd::Moe(a) => bench_moe::run(a),
        BenchCmd::Batching(a) => bench_batching::run(a),
        BenchCmd::Plan(a) => bench_plan::run(a),
        BenchCmd::Traffic(a) => traffic_bench::bench(a),
        BenchCmd::Finetune(a) => bench_finetune::run(a),
    }
}

/// Clap value parser for `--model`-style arguments: an existing path (HF directory or GGUF
/// file) as is, otherwise a model pulled into the cache by name.
pub fn model_arg(s: &str) -> Result<std::path::PathBuf, String> {
    let p = std::path::Path::new(s);
    if !p.exists() && (s.contains(std::path::MAIN_SEPARATOR) || s.starts_with('.')) {
        return Err(format!(
            "model {s} does not exist: pass an HF checkpoint directory (create one with \
             `flow-node model init --preset tiny --out {s}`), a GGUF file, or a pulled name \
             (`flow-node model pull smollm2-135m-instruct`)"
        ));
    }
    flow_node::model_store::resolve::resolve_model(s)
        .map(|loc| loc.path().to_path_buf())
        .map_err(|e| e.to_string())
}

/// SIGTERM (docker stop, a Kubernetes pod's termination, systemd stop) or Ctrl-C.
pub async fn shutdown_signal() -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r?,
            _ = term.recv() => {}
        }
        Ok(())
    }
    #[cfg(not(unix))]
    {
        Ok(tokio::signal::ctrl_c().await?)
    }
}
