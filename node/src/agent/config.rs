//! What an agent starts from: [`AgentConfig`], and [`AgentBuilder`], the embedded API's
//! way to configure and start an [`Agent`].

use std::net::SocketAddr;
use std::path::PathBuf;

use flow_familial::ModelSource;
use flow_protocol::transport::{ParentName, Security};
use flow_protocol::{Encoding, Policy, Role};

use super::Agent;
use crate::engine::{EngineConfig, Stage};
use crate::error::Result;
use crate::parent::ProbeConfig;
use crate::planning::PlanningConfig;

/// Everything needed to start an agent.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub node_id: String,
    pub role: Role,
    pub model_dir: PathBuf,
    /// Exit points to declare on a plain (non-Ruyi) checkpoint.
    pub declare_exits: Option<Vec<usize>>,
    /// Trunk layers `[a, b)` this node hosts; the exit at `b` is hosted when `exit`.
    pub stage: Stage,
    /// Address to accept children on (QUIC/UDP).
    pub listen: Option<SocketAddr>,
    /// Parent address and the DNS name its certificate must carry ([`ParentName::Any`]:
    /// any name; the parent is verified by the cluster CA and its role).
    pub parent: Option<(SocketAddr, ParentName)>,
    /// Further parents to fail over to, in preference order (dialled when first needed).
    pub fallback_parents: Vec<(SocketAddr, ParentName)>,
    /// Per parent, primary first: the `HOST:PORT` it was named by, if any. A named parent
    /// is resolved again before every re-dial (it may come back at another address).
    pub parent_hosts: Vec<Option<String>>,
    /// How parent links are probed for the link estimates.
    pub probe: ProbeConfig,
    /// Run-time planning (policy and uplink encoding of new requests from live link
    /// estimates); `None` = the fixed `default_policy`.
    pub planning: Option<PlanningConfig>,
    /// Entry node: further points inside the hosted layers (`a < p < b`) where the split
    /// may move at run time; their exits are loaded too, and the plan chooses among them
    /// and `b`. Empty = the cut stays at `b`.
    pub split_points: Vec<usize>,
    pub security: Security,
    /// Wire encoding of hidden states sent to the parent.
    pub parent_encoding: Encoding,
    pub engine: EngineConfig,
    /// Policy for requests that do not set one.
    pub default_policy: Policy,
    /// MoE expert pruning (cloud tier): serve each request with only its task's top-k
    /// experts per layer resident. `None` = every expert resident.
    pub moe: Option<MoePruning>,
}

/// Expert pruning of an MoE family (`--moe-patterns DIR --moe-experts K`, see
/// `flow_moe::cloud`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MoePruning {
    /// Pattern store written by `flow-node moe profile`.
    pub patterns: PathBuf,
    /// Experts kept resident per MoE layer for a request's task.
    pub experts: usize,
    /// Memory budget of resident experts (bytes).
    pub budget_bytes: usize,
}

/// Builder for an [`Agent`] — the embedded API for running a node inside an application.
///
/// ```no_run
/// # async fn f() -> flow_node::Result<()> {
/// use flow_node::Agent;
/// use flow_protocol::transport::ParentName;
/// use flow_protocol::Role;
/// // A device hosting the first layer and exit 1, escalating to an edge (any edge
/// // certificate of the cluster CA; `"edge-1"` instead of `ParentName::Any` pins the name).
/// let agent = Agent::builder("models/small")
///     .role(Role::Device)
///     .layers(0..1)
///     .parent("10.0.0.2:7000".parse().unwrap(), ParentName::Any)
///     .start()
///     .await?;
/// let (tokens, stats) = agent
///     .generate_collect(flow_node::GenerateRequest::greedy(vec![256, 55, 43, 53, 61], 4))
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct AgentBuilder {
    cfg: AgentConfig,
    layers: Option<std::ops::Range<usize>>,
}

impl Agent {
    /// Start building an agent for the family in `model_dir`. Defaults: a device hosting
    /// the whole family (layers up to the deepest exit), no parent, no listener, escalate
    /// policy, f32 on the wire, one compute thread.
    pub fn builder(model_dir: impl Into<PathBuf>) -> AgentBuilder {
        AgentBuilder {
            cfg: AgentConfig {
                node_id: "device".into(),
                role: Role::Device,
                model_dir: model_dir.into(),
                declare_exits: None,
                stage: Stage {
                    a: 0,
                    b: 0,
                    exit: true,
                },
                listen: None,
                parent: None,
                fallback_parents: Vec::new(),
                parent_hosts: Vec::new(),
                probe: ProbeConfig::default(),
                planning: None,
                split_points: Vec::new(),
                security: Security::InsecureLoopback,
                parent_encoding: Encoding::F32,
                engine: EngineConfig::default(),
                default_policy: Policy::default(),
                moe: None,
            },
            layers: None,
        }
    }
}

impl AgentBuilder {
    /// The node's tier.
    pub fn role(mut self, role: Role) -> Self {
        self.cfg.role = role;
        self
    }
    /// The node's name (its certificate's name under mTLS).
    pub fn node_id(mut self, id: impl Into<String>) -> Self {
        self.cfg.node_id = id.into();
        self
    }
    /// Host trunk layers `a..b` and the exit at `b`.
    pub fn layers(mut self, r: std::ops::Range<usize>) -> Self {
        self.layers = Some(r);
        self
    }
    /// Whether the exit at the end of the layers is hosted (default true).
    pub fn exit(mut self, exit: bool) -> Self {
        self.cfg.stage.exit = exit;
        self
    }
    /// Declare exit points on a plain llama/qwen2 checkpoint.
    pub fn declare_exits(mut self, points: Vec<usize>) -> Self {
        self.cfg.declare_exits = Some(points);
        self
    }
    /// Escalate to the parent at `addr`. Its certificate must chain to the cluster CA and
    /// carry a parent role; `name` pins its DNS name too (`"edge-1"`), or
    /// [`ParentName::Any`] accepts any name. Called again, adds a parent to fail over to
    /// (in preference order).
    pub fn parent(mut self, addr: SocketAddr, name: impl Into<ParentName>) -> Self {
        if self.cfg.parent.is_none() {
            self.cfg.parent = Some((addr, name.into()));
        } else {
            self.cfg.fallback_parents.push((addr, name.into()));
        }
        self
    }
    /// Plan the escalation policy and uplink encoding at run time from live link
    /// estimates.
    pub fn planning(mut self, p: PlanningConfig) -> Self {
        self.cfg.planning = Some(p);
        self
    }
    /// Entry node: further points where the split may move at run time (see
    /// [`AgentConfig::split_points`]).
    pub fn split_points(mut self, points: Vec<usize>) -> Self {
        self.cfg.split_points = points;
        self
    }
    /// How parent links are probed.
    pub fn probe(mut self, p: ProbeConfig) -> Self {
        self.cfg.probe = p;
        self
    }
    /// Accept children on `addr`.
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.cfg.listen = Some(addr);
        self
    }
    /// Authentication (mutual TLS in production).
    pub fn security(mut self, s: Security) -> Self {
        self.cfg.security = s;
        self
    }
    /// Default inference policy.
    pub fn policy(mut self, p: Policy) -> Self {
        self.cfg.default_policy = p;
        self
    }
    /// Wire encoding of hidden states to the parent.
    pub fn encoding(mut self, e: Encoding) -> Self {
        self.cfg.parent_encoding = e;
        self
    }
    /// Threads for model compute.
    pub fn threads(mut self, n: usize) -> Self {
        self.cfg.engine.threads = n.max(1);
        self
    }
    /// KV cache budget in bytes.
    pub fn kv_budget_bytes(mut self, n: usize) -> Self {
        self.cfg.engine.kv_budget_bytes = n;
        self
    }
    /// The configuration this builder would start.
    pub fn config(&self) -> Result<AgentConfig> {
        let mut cfg = self.cfg.clone();
        let r = match &self.layers {
            Some(r) => r.clone(),
            None => {
                let mut mc = ModelSource::open(&cfg.model_dir)?.config()?;
                if let Some(p) = &cfg.declare_exits {
                    mc.declare_exits(p)?;
                }
                0..mc.last_exit().point
            }
        };
        cfg.stage.a = r.start;
        cfg.stage.b = r.end;
        Ok(cfg)
    }
    /// Load the model part and start the agent.
    pub async fn start(self) -> Result<Agent> {
        Agent::start(self.config()?).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_builder_sets_stage_parents_and_engine() {
        let primary: SocketAddr = "10.0.0.2:7000".parse().unwrap();
        let fallback: SocketAddr = "10.0.0.3:7000".parse().unwrap();
        let cfg = Agent::builder("models/small")
            .layers(0..3)
            .exit(false)
            .parent(primary, "edge")
            .parent(fallback, ParentName::Any)
            .threads(0)
            .config()
            .unwrap();
        assert_eq!((cfg.stage.a, cfg.stage.b, cfg.stage.exit), (0, 3, false));
        assert_eq!(cfg.parent, Some((primary, "edge".into())));
        assert_eq!(cfg.fallback_parents, vec![(fallback, ParentName::Any)]);
        assert_eq!(cfg.engine.threads, 1);
        assert_eq!(cfg.model_dir, PathBuf::from("models/small"));
        assert_eq!(cfg.role, Role::Device);
    }

    #[test]
    fn without_layers_the_builder_reads_the_family() {
        let e = Agent::builder("/nonexistent/aiflow-model")
            .config()
            .unwrap_err();
        assert!(
            matches!(
                e,
                crate::NodeError::Familial(_) | crate::NodeError::Model(_)
            ),
            "{e:?}"
        );
    }
}
