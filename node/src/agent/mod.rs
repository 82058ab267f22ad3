//! [`Agent`]: one node of an aiflow cluster — its model part, engine, parent link, the
//! server for its children, and the entry-point API ([`Agent::generate`]).
//!
//! This module is the composition root: [`Agent::start`] wires the pieces together and
//! the agent's accessors live here. The pieces:
//! - `config` — [`AgentConfig`] and [`AgentBuilder`], the embedded API's configuration;
//! - `load` — the hosted part, the `Hello` fingerprints, loading the weights;
//! - `links` — the server endpoint and the parent links;
//! - `planner` — run-time planning (`--plan`): the plan in force and re-planning;
//! - `children` — serving the request streams of child tiers;
//! - `entry` — client requests at the entry node ([`Agent::generate`]).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use flow_familial::tokenizer::Tokenizer;
use flow_familial::{ModelConfig, ModelSource};
use flow_protocol::transport::Endpoint;
use flow_protocol::{Hello, Policy, Sampling};
use tokio::time::Instant;

use crate::engine::{EngineHandle, Stage};
use crate::error::{NodeError, Result};
use crate::metrics::Metrics;
use crate::parent::Parents;
use crate::planning::Applied;
use crate::session::{Driver, Session, SessionConfig};

mod children;
mod config;
mod entry;
mod links;
mod load;
mod planner;

pub use config::{AgentBuilder, AgentConfig, MoePruning};
pub use entry::{GenEvent, GenStats, GenerateRequest};

struct Inner {
    cfg: AgentConfig,
    model_cfg: ModelConfig,
    /// The engine new sessions run on (swapped when a delta is applied).
    engine: crate::fleet::EngineSlot,
    /// Versioned weights, children, the update on offer (see [`crate::fleet`]).
    fleet: crate::fleet::FleetState,
    parents: Option<Arc<Parents>>,
    server: Option<Endpoint>,
    /// This node's report of the tiers beyond it, for children on protocol 3 (a node with
    /// both parents and children; see [`crate::parent::upstream`]).
    upstream: Option<tokio::sync::watch::Receiver<flow_protocol::Upstream>>,
    /// Run-time planning state (when configured and there is a parent).
    planner: Option<std::sync::Mutex<planner::PlannerState>>,
    /// What the plan in force applies to new requests.
    applied: std::sync::RwLock<Option<Applied>>,
    replans: AtomicU64,
    /// Re-plans that moved this node's cut.
    split_moves: AtomicU64,
    metrics: Arc<Metrics>,
    tokenizer: Tokenizer,
    /// The model's own chat template (GGUF `tokenizer.chat_template` or HF
    /// `tokenizer_config.json`); `None` for the built-in byte-level families.
    chat: Option<flow_familial::chat::ChatTemplate>,
    /// Whether prompts start with BOS (the model's `add_bos_token`).
    add_bos: bool,
    next_session: AtomicU64,
    hello: Hello,
    /// Requests and child sessions in flight (drained on shutdown).
    inflight: AtomicUsize,
    draining: AtomicBool,
}

/// Decrements the in-flight count when dropped.
struct InflightGuard(Arc<Inner>);

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A weak handle to an agent (background tasks that must not keep it alive).
#[derive(Clone)]
pub(crate) struct WeakAgent(std::sync::Weak<Inner>);

impl WeakAgent {
    pub(crate) fn upgrade(&self) -> Option<Agent> {
        self.0.upgrade().map(|inner| Agent { inner })
    }
}

/// A running node. Cheap to clone.
#[derive(Clone)]
pub struct Agent {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("node", &self.inner.cfg.node_id)
            .field("role", &self.inner.cfg.role)
            .field("stage", &self.inner.cfg.stage)
            .finish()
    }
}

impl Agent {
    /// Load this node's part of the model, start the engine, listen for children and
    /// connect to the parent.
    pub async fn start(cfg: AgentConfig) -> Result<Self> {
        let source = ModelSource::open(&cfg.model_dir)?;
        let mut model_cfg = source.config()?;
        if let Some(points) = &cfg.declare_exits {
            model_cfg.declare_exits(points)?;
        }
        let part = load::part_of(&cfg, &model_cfg)?;
        let load::Loaded {
            model,
            hello,
            store,
        } = load::load(&cfg, &source, &model_cfg, &part).await?;
        let tokenizer = source.tokenizer()?;
        let add_bos = source.add_bos_token() && model_cfg.bos_token_id.is_some();
        let chat = source.chat()?;
        let pruning = match &cfg.moe {
            Some(m) => Some(
                flow_moe::cloud::PrunedServing::open(
                    &model,
                    &cfg.model_dir,
                    &m.patterns,
                    m.experts,
                    m.budget_bytes,
                )
                .map_err(|e| NodeError::Config(format!("MoE expert pruning: {e}")))?,
            ),
            None => None,
        };
        let engine = crate::fleet::EngineSlot::new(EngineHandle::spawn_pruned(
            model, cfg.stage, cfg.engine, pruning,
        )?);
        let fleet = crate::fleet::FleetState::new(Arc::new(store), part);
        let server = links::server(&cfg, &hello)?;
        let parents = links::connect_parents(&cfg, &hello).await?;
        let (planner, applied) = planner::start_planner(&cfg, parents.as_ref())?;
        let metrics = Arc::new(Metrics::new(model_cfg.max_position_embeddings));
        let upstream = match (&server, &parents) {
            (Some(_), Some(ps)) => {
                let (tx, rx) = tokio::sync::watch::channel(flow_protocol::Upstream::default());
                tokio::spawn(crate::parent::upstream::publish(
                    cfg.node_id.clone(),
                    Arc::downgrade(ps),
                    tx,
                ));
                Some(rx)
            }
            _ => None,
        };
        let inner = Arc::new(Inner {
            cfg,
            model_cfg,
            engine,
            fleet,
            parents,
            server,
            upstream,
            planner,
            applied: std::sync::RwLock::new(applied),
            replans: AtomicU64::new(0),
            split_moves: AtomicU64::new(0),
            metrics,
            tokenizer,
            chat,
            add_bos,
            next_session: AtomicU64::new(1),
            hello,
            inflight: AtomicUsize::new(0),
            draining: AtomicBool::new(false),
        });
        let agent = Agent { inner };
        crate::fleet::spawn_parent_sessions(&agent);
        if agent.inner.server.is_some() {
            let a2 = agent.clone();
            tokio::spawn(async move { a2.accept_loop().await });
        }
        planner::spawn_replanning(&agent);
        Ok(agent)
    }

    /// The address children connect to.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.inner.server.as_ref().and_then(|s| s.local_addr().ok())
    }

    /// This node's configuration.
    pub fn config(&self) -> &AgentConfig {
        &self.inner.cfg
    }

    /// The family's configuration.
    pub fn model_config(&self) -> &ModelConfig {
        &self.inner.model_cfg
    }

    /// The tokenizer of the family.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.inner.tokenizer
    }

    /// The model's chat template, if it has one.
    pub fn chat_template(&self) -> Option<&flow_familial::chat::ChatTemplate> {
        self.inner.chat.as_ref()
    }

    /// `text` as prompt token ids under the model's one BOS rule (`add_bos_token`).
    /// A text that already starts with BOS (a chat template writing `{{ bos_token }}`) gets
    /// no second one.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        let bos = self
            .inner
            .model_cfg
            .bos_token_id
            .filter(|_| self.inner.add_bos);
        Ok(self.inner.tokenizer.encode_prompt(text, bos)?)
    }

    /// Metrics of this node.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    pub(crate) fn fleet(&self) -> &crate::fleet::FleetState {
        &self.inner.fleet
    }

    pub(crate) fn engine_slot(&self) -> &crate::fleet::EngineSlot {
        &self.inner.engine
    }

    pub(crate) fn downgrade(&self) -> WeakAgent {
        WeakAgent(Arc::downgrade(&self.inner))
    }

    /// Our `Hello` (fingerprints).
    pub fn hello(&self) -> &Hello {
        &self.inner.hello
    }

    /// Engine statistics.
    pub async fn engine_stats(&self) -> crate::engine::EngineStats {
        self.inner.engine.get().stats().await
    }

    /// Shutting down: new requests and child sessions are refused (`/health` says 503, so
    /// load balancers and health checks move traffic elsewhere).
    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::Acquire)
    }

    /// Stop accepting children and close the parent link.
    pub async fn shutdown(&self) {
        self.drain(Duration::from_secs(30)).await;
        self.abort().await;
    }

    /// Stop at once, without draining: close every child connection and the parent
    /// links. In-flight child sessions see their connection close (their nodes degrade or
    /// fail over). For emergencies and crash tests; [`Agent::shutdown`] is the graceful way.
    pub async fn abort(&self) {
        self.inner.draining.store(true, Ordering::Release);
        if let Some(s) = &self.inner.server {
            s.close();
        }
        if let Some(ps) = &self.inner.parents {
            for p in ps.all() {
                p.close().await;
            }
        }
    }

    /// The parents of this node (in preference order) and the one in use.
    pub fn parents(&self) -> Option<&Arc<Parents>> {
        self.inner.parents.as_ref()
    }

    /// Refuse new requests and wait (up to `timeout`) for in-flight requests and child
    /// sessions to finish. Returns how many were still running at the timeout.
    pub async fn drain(&self, timeout: Duration) -> usize {
        self.inner.draining.store(true, Ordering::Release);
        let t0 = Instant::now();
        loop {
            let n = self.inner.inflight.load(Ordering::Acquire);
            if n == 0 || t0.elapsed() >= timeout {
                if n > 0 {
                    tracing::warn!(inflight = n, "shutting down with requests still running");
                }
                return n;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn enter(&self) -> Result<InflightGuard> {
        if self.inner.draining.load(Ordering::Acquire) {
            return Err(NodeError::Unavailable(
                "this node is shutting down; send the request to another node".into(),
            ));
        }
        self.inner.inflight.fetch_add(1, Ordering::AcqRel);
        Ok(InflightGuard(self.inner.clone()))
    }

    /// What every session of this node shares, for a request under `policy` at `stage`.
    fn session_config(
        &self,
        request: u64,
        policy: Policy,
        sampling: Sampling,
        stage: Stage,
    ) -> SessionConfig {
        let id = self.inner.next_session.fetch_add(1, Ordering::Relaxed)
            | ((std::process::id() as u64) << 40);
        let parents = self.inner.parents.as_ref();
        SessionConfig {
            id,
            request,
            role: self.inner.cfg.role,
            stage,
            policy,
            sampling,
            has_parent: parents.is_some(),
            keep_history: parents.is_some_and(|p| p.all().len() > 1),
            encoding: self.applied_plan().and_then(|a| a.uplink_encoding),
            degrade: flow_partition::DegradePolicy::default(),
        }
    }

    fn driver(&self, session: Session) -> Driver {
        Driver::new(
            session,
            self.inner.engine.get(),
            self.inner.parents.clone(),
            self.inner.metrics.clone(),
        )
    }
}

/// Wait helper for tests and the demo: poll until `f` is true or `timeout` passes.
pub async fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < timeout {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}
