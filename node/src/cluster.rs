//! A device → edge → cloud cluster in one process, on loopback, over real QUIC with real
//! mutual TLS (a throwaway CA). Used by `flow-node demo`, the split benchmark and the
//! integration tests; each node is a full [`Agent`], exactly as in separate processes.

use std::path::{Path, PathBuf};

use flow_protocol::transport::{certs, Security};
use flow_protocol::{Encoding, Policy, Role};

use crate::agent::{Agent, AgentConfig};
use crate::engine::{EngineConfig, Stage};
use crate::error::{NodeError, Result};

/// Where to cut the family.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    pub model_dir: PathBuf,
    /// Exit points to declare on a plain checkpoint.
    pub declare_exits: Option<Vec<usize>>,
    /// The device hosts layers `[0, device_exit)` and that exit.
    pub device_exit: usize,
    /// The edge hosts `[device_exit, edge_exit)` and that exit; the cloud the rest and the
    /// deepest exit.
    pub edge_exit: usize,
    /// Directory for the throwaway CA and node certificates.
    pub certs_dir: PathBuf,
    pub policy: Policy,
    pub encoding: Encoding,
    pub engine: EngineConfig,
}

/// Three running agents.
#[derive(Debug)]
pub struct LocalCluster {
    pub device: Agent,
    pub edge: Agent,
    pub cloud: Agent,
}

fn mtls(dir: &Path, name: &str, role: Role) -> Result<Security> {
    let files = certs::issue(&dir.join("ca"), name, role, &dir.join(name))?;
    Ok(Security::Mtls {
        ca: dir.join("ca").join(certs::CA_CERT),
        cert: files.cert,
        key: files.key,
    })
}

impl LocalCluster {
    /// Start cloud, edge and device (in that order, each connecting to its parent).
    pub async fn start(spec: ClusterSpec) -> Result<Self> {
        let cfg = flow_familial::source::model_config(&spec.model_dir)?;
        let mut cfg = cfg;
        if let Some(p) = &spec.declare_exits {
            cfg.declare_exits(p)?;
        }
        let last = cfg.last_exit().point;
        if !(spec.device_exit < spec.edge_exit && spec.edge_exit < last) {
            return Err(NodeError::Config(format!(
                "need device exit < edge exit < deepest exit {last} (got {} and {})",
                spec.device_exit, spec.edge_exit
            )));
        }
        if !spec.certs_dir.join("ca").join(certs::CA_CERT).exists() {
            certs::init_ca(&spec.certs_dir.join("ca"))?;
        }
        let base = |role: Role, name: &str, stage: Stage| -> Result<AgentConfig> {
            Ok(AgentConfig {
                node_id: name.to_string(),
                role,
                model_dir: spec.model_dir.clone(),
                declare_exits: spec.declare_exits.clone(),
                stage,
                listen: None,
                parent: None,
                fallback_parents: Vec::new(),
                parent_hosts: Vec::new(),
                probe: crate::parent::ProbeConfig::default(),
                planning: None,
                split_points: Vec::new(),
                security: mtls(&spec.certs_dir, name, role)?,
                parent_encoding: spec.encoding,
                engine: spec.engine,
                default_policy: spec.policy.clone(),
                moe: None,
            })
        };
        let loopback: std::net::SocketAddr = "127.0.0.1:0"
            .parse()
            .map_err(|_| NodeError::Internal("address".into()))?;
        let mut c = base(
            Role::Cloud,
            "cloud",
            Stage {
                a: spec.edge_exit,
                b: last,
                exit: true,
            },
        )?;
        c.listen = Some(loopback);
        let cloud = Agent::start(c).await?;
        let cloud_addr = cloud
            .local_addr()
            .ok_or_else(|| NodeError::Internal("cloud has no address".into()))?;
        let mut e = base(
            Role::Edge,
            "edge",
            Stage {
                a: spec.device_exit,
                b: spec.edge_exit,
                exit: true,
            },
        )?;
        e.listen = Some(loopback);
        e.parent = Some((cloud_addr, "cloud".into()));
        let edge = Agent::start(e).await?;
        let edge_addr = edge
            .local_addr()
            .ok_or_else(|| NodeError::Internal("edge has no address".into()))?;
        let mut d = base(
            Role::Device,
            "device",
            Stage {
                a: 0,
                b: spec.device_exit,
                exit: true,
            },
        )?;
        d.parent = Some((edge_addr, "edge".into()));
        let device = Agent::start(d).await?;
        Ok(Self {
            device,
            edge,
            cloud,
        })
    }

    /// Stop all three.
    pub async fn shutdown(&self) {
        self.device.shutdown().await;
        self.edge.shutdown().await;
        self.cloud.shutdown().await;
    }
}

/// A single node hosting the whole family (the reference the cluster is compared with).
/// `exit` = the exit it answers from (default: the deepest).
pub async fn single_node(
    model_dir: &Path,
    declare_exits: Option<Vec<usize>>,
    exit: Option<usize>,
    policy: Policy,
    engine: EngineConfig,
) -> Result<Agent> {
    let mut cfg = flow_familial::source::model_config(model_dir)?;
    if let Some(p) = &declare_exits {
        cfg.declare_exits(p)?;
    }
    let b = exit.unwrap_or(cfg.last_exit().point);
    Agent::start(AgentConfig {
        node_id: "single".into(),
        role: Role::Cloud,
        model_dir: model_dir.to_path_buf(),
        declare_exits,
        stage: Stage {
            a: 0,
            b,
            exit: true,
        },
        listen: None,
        parent: None,
        fallback_parents: Vec::new(),
        parent_hosts: Vec::new(),
        probe: crate::parent::ProbeConfig::default(),
        planning: None,
        split_points: Vec::new(),
        security: Security::InsecureLoopback,
        parent_encoding: Encoding::F32,
        engine,
        default_policy: policy,
        moe: None,
    })
    .await
}
