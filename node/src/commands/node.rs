//! `flow-node --role device|edge|cloud ...`: run one node of a cluster.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use flow_node::planning::PlanningConfig;
use flow_node::{Agent, AgentConfig, EngineConfig, Stage};
use flow_partition::PlanInput;
use flow_protocol::transport::{certs, ParentName, Security};
use flow_protocol::{Encoding, InferMode, Policy, Role};
use serde::Deserialize;

/// Flags of a node. Every flag can also be set in the `--config` TOML file (same names,
/// with `_` for `-`); flags win over the file.
#[derive(clap::Args, Debug, Default)]
pub struct NodeArgs {
    /// This node's tier: device, edge or cloud.
    #[arg(long)]
    pub role: Option<Role>,
    /// TOML file with any of these settings.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Node name (must match its certificate's name). Default: the role.
    #[arg(long)]
    pub name: Option<String>,
    /// The model: an HF checkpoint directory, a GGUF file, or a name pulled with
    /// `flow-node model pull` (e.g. smollm2-135m-instruct).
    #[arg(value_parser = super::model_arg, long)]
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
    /// Parent address (device → edge, edge → cloud): `IP:PORT` or `HOST:PORT` (a DNS name
    /// such as a Kubernetes Service or a swarm service, resolved once at start). Repeat to
    /// add parents to fail over to, in preference order: a session that loses its parent
    /// continues on the next one, its hidden states re-sent (no token lost or changed);
    /// only with no parent reachable are tokens answered locally, marked degraded.
    #[arg(long)]
    pub parent: Vec<ParentArg>,
    /// Pin the DNS name in a parent's certificate, one per --parent in order (`*`: any
    /// name for that parent). Optional: by default any parent whose certificate is signed
    /// by the cluster CA (--ca) and carries a parent role (aiflow:role:edge or cloud for a
    /// device, cloud for an edge) is accepted, whatever its name; parents without a
    /// --parent-name are not pinned.
    #[arg(long, value_name = "NAME")]
    pub parent_name: Vec<String>,
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
    /// Serve the OpenAI-compatible HTTP API here (entry nodes), e.g. 127.0.0.1:8080. It
    /// binds before the model loads and answers /health with 503 until it is ready.
    #[arg(long)]
    pub http: Option<SocketAddr>,
    #[command(flatten)]
    pub api: super::api_args::ApiArgs,
    /// Threads for model compute.
    #[arg(long)]
    pub threads: Option<usize>,
    /// Default inference mode: route, escalate, speculate or local.
    #[arg(long)]
    pub mode: Option<InferMode>,
    /// Default confidence threshold (max softmax probability) for escalate.
    #[arg(long)]
    pub threshold: Option<f32>,
    /// Wire encoding of hidden states to the parent: f32, f16, bf16 or int8.
    #[arg(long)]
    pub encoding: Option<Encoding>,
    /// KV cache budget in MiB.
    #[arg(long)]
    pub kv_budget_mb: Option<usize>,
    /// Token budget of one engine iteration (default 4096): decodes first, then prefill
    /// chunks; longer prompts are split across iterations (chunked prefill), so a small
    /// budget keeps decodes smooth while a long prompt is prefilled.
    #[arg(long)]
    pub batch_tokens: Option<usize>,
    /// Entry node: further points inside --layers where the split may move at run time,
    /// e.g. `1,3` with `--layers 0..5`; their exits are loaded too and the plan (--plan)
    /// picks the cut among them and the end of --layers. The parent must host layers from
    /// the lowest split point on (it continues from whatever layer a request was cut at).
    #[arg(long, value_delimiter = ',')]
    pub split_points: Vec<usize>,
    /// Declare the family's exits, e.g. `10,20,29` (the last must be the last layer), for a
    /// model that ships with one exit (a pretrained GGUF such as SmolLM2): every node of the
    /// cluster must declare the same list. The declared exits reuse the final norm and head.
    #[arg(long, value_delimiter = ',')]
    pub exits: Vec<usize>,
    /// Re-plan at run time from live link estimates: FILE is the planner input as JSON
    /// (a PlanInput, or the report of `flow-node plan --json`, whose `input` is used). The
    /// first link is replaced by the measured estimate of the parent in use; new requests
    /// take the policy, uplink encoding and (with --split-points) the cut of the plan in
    /// force. Pin the upper boundaries to the loaded stages with `config.allowed_cuts`.
    /// `--plan auto`: no file, the node asks the planner at start: it plans from this
    /// machine's self-benchmark profile (cached), the calibration curves
    /// (MODEL/aiflow_calibration.json) and the live estimate of its uplink (priors as
    /// `flow-node plan`'s defaults), and hosts what it decides: the policy (which exits
    /// answer, at which threshold), the encoding and, at a device without --split-points,
    /// the cut among every exit inside --layers.
    #[arg(long, value_name = "FILE|auto")]
    pub plan: Option<PathBuf>,
    /// MoE families (cloud tier): serve each request with only its task's top experts
    /// resident. DIR is a pattern store written by `flow-node moe profile`; per request the
    /// node takes a signature at the first MoE layer it hosts, retrieves the nearest task
    /// pattern and runs with that pattern's --moe-experts experts per layer (paged in
    /// lazily, least recently used evicted under --moe-budget-mb, router renormalised).
    /// Resident expert memory is in /metrics (aiflow_moe_*).
    #[arg(long, value_name = "DIR")]
    pub moe_patterns: Option<PathBuf>,
    /// Experts kept per MoE layer with --moe-patterns (default: half of them, rounded up;
    /// at least the layer's expert count = unpruned output).
    #[arg(long, value_name = "K", requires = "moe_patterns")]
    pub moe_experts: Option<usize>,
    /// Memory budget of resident experts in MiB with --moe-patterns (default: room for
    /// two patterns' experts).
    #[arg(long, value_name = "MIB", requires = "moe_patterns")]
    pub moe_budget_mb: Option<usize>,
    /// Bytes per second (IP packets, both ways) a parent link may carry on average for a
    /// goodput probe to go (default 1000). Everything on the link counts: keep-alives, the
    /// tiny liveness probe that goes every second whatever the budget, requests. The link is
    /// estimated from the traffic it carries; a goodput probe goes only when a planner
    /// (--plan) reads a stale estimate and the link is under budget. 0: liveness only.
    #[arg(long, value_name = "BYTES_PER_S")]
    pub probe_budget: Option<f64>,
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
    parent: Option<OneOrMany<String>>,
    parent_name: Option<OneOrMany<String>>,
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
    batch_tokens: Option<usize>,
    split_points: Option<Vec<usize>>,
    exits: Option<Vec<usize>>,
    plan: Option<PathBuf>,
    moe_patterns: Option<PathBuf>,
    moe_experts: Option<usize>,
    moe_budget_mb: Option<usize>,
    probe_budget: Option<f64>,
}

/// A TOML value that may be one item or a list (`parent = "a"` or `parent = ["a", "b"]`).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T> OneOrMany<T> {
    fn into_vec(self) -> Vec<T> {
        match self {
            Self::One(x) => vec![x],
            Self::Many(v) => v,
        }
    }
}

/// A setting from the `--config` file, parsed as its flag would be.
fn from_file<T: std::str::FromStr<Err = flow_protocol::Error>>(
    key: &str,
    v: Option<String>,
) -> anyhow::Result<Option<T>> {
    v.map(|v| {
        v.parse()
            .map_err(|e| anyhow::anyhow!("--config {key}: {e}"))
    })
    .transpose()
}

/// A `--parent`: `IP:PORT`, or `HOST:PORT` resolved now (the first address the resolver
/// returns) and kept for re-resolving on every re-dial.
#[derive(Debug, Clone, PartialEq)]
pub struct ParentArg {
    addr: SocketAddr,
    host: Option<String>,
}

impl std::str::FromStr for ParentArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        use std::net::ToSocketAddrs;
        if let Ok(addr) = s.parse() {
            return Ok(Self { addr, host: None });
        }
        let addr = s
            .to_socket_addrs()
            .map_err(|e| {
                format!("{s:?}: {e} (expected IP:PORT or HOST:PORT, e.g. aiflow-edge:7000)")
            })?
            .next()
            .ok_or_else(|| format!("{s:?}: the name resolves to no address"))?;
        Ok(Self {
            addr,
            host: Some(s.to_string()),
        })
    }
}

/// `--parent-name` per parent, in order: a name pins, `*` or a missing one does not.
fn parent_pins(names: &[String], parents: usize) -> anyhow::Result<Vec<ParentName>> {
    // One name without a parent is tolerated (as before): nothing to pin.
    if names.len() > parents.max(1) {
        anyhow::bail!(
            "{} --parent-name for {} --parent; give at most one per parent, in the same order (or none: parents are verified by the cluster CA and the role in their certificate)",
            names.len(),
            parents
        );
    }
    (0..parents)
        .map(|i| match names.get(i).map(String::as_str) {
            None | Some("*") => Ok(ParentName::Any),
            Some(n) => {
                certs::check_node_name(n).with_context(|| format!("--parent-name {n}"))?;
                Ok(ParentName::from(n))
            }
        })
        .collect()
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
    let role: Role = match a.role {
        Some(r) => r,
        None => from_file("role", f.role)?
            .context("--role is required (device, edge or cloud); see flow-node --help")?,
    };
    let model = a
        .model
        .or(f
            .model
            .map(|m| super::model_arg(&m.to_string_lossy()).map_err(anyhow::Error::msg))
            .transpose()?)
        .context(
            "--model is required: a pulled name (`flow-node model pull smollm2-135m-instruct`), \
             a GGUF file or an HF checkpoint directory",
        )?;
    let layers = a
        .layers
        .or(f.layers)
        .context("--layers A..B is required (which trunk layers this node hosts)")?;
    let (start, end) = parse_layers(&layers)?;
    let security = security(
        a.insecure_loopback || f.insecure_loopback.unwrap_or(false),
        a.ca.or(f.ca),
        a.cert.or(f.cert),
        a.key.or(f.key),
    )?;
    let parents = if a.parent.is_empty() {
        let file = f.parent.map(OneOrMany::into_vec).unwrap_or_default();
        file.iter()
            .map(|p| p.parse().map_err(|e| anyhow::anyhow!("parent {e}")))
            .collect::<anyhow::Result<_>>()?
    } else {
        a.parent
    };
    let names = if a.parent_name.is_empty() {
        f.parent_name.map(OneOrMany::into_vec).unwrap_or_default()
    } else {
        a.parent_name
    };
    let pins = parent_pins(&names, parents.len())?;
    let parent_hosts = parents.iter().map(|p| p.host.clone()).collect();
    let mut parents: Vec<(SocketAddr, ParentName)> = parents
        .into_iter()
        .zip(pins)
        .map(|(p, pin)| (p.addr, pin))
        .collect();
    let parent = (!parents.is_empty()).then(|| parents.remove(0));
    let mut policy = Policy::default();
    if let Some(m) = a
        .mode
        .map_or_else(|| from_file("mode", f.mode), |m| Ok(Some(m)))?
    {
        policy.mode = m;
    }
    if let Some(t) = a.threshold.or(f.threshold) {
        policy.default_threshold = t;
    } else if let Some((thresholds, measure)) = super::calibrate::calibrated_policy(&model)? {
        eprintln!(
            "escalation thresholds from {}: {}",
            model.join(super::calibrate::FILE_NAME).display(),
            super::calibrate::describe(&thresholds)
        );
        policy.thresholds = thresholds;
        policy.measure = measure;
    }
    let encoding = match a.encoding {
        Some(e) => e,
        None => from_file("encoding", f.encoding)?.unwrap_or(Encoding::F32),
    };
    let mut engine = EngineConfig::default();
    if let Some(t) = a.threads.or(f.threads) {
        engine.threads = t.max(1);
    }
    if let Some(mb) = a.kv_budget_mb.or(f.kv_budget_mb) {
        engine.kv_budget_bytes = mb << 20;
    }
    if let Some(t) = a.batch_tokens.or(f.batch_tokens) {
        anyhow::ensure!(t > 0, "--batch-tokens must be positive");
        engine.max_batch_tokens = t;
    }
    let mut split_points = if a.split_points.is_empty() {
        f.split_points.unwrap_or_default()
    } else {
        a.split_points
    };
    let mut probe = flow_node::parent::ProbeConfig::default();
    if let Some(b) = a.probe_budget.or(f.probe_budget) {
        anyhow::ensure!(
            b.is_finite() && b >= 0.0,
            "--probe-budget must be a number of bytes per second ≥ 0, got {b}"
        );
        probe.budget.bytes_per_s = b;
    }
    let planning = match a.plan.or(f.plan) {
        Some(p) if p.as_os_str() == "auto" => {
            anyhow::ensure!(
                parent.is_some(),
                "--plan auto plans this node's share with its parent: give --parent"
            );
            let auto = auto_planning(&model, role)?;
            if split_points.is_empty() && role == Role::Device {
                // Let the plan choose the cut among every exit inside --layers.
                split_points = auto
                    .exit_depths
                    .iter()
                    .map(|&(p, _)| p as usize)
                    .filter(|&p| p > start && p < end)
                    .collect();
            }
            Some(auto)
        }
        Some(p) => Some(planning_from_file(&p, &model)?),
        None => None,
    };
    let moe = match a.moe_patterns.or(f.moe_patterns) {
        Some(patterns) => Some(moe_pruning(
            &model,
            patterns,
            a.moe_experts.or(f.moe_experts),
            a.moe_budget_mb.or(f.moe_budget_mb),
        )?),
        None => None,
    };
    let cfg = AgentConfig {
        node_id: a
            .name
            .or(f.name)
            .unwrap_or_else(|| role.as_str().to_string()),
        role,
        model_dir: model,
        declare_exits: match (a.exits.is_empty(), f.exits) {
            (false, _) => Some(a.exits),
            (true, Some(e)) if !e.is_empty() => Some(e),
            _ => None,
        },
        stage: Stage {
            a: start,
            b: end,
            exit: !(a.no_exit || f.no_exit.unwrap_or(false)),
        },
        listen: a.listen.or(f.listen),
        parent,
        fallback_parents: parents,
        parent_hosts,
        probe,
        planning,
        split_points,
        security,
        parent_encoding: encoding,
        engine,
        default_policy: policy,
        moe,
    };
    Ok((cfg, a.http.or(f.http)))
}

/// `--moe-patterns/--moe-experts/--moe-budget-mb` with their defaults from the family.
fn moe_pruning(
    model: &Path,
    patterns: PathBuf,
    experts: Option<usize>,
    budget_mb: Option<usize>,
) -> anyhow::Result<flow_node::MoePruning> {
    let cfg = flow_familial::source::model_config(model)?;
    let spec = cfg
        .ffn
        .iter()
        .find_map(|f| match f {
            flow_familial::config::Ffn::Moe(s) => Some(s.clone()),
            flow_familial::config::Ffn::Dense { .. } => None,
        })
        .with_context(|| {
            format!(
                "--moe-patterns: {} is not an MoE family (no MoE layer)",
                model.display()
            )
        })?;
    let experts = experts.unwrap_or(spec.num_experts.div_ceil(2));
    anyhow::ensure!(experts > 0, "--moe-experts must be at least 1");
    let per_expert = 3 * cfg.hidden_size * spec.expert_intermediate * 4;
    let layers = cfg
        .ffn
        .iter()
        .filter(|f| matches!(f, flow_familial::config::Ffn::Moe(_)))
        .count();
    let budget_bytes = match budget_mb {
        Some(mb) => mb << 20,
        None => 2 * layers * experts.min(spec.num_experts) * per_expert,
    };
    Ok(flow_node::MoePruning {
        patterns,
        experts,
        budget_bytes,
    })
}

/// Run-time planning from a planner input file (see `--plan`), with the family's exit
/// depths and the default hysteresis, checked every second.
fn planning_from_file(p: &Path, model: &Path) -> anyhow::Result<PlanningConfig> {
    let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
    let input = flow_node::planning::plan_input_from_json(&text)
        .with_context(|| format!("reading {}", p.display()))?;
    planning_config(input, model)
}

/// `--plan auto`: the planner input `flow-node plan --model MODEL` builds with its default
/// links and tiers (this machine's cached self-benchmark profile, the calibration curves);
/// an edge drops the device tier and plans edge + cloud. The first link is replaced by the
/// live estimate of the parent from the first check on, so the priors only seed it.
fn auto_planning(model: &Path, role: Role) -> anyhow::Result<PlanningConfig> {
    let pa = super::plan::PlanArgs {
        threads: Some(1),
        ..super::plan::PlanArgs::defaults(model.to_path_buf())
    };
    let (mut input, profile, accuracy) =
        super::calibrate::in_pool(Some(1), || super::plan::planner_input(&pa))?;
    if role == Role::Edge {
        input.tiers.remove(0);
        input.links.remove(0);
    }
    tracing::info!(%profile, %accuracy, tiers = input.tiers.len(), "--plan auto: planner input");
    planning_config(input, model)
}

/// Run-time planning of `input` for the family in `model`: its exit depths, the default
/// hysteresis, checked every second.
fn planning_config(input: PlanInput, model: &Path) -> anyhow::Result<PlanningConfig> {
    let cfg = flow_familial::source::model_config(model)
        .with_context(|| format!("reading {}", model.join("config.json").display()))?;
    Ok(PlanningConfig::for_family(input, &cfg))
}

pub fn run(a: NodeArgs) -> anyhow::Result<()> {
    let api = a.api.options();
    let (cfg, http) = agent_config(a)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        // The API binds first: /health answers 503 while the model loads.
        let mut api_task = None;
        if let Some(h) = http {
            let (addr, task, ready) = flow_node::http::serve_loading(h, &api).await?;
            eprintln!("HTTP API on http://{addr} (/v1/chat/completions, /metrics; /health is 503 until the model is loaded)");
            api_task = Some((task, ready));
        }
        let agent = Agent::start(cfg).await?;
        if let Some(addr) = agent.local_addr() {
            eprintln!("{} listening on {addr} (QUIC)", agent.config().node_id);
        }
        if let Some((_, ready)) = &api_task {
            ready.set(agent.clone());
        }
        // SIGTERM too: in a container flow-node is PID 1, which the kernel never kills with
        // a signal it does not handle, so `docker stop` would wait out its grace period
        super::shutdown_signal().await?;
        eprintln!("shutting down: refusing new requests and child sessions (children move to their next parent), finishing in-flight ones (at most 30 s)");
        agent.shutdown().await;
        Ok(())
    })
}

/// The transport security from the certificate flags: loopback without certificates, or
/// mTLS with all three of `--ca`, `--cert` and `--key`.
pub(crate) fn security(
    insecure_loopback: bool,
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
) -> anyhow::Result<Security> {
    if insecure_loopback {
        return Ok(Security::InsecureLoopback);
    }
    Ok(Security::Mtls {
        ca: ca.context("--ca is required (or --insecure-loopback)")?,
        cert: cert.context("--cert is required")?,
        key: key.context("--key is required")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use flow_familial::init::{init_checkpoint, Preset};
    use flow_partition::planner::{ExitSpec, ModelShape, TierRole, TierSpec};
    use flow_partition::profile::{BlockCost, Linear, NodeProfile, ProfileKey};
    use flow_partition::{LinkEstimate, PlannerConfig};

    #[test]
    fn parents_by_ip_or_dns_name() {
        let ip: ParentArg = "10.0.0.2:7000".parse().unwrap();
        assert_eq!(ip.addr, "10.0.0.2:7000".parse::<SocketAddr>().unwrap());
        assert_eq!(ip.host, None);
        // A name (a Kubernetes Service, a swarm service) resolves at start and is kept
        // for re-dials.
        let named: ParentArg = "localhost:7000".parse().unwrap();
        assert_eq!(named.addr.port(), 7000);
        assert_eq!(named.host.as_deref(), Some("localhost:7000"));
        let e = "aiflow-edge".parse::<ParentArg>().unwrap_err();
        assert!(e.contains("HOST:PORT"), "{e}");
    }

    #[test]
    fn parent_names_are_optional_pins() {
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            parent_pins(&[], 2).unwrap(),
            vec![ParentName::Any, ParentName::Any]
        );
        assert_eq!(
            parent_pins(&names(&["edge-1"]), 2).unwrap(),
            vec!["edge-1".into(), ParentName::Any],
            "a parent without a --parent-name is not pinned"
        );
        assert_eq!(
            parent_pins(&names(&["*", "edge-2"]), 2).unwrap(),
            vec![ParentName::Any, "edge-2".into()]
        );
        assert!(parent_pins(&names(&["cloud"]), 0).unwrap().is_empty());
        let e = parent_pins(&names(&["a", "b"]), 1).unwrap_err();
        assert!(format!("{e:#}").contains("at most one per parent"), "{e:#}");
        let e = parent_pins(&names(&["not a name"]), 1).unwrap_err();
        assert!(
            format!("{e:#}").contains("--parent-name not a name"),
            "{e:#}"
        );
    }

    /// A made-up two-tier planner input for the tiny family.
    fn input() -> PlanInput {
        let cost = BlockCost {
            prefill: Linear { a: 1.0, b: 0.1 },
            decode: Linear { a: 1.0, b: 0.0 },
            weight_bytes: 1 << 20,
            kv_bytes_per_token: 1024,
        };
        let key = ProfileKey {
            model_fingerprint: "tiny".into(),
            cpu: "made-up".into(),
        };
        let prof = NodeProfile::uniform(key, 6, cost, &[1, 3, 6], cost, cost);
        let tier = |role| TierSpec {
            role,
            profile: prof.clone(),
            memory_limit_bytes: 1 << 30,
            load_factor: 1.0,
            compute_power_w: 0.0,
            radio_power_w: 0.0,
        };
        PlanInput {
            model: ModelShape {
                num_layers: 6,
                hidden_size: 64,
                token_id_bytes: 4,
                exits: [1, 3, 6]
                    .iter()
                    .map(|&depth| ExitSpec {
                        depth,
                        curve: vec![],
                    })
                    .collect(),
            },
            tiers: vec![tier(TierRole::Device), tier(TierRole::Edge)],
            links: vec![LinkEstimate::fixed(5.0, 10e6)],
            config: PlannerConfig::default(),
        }
    }

    #[test]
    fn plan_auto_asks_the_planner_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("m");
        init_checkpoint(Preset::Tiny, flow_familial::Layout::RuyiQwen2, 1, &model).unwrap();
        let args = |role: &str, layers: &str, parent: bool| NodeArgs {
            role: Some(role.parse().unwrap()),
            model: Some(model.clone()),
            layers: Some(layers.into()),
            parent: if parent {
                vec!["127.0.0.1:9".parse().unwrap()]
            } else {
                vec![]
            },
            insecure_loopback: true,
            plan: Some("auto".into()),
            ..NodeArgs::default()
        };
        let (cfg, _) = agent_config(args("device", "0..5", true)).unwrap();
        // Every exit inside the device's layers is a cut the plan may choose.
        assert_eq!(cfg.split_points, vec![1, 3]);
        let p = cfg.planning.expect("planning configured");
        assert_eq!(p.input.tiers.len(), 3);
        assert_eq!(p.exit_depths, vec![(1, 1), (3, 3), (5, 6)]);
        // An edge plans its own share with the cloud.
        let (cfg, _) = agent_config(args("edge", "1..3", true)).unwrap();
        assert_eq!(cfg.planning.expect("planning").input.tiers.len(), 2);
        // Without a parent there is nothing to plan with.
        let e = agent_config(args("device", "0..3", false)).unwrap_err();
        assert!(format!("{e:#}").contains("--plan auto"), "{e:#}");
    }

    #[test]
    fn plan_and_split_points_from_flags_and_toml() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("m");
        init_checkpoint(Preset::Tiny, flow_familial::Layout::RuyiQwen2, 1, &model).unwrap();
        // `flow-node plan --json` report form: its `input` is used.
        let report = dir.path().join("report.json");
        let v = serde_json::json!({ "input": input(), "adaptive": {} });
        std::fs::write(&report, v.to_string()).unwrap();
        let args = NodeArgs {
            role: Some(Role::Device),
            model: Some(model.clone()),
            layers: Some("0..3".into()),
            parent: vec!["127.0.0.1:9".parse().unwrap()],
            insecure_loopback: true,
            split_points: vec![1],
            plan: Some(report),
            ..NodeArgs::default()
        };
        let (cfg, _) = agent_config(args).unwrap();
        assert_eq!(cfg.split_points, vec![1]);
        let p = cfg.planning.expect("planning configured");
        assert_eq!(p.input, input());
        assert_eq!(p.exit_depths, vec![(1, 1), (3, 3), (5, 6)]);

        // TOML, with a bare PlanInput.
        let plan = dir.path().join("plan.json");
        std::fs::write(&plan, serde_json::to_string(&input()).unwrap()).unwrap();
        let toml = dir.path().join("device.toml");
        std::fs::write(
            &toml,
            format!(
                "role = \"device\"\nmodel = {:?}\nlayers = \"0..5\"\nparent = \"127.0.0.1:9\"\ninsecure_loopback = true\nsplit_points = [1, 3]\nplan = {:?}\n",
                model.display().to_string(),
                plan.display().to_string()
            ),
        )
        .unwrap();
        let (cfg, _) = agent_config(NodeArgs {
            config: Some(toml),
            ..NodeArgs::default()
        })
        .unwrap();
        assert_eq!(cfg.split_points, vec![1, 3]);
        assert!(cfg.planning.is_some());

        // Not a planner input: a clear error naming the file.
        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, "{\"tiers\": 3}").unwrap();
        let e = agent_config(NodeArgs {
            role: Some(Role::Device),
            model: Some(model),
            layers: Some("0..3".into()),
            insecure_loopback: true,
            plan: Some(bad),
            ..NodeArgs::default()
        })
        .unwrap_err();
        assert!(format!("{e:#}").contains("not a planner input"), "{e:#}");
    }
}
