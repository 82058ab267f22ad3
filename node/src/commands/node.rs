//! `flow-node --role device|edge|cloud ...`: run one node of a cluster.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use flow_node::{Agent, AgentConfig, EngineConfig, Stage};
use flow_protocol::transport::Security;
use flow_protocol::{Encoding, InferMode, Policy, Role};
use serde::Deserialize;

/// Flags of a node. Every flag can also be set in the `--config` TOML file (same names,
/// with `_` for `-`); flags win over the file.
#[derive(clap::Args, Debug, Default)]
pub struct NodeArgs {
    /// This node's tier: device, edge or cloud.
    #[arg(long)]
    pub role: Option<String>,
    /// TOML file with any of these settings.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Node name (must match its certificate's name). Default: the role.
    #[arg(long)]
    pub name: Option<String>,
    /// Model directory (config.json + safetensors + tokenizer.json).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Trunk layers this node hosts, `A..B` (the exit at B is hosted too unless --no-exit).
    #[arg(long)]
    pub layers: Option<String>,
    /// Do not host the exit at the end of --layers (a pure relay stage).
    #[arg(long)]
    pub no_exit: bool,
    /// UDP address to accept children on (edge, cloud), e.g. 0.0.0.0:7000.
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Parent address (device → edge, edge → cloud).
    #[arg(long)]
    pub parent: Option<SocketAddr>,
    /// Name in the parent's certificate. Default: the parent's role (edge or cloud).
    #[arg(long)]
    pub parent_name: Option<String>,
    /// Cluster CA certificate (from `flow-node certs init`).
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// This node's certificate and key (from `flow-node certs issue`).
    #[arg(long)]
    pub cert: Option<PathBuf>,
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// No client certificates; every address must be loopback. For local experiments only.
    #[arg(long)]
    pub insecure_loopback: bool,
    /// Serve the OpenAI-compatible HTTP API here (entry nodes), e.g. 127.0.0.1:8080.
    #[arg(long)]
    pub http: Option<SocketAddr>,
    /// Threads for model compute.
    #[arg(long)]
    pub threads: Option<usize>,
    /// Default inference mode: route, escalate, speculate or local.
    #[arg(long)]
    pub mode: Option<String>,
    /// Default confidence threshold (max softmax probability) for escalate.
    #[arg(long)]
    pub threshold: Option<f32>,
    /// Wire encoding of hidden states to the parent: f32, f16, bf16 or int8.
    #[arg(long)]
    pub encoding: Option<String>,
    /// KV cache budget in MiB.
    #[arg(long)]
    pub kv_budget_mb: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    role: Option<String>,
    name: Option<String>,
    model: Option<PathBuf>,
    layers: Option<String>,
    no_exit: Option<bool>,
    listen: Option<SocketAddr>,
    parent: Option<SocketAddr>,
    parent_name: Option<String>,
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    insecure_loopback: Option<bool>,
    http: Option<SocketAddr>,
    threads: Option<usize>,
    mode: Option<String>,
    threshold: Option<f32>,
    encoding: Option<String>,
    kv_budget_mb: Option<usize>,
}

pub fn parse_encoding(s: &str) -> anyhow::Result<Encoding> {
    Ok(match s {
        "f32" => Encoding::F32,
        "f16" => Encoding::F16,
        "bf16" => Encoding::Bf16,
        "int8" => Encoding::Int8,
        o => anyhow::bail!("unknown encoding {o:?} (f32, f16, bf16 or int8)"),
    })
}

fn parse_layers(s: &str) -> anyhow::Result<(usize, usize)> {
    let (a, b) = s
        .split_once("..")
        .with_context(|| format!("--layers {s:?}: expected A..B, e.g. 0..4"))?;
    let a: usize = a
        .trim()
        .parse()
        .with_context(|| format!("--layers {s:?}: bad start"))?;
    let b: usize = b
        .trim()
        .parse()
        .with_context(|| format!("--layers {s:?}: bad end"))?;
    anyhow::ensure!(a < b, "--layers {s:?}: the range is empty");
    Ok((a, b))
}

fn load_file(p: &Path) -> anyhow::Result<FileConfig> {
    let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
    toml::from_str(&text).with_context(|| format!("parsing {}", p.display()))
}

/// Merge flags over the file and build the agent configuration.
pub fn agent_config(a: NodeArgs) -> anyhow::Result<(AgentConfig, Option<SocketAddr>)> {
    let f = match &a.config {
        Some(p) => load_file(p)?,
        None => FileConfig::default(),
    };
    let role: Role = a
        .role
        .or(f.role)
        .context("--role is required (device, edge or cloud); see flow-node --help")?
        .parse()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let model = a
        .model
        .or(f.model)
        .context("--model DIR is required (a checkpoint from `flow-node model init` or HF)")?;
    let layers = a
        .layers
        .or(f.layers)
        .context("--layers A..B is required (which trunk layers this node hosts)")?;
    let (start, end) = parse_layers(&layers)?;
    let security = if a.insecure_loopback || f.insecure_loopback.unwrap_or(false) {
        Security::InsecureLoopback
    } else {
        Security::Mtls {
            ca: a
                .ca
                .or(f.ca)
                .context("--ca is required (or --insecure-loopback)")?,
            cert: a.cert.or(f.cert).context("--cert is required")?,
            key: a.key.or(f.key).context("--key is required")?,
        }
    };
    let parent = a.parent.or(f.parent);
    let parent_name = a.parent_name.or(f.parent_name).unwrap_or_else(|| {
        match role {
            Role::Device => "edge",
            _ => "cloud",
        }
        .to_string()
    });
    let mut policy = Policy::default();
    if let Some(m) = a.mode.or(f.mode) {
        policy.mode = m.parse::<InferMode>().map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    if let Some(t) = a.threshold.or(f.threshold) {
        policy.default_threshold = t;
    }
    let encoding = parse_encoding(&a.encoding.or(f.encoding).unwrap_or_else(|| "f32".into()))?;
    let mut engine = EngineConfig::default();
    if let Some(t) = a.threads.or(f.threads) {
        engine.threads = t.max(1);
    }
    if let Some(mb) = a.kv_budget_mb.or(f.kv_budget_mb) {
        engine.kv_budget_bytes = mb << 20;
    }
    let cfg = AgentConfig {
        node_id: a
            .name
            .or(f.name)
            .unwrap_or_else(|| role.as_str().to_string()),
        role,
        model_dir: model,
        declare_exits: None,
        stage: Stage {
            a: start,
            b: end,
            exit: !(a.no_exit || f.no_exit.unwrap_or(false)),
        },
        listen: a.listen.or(f.listen),
        parent: parent.map(|p| (p, parent_name)),
        security,
        parent_encoding: encoding,
        engine,
        default_policy: policy,
    };
    Ok((cfg, a.http.or(f.http)))
}

pub fn run(a: NodeArgs) -> anyhow::Result<()> {
    let (cfg, http) = agent_config(a)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let agent = Agent::start(cfg).await?;
        if let Some(addr) = agent.local_addr() {
            eprintln!("{} listening on {addr} (QUIC)", agent.config().node_id);
        }
        if let Some(h) = http {
            let (addr, _task) = flow_node::http::serve(agent.clone(), h).await?;
            eprintln!("HTTP API on http://{addr} (/v1/chat/completions, /metrics)");
        }
        tokio::signal::ctrl_c().await?;
        eprintln!("shutting down");
        agent.shutdown().await;
        Ok(())
    })
}
