//! `flow-node cluster`: device, edge and cloud in one process on loopback (real QUIC and
//! mTLS), serving the OpenAI-compatible API on the device until Ctrl-C.

use std::net::SocketAddr;
use std::path::PathBuf;

use flow_familial::init::{init_checkpoint, Preset};
use flow_familial::Layout;
use flow_node::cluster::{ClusterSpec, LocalCluster};
use flow_node::EngineConfig;
use flow_protocol::Policy;

/// Serve a three-tier loopback cluster's API (for trying the API and for client tests).
#[derive(clap::Args, Debug)]
pub struct ClusterArgs {
    /// Model directory; default models/small, else a seeded tiny family.
    #[arg(value_parser = super::model_arg, long)]
    pub model: Option<PathBuf>,
    /// HTTP address of the device's API.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub http: SocketAddr,
    /// Write the bound HTTP address to this file once serving (useful with port 0).
    #[arg(long)]
    pub addr_file: Option<PathBuf>,
    /// Wire encoding between tiers.
    #[arg(long, default_value = "f32")]
    pub encoding: flow_protocol::Encoding,
    #[command(flatten)]
    pub api: super::api_args::ApiArgs,
}

pub fn run(a: ClusterArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let tmp = tempfile::tempdir()?;
        let encoding = a.encoding;
        let cluster = start(a.model, tmp.path(), encoding, EngineConfig::default()).await?;
        let (addr, _task, ready) = flow_node::http::serve_loading(a.http, &a.api.options()).await?;
        ready.set(cluster.device.clone());
        eprintln!("device API on http://{addr}/v1 (edge and cloud behind it over QUIC)");
        if let Some(f) = a.addr_file {
            std::fs::write(&f, addr.to_string())?;
        }
        super::shutdown_signal().await?;
        cluster.shutdown().await;
        Ok(())
    })
}

/// Start device, edge and cloud on loopback over `model` (default models/small, else a
/// seeded tiny family written under `tmp`), with the family's calibrated thresholds.
pub(crate) async fn start(
    model: Option<PathBuf>,
    tmp: &std::path::Path,
    encoding: flow_protocol::Encoding,
    engine: EngineConfig,
) -> anyhow::Result<LocalCluster> {
    let dir = match model {
        Some(d) => d,
        None if PathBuf::from("models/small/config.json").exists() => "models/small".into(),
        None => {
            let d = tmp.join("tiny");
            init_checkpoint(Preset::Tiny, Layout::RuyiQwen2, 1, &d)?;
            d
        }
    };
    let cfg = flow_familial::source::model_config(&dir)?;
    let (declare_exits, exits) = tier_exits(&cfg);
    let (device_exit, edge_exit, _) = three_tier_exits(&exits, "flow-node cluster")?;
    // The family's calibrated thresholds (MODEL/aiflow_calibration.json) by default.
    let mut policy = Policy::default();
    if let Some((thresholds, measure)) = super::calibrate::calibrated_policy(&dir)? {
        eprintln!(
            "escalation thresholds from {}: {}",
            dir.join(super::calibrate::FILE_NAME).display(),
            super::calibrate::describe(&thresholds)
        );
        policy.thresholds = thresholds;
        policy.measure = measure;
    } else if declare_exits.is_some() {
        eprintln!(
            "note: {} has no trained exits; exits {:?} reuse the final norm and head on the \
             untrained trunk (logit lens) and no calibration sets their thresholds, so early \
             tokens are guesses (default threshold {}). Train and calibrate a family \
             (`flow-node model family`, `model calibrate`) or route to the last exit \
             (`\"aiflow\": {{\"mode\": \"route\"}}`); models/smollm2-family is one for SmolLM2.",
            dir.display(),
            exits,
            policy.default_threshold
        );
    }
    let cluster = LocalCluster::start(ClusterSpec {
        model_dir: dir,
        declare_exits,
        device_exit,
        edge_exit,
        certs_dir: tmp.join("certs"),
        policy,
        encoding,
        engine,
    })
    .await?;
    Ok(cluster)
}

/// Exits for a three-tier split: the family's own when it has three or more; otherwise
/// (a plain pretrained model such as SmolLM2 has one) exits declared at a third, two thirds
/// and the last layer, reusing the final norm and head until trained exits exist. Returns
/// what to declare and the exit points.
pub(crate) fn tier_exits(cfg: &flow_familial::ModelConfig) -> (Option<Vec<usize>>, Vec<usize>) {
    let exits = cfg.exit_points();
    let n = cfg.num_layers;
    if exits.len() >= 3 || n < 3 {
        return (None, exits);
    }
    let declared = vec![n / 3, 2 * n / 3, n - 1];
    (Some(declared.clone()), declared)
}

/// Where a family is cut for device, edge and cloud: the shallowest exit, the middle one
/// and the deepest. `what` names the command in the error for families with fewer than 3.
pub(crate) fn three_tier_exits(
    exits: &[usize],
    what: &str,
) -> anyhow::Result<(usize, usize, usize)> {
    anyhow::ensure!(
        exits.len() >= 3,
        "{what} needs a family with at least 3 exits (this one has {exits:?})"
    );
    Ok((exits[0], exits[exits.len() / 2], exits[exits.len() - 1]))
}
