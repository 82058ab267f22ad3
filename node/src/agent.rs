//! [`Agent`]: one node of an aiflow cluster — its model part, engine, parent link, the
//! server for its children, and the entry-point API ([`Agent::generate`]).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use flow_familial::tokenizer::Tokenizer;
use flow_familial::ModelSource;
use flow_familial::{FamilialModel, ModelConfig, Part};
use flow_protocol::transport::{Endpoint, EndpointConfig, PeerConnection, Security, SessionStream};
use flow_protocol::{
    Capacity, Encoding, ErrorCode, Hello, HostedLayers, InferMode, Message, ModelFingerprint,
    Policy, Role, Sampling, TokenOut, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::engine::{EngineConfig, EngineHandle, Stage};
use crate::error::{NodeError, Result};
use crate::metrics::Metrics;
use crate::parent::{answer_probes, ParentLink, Parents, ProbeConfig};
use crate::planning::{apply, Applied, PlanningConfig};
use crate::session::{Driver, EntryRequest, Event, Session, SessionConfig};

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
    /// Parent address and the name in its certificate.
    pub parent: Option<(SocketAddr, String)>,
    /// Further parents to fail over to, in preference order (dialled when first needed).
    pub fallback_parents: Vec<(SocketAddr, String)>,
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

/// An OpenAI-style generation request at the entry node.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt: Vec<u32>,
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    /// `None` = the node's default policy.
    pub policy: Option<Policy>,
    pub stop_tokens: Vec<u32>,
}

/// What a generation stream yields.
#[derive(Debug, Clone)]
pub enum GenEvent {
    Token { token: TokenOut, degraded: bool },
    Done(GenStats),
    Error(String),
}

/// Per-request statistics (the `aiflow` extension of API responses).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct GenStats {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// `tier:exit` → tokens.
    pub tokens_per_exit: std::collections::BTreeMap<String, usize>,
    pub bytes_up: u64,
    pub hops: u32,
    pub degraded_tokens: usize,
    /// Times the request moved to another parent after losing one.
    pub failovers: u32,
    /// Layer where the entry node's part of this request ended (the cut it ran with).
    pub cut: usize,
    pub drafts_proposed: usize,
    pub drafts_accepted: usize,
    pub ttft_ms: f64,
    pub total_ms: f64,
    pub finish_reason: String,
}

struct Inner {
    cfg: AgentConfig,
    model_cfg: ModelConfig,
    /// The engine new sessions run on (swapped when a delta is applied).
    engine: crate::fleet::EngineSlot,
    /// Versioned weights, children, the update on offer (see [`crate::fleet`]).
    fleet: crate::fleet::FleetState,
    parents: Option<Arc<Parents>>,
    server: Option<Endpoint>,
    /// Run-time planning state (when configured and there is a parent).
    planner: Option<std::sync::Mutex<PlannerState>>,
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

struct PlannerState {
    cfg: PlanningConfig,
    replanner: flow_partition::Replanner,
    epoch: Instant,
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

fn digest_hex(d: &[u8; 32]) -> String {
    hex::encode(&d[..8])
}

impl Agent {
    /// Load this node's part of the model, start the engine, listen for children and
    /// connect to the parent.
    pub async fn start(cfg: AgentConfig) -> Result<Self> {
        let dir = cfg.model_dir.clone();
        let source = ModelSource::open(&dir)?;
        let mut model_cfg = source.config()?;
        if let Some(points) = &cfg.declare_exits {
            model_cfg.declare_exits(points)?;
        }
        let Stage { a, b, exit } = cfg.stage;
        if exit && model_cfg.exit_index(b).is_err() {
            return Err(NodeError::Config(format!(
                "this node hosts layers {a}..{b} with an exit at {b}, but {b} is not an exit of the family (exits: {:?})",
                model_cfg.exit_points()
            )));
        }
        if cfg.parent.is_none() && !exit {
            return Err(NodeError::Config(
                "a node without a parent must host an exit (it answers every request)".into(),
            ));
        }
        let mut exits: Vec<usize> = if exit { vec![b] } else { vec![] };
        for &p in &cfg.split_points {
            if a != 0 || p <= a || p >= b {
                return Err(NodeError::Config(format!(
                    "split point {p}: split points are for the entry node and must lie strictly inside its layers {a}..{b}"
                )));
            }
            if model_cfg.exit_index(p).is_err() {
                return Err(NodeError::Config(format!(
                    "split point {p} is not an exit of the family (exits: {:?})",
                    model_cfg.exit_points()
                )));
            }
            if !exits.contains(&p) {
                exits.push(p);
            }
        }
        exits.sort_unstable();
        let part = Part {
            embed: a == 0,
            trunk: a..b,
            exits,
        };
        let (model, hello, store) = {
            let cfg2 = cfg.clone();
            let mc = model_cfg.clone();
            let part2 = part.clone();
            let src = source.clone();
            tokio::task::spawn_blocking(
                move || -> Result<(FamilialModel, Hello, crate::delta::WeightStore)> {
                    let all = FamilialModel::tensor_names(&mc, &Part::full(&mc))?;
                    let family = src.fingerprint(all.iter().map(String::as_str))?;
                    let hosted_names = FamilialModel::tensor_names(&mc, &part2)?;
                    let hosted = src.fingerprint(hosted_names.iter().map(String::as_str))?;
                    let (store, model) = match &src {
                        ModelSource::Gguf(_) | ModelSource::Family(_) => {
                            // GGUF weights stay quantized in the mapping; deltas (which need
                            // f32 copies of the hosted tensors) are refused on such nodes
                            // (and on family overlays, whose trunk is such a base).
                            let empty = std::collections::HashMap::new();
                            (
                                crate::delta::WeightStore::new(empty, family),
                                src.load_part(mc.clone(), part2.clone())?,
                            )
                        }
                        ModelSource::Hf(_) if cfg2.moe.is_some() => {
                            // Experts are paged in per task pattern (flow_moe::cloud); this node
                            // refuses deltas (see `Agent::apply_delta`), so its store is empty.
                            let model = FamilialModel::load_part_without_experts(
                                &cfg2.model_dir,
                                mc.clone(),
                                part2.clone(),
                            )?;
                            (
                                crate::delta::WeightStore::new(
                                    std::collections::HashMap::new(),
                                    family,
                                ),
                                model,
                            )
                        }
                        ModelSource::Hf(ck) => {
                            crate::fleet::load_store(ck, &mc, &part2, &all, family)?
                        }
                    };
                    let hello = Hello {
                        node_id: cfg2.node_id.clone(),
                        role: cfg2.role,
                        protocol_version: PROTOCOL_VERSION,
                        min_protocol_version: MIN_PROTOCOL_VERSION,
                        model: ModelFingerprint {
                            family: format!("{}:{}", mc.layout.model_type(), digest_hex(&family)),
                            digest: family,
                        },
                        hosted: vec![HostedLayers {
                            start: part2.trunk.start as u32,
                            end: part2.trunk.end as u32,
                            digest: hosted,
                        }],
                        capacity: Capacity {
                            max_sessions: 1024,
                            max_batch_tokens: cfg2.engine.max_batch_tokens as u32,
                            layer_tokens_per_s: 0.0,
                            free_memory_bytes: cfg2.engine.kv_budget_bytes as u64,
                        },
                    };
                    Ok((model, hello, store))
                },
            )
            .await
            .map_err(|e| NodeError::Internal(format!("model loading task: {e}")))??
        };
        let tokenizer = source.tokenizer()?;
        let add_bos = source.add_bos_token() && model_cfg.bos_token_id.is_some();
        let chat = source.chat()?;
        let pruning = match &cfg.moe {
            Some(m) => Some(
                flow_moe::cloud::PrunedServing::open(
                    &model,
                    &dir,
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
        let fleet = crate::fleet::FleetState::new(Arc::new(store), part.clone());
        let metrics = Arc::new(Metrics::default());
        let server = match cfg.listen {
            Some(addr) => {
                let ecfg = EndpointConfig::new(addr, cfg.security.clone(), hello.clone());
                Some(Endpoint::server(ecfg)?)
            }
            None => None,
        };
        let client = |addr: &SocketAddr| -> Result<Endpoint> {
            let bind: SocketAddr = if addr.is_ipv6() {
                "[::]:0"
                    .parse()
                    .map_err(|_| NodeError::Internal("bind".into()))?
            } else if addr.ip().is_loopback() {
                "127.0.0.1:0"
                    .parse()
                    .map_err(|_| NodeError::Internal("bind".into()))?
            } else {
                "0.0.0.0:0"
                    .parse()
                    .map_err(|_| NodeError::Internal("bind".into()))?
            };
            let mut ecfg = EndpointConfig::new(bind, cfg.security.clone(), hello.clone());
            // Parent links notice a dead parent in seconds, not at the default idle timeout.
            ecfg.keep_alive = cfg.probe.health.keep_alive;
            ecfg.idle_timeout = cfg.probe.health.idle_timeout;
            ecfg.parent_roles = match cfg.role {
                Role::Device => vec![Role::Edge, Role::Cloud],
                Role::Edge => vec![Role::Cloud],
                Role::Cloud => vec![],
            };
            Ok(Endpoint::client(ecfg)?)
        };
        let parents = match &cfg.parent {
            Some((addr, name)) => {
                let mut links = vec![
                    ParentLink::connect(
                        client(addr)?,
                        *addr,
                        name.clone(),
                        cfg.parent_encoding,
                        cfg.probe,
                    )
                    .await?,
                ];
                for (addr, name) in &cfg.fallback_parents {
                    links.push(ParentLink::lazy(
                        client(addr)?,
                        *addr,
                        name.clone(),
                        cfg.parent_encoding,
                        cfg.probe,
                    )?);
                }
                Some(Parents::new(links)?)
            }
            None if !cfg.fallback_parents.is_empty() => {
                return Err(NodeError::Config(
                    "fallback parents need a primary parent".into(),
                ))
            }
            None => None,
        };
        let (planner, applied) = match (&cfg.planning, &parents) {
            (Some(pc), Some(ps)) => {
                let mut input = pc.input.clone();
                if let Some(l) = input.links.first_mut() {
                    *l = ps.active().planning_estimate();
                }
                pin_entry_cuts(&mut input, &cfg, &pc.exit_depths);
                let replanner = flow_partition::Replanner::new(pc.replan, &input)
                    .map_err(|e| NodeError::Config(format!("planning: {e}")))?;
                let applied = apply(replanner.current(), &pc.exit_depths, pc.measure)?;
                tracing::info!(plan = %replanner.current().summary(), predicted_ms = replanner.current().predicted_latency_ms, "initial plan");
                (
                    Some(std::sync::Mutex::new(PlannerState {
                        cfg: pc.clone(),
                        replanner,
                        epoch: Instant::now(),
                    })),
                    Some(applied),
                )
            }
            (Some(_), None) => {
                return Err(NodeError::Config(
                    "run-time planning needs a parent (a node without one answers everything)"
                        .into(),
                ))
            }
            _ => (None, None),
        };
        let inner = Arc::new(Inner {
            cfg,
            model_cfg,
            engine,
            fleet,
            parents,
            server,
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
        if let Some(every) = agent
            .inner
            .cfg
            .planning
            .as_ref()
            .map(|p| p.check_interval.max(Duration::from_millis(10)))
        {
            let weak = Arc::downgrade(&agent.inner);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let Some(inner) = weak.upgrade() else { return };
                    if inner.draining.load(Ordering::Acquire) {
                        return;
                    }
                    Agent { inner }.check_plan();
                }
            });
        }
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
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        if let (true, Some(b)) = (self.inner.add_bos, self.inner.model_cfg.bos_token_id) {
            ids.push(b);
        }
        ids.extend(self.inner.tokenizer.encode(text)?);
        Ok(ids)
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

    /// The plan in force, when run-time planning is configured.
    pub fn current_plan(&self) -> Option<flow_partition::Plan> {
        let st = self.inner.planner.as_ref()?.lock().ok()?;
        Some(st.replanner.current().clone())
    }

    /// What the plan in force applies to new requests.
    pub fn applied_plan(&self) -> Option<Applied> {
        self.inner.applied.read().ok().and_then(|a| a.clone())
    }

    /// Re-plans so far.
    pub fn replans(&self) -> u64 {
        self.inner.replans.load(Ordering::Acquire)
    }

    /// Re-plans that moved this node's cut.
    pub fn split_moves(&self) -> u64 {
        self.inner.split_moves.load(Ordering::Acquire)
    }

    /// The stage a new request runs at this (entry) node when the plan cuts at `cut`:
    /// `None` when that cut is not loaded here. `cut: None` = the whole hosted stage.
    fn session_stage(&self, cut: Option<usize>) -> Option<Stage> {
        let st = self.inner.cfg.stage;
        match cut {
            None => Some(st),
            Some(c) if c == st.b => Some(st),
            Some(c) if st.a == 0 && self.inner.cfg.split_points.contains(&c) => Some(Stage {
                a: 0,
                b: c,
                exit: true,
            }),
            Some(_) => None,
        }
    }

    /// Feed the live link estimate of the parent in use to the re-planner (done every
    /// `check_interval` by a background task; callable directly). Returns whether the plan
    /// changed.
    pub fn check_plan(&self) -> bool {
        let (Some(planner), Some(parents)) = (&self.inner.planner, &self.inner.parents) else {
            return false;
        };
        let Ok(mut st) = planner.lock() else {
            return false;
        };
        let mut input = st.cfg.input.clone();
        let est = parents.active().planning_estimate();
        if let Some(l) = input.links.first_mut() {
            *l = est;
        }
        pin_entry_cuts(&mut input, &self.inner.cfg, &st.cfg.exit_depths);
        let now = st.epoch.elapsed().as_millis() as u64;
        let decision = match st.replanner.on_estimates(now, &input) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "re-planning failed; keeping the plan in force");
                return false;
            }
        };
        let flow_partition::Decision::Replan(plan) = decision else {
            return false;
        };
        match apply(&plan, &st.cfg.exit_depths, st.cfg.measure).and_then(|a| match a.cut {
            Some(c) if self.inner.cfg.stage.a == 0 && self.session_stage(Some(c)).is_none() => {
                Err(NodeError::Config(format!(
                    "the plan cuts at {c}, which this node has not loaded"
                )))
            }
            _ => Ok(a),
        }) {
            Ok(a) => {
                let old = self.applied_plan().and_then(|o| o.cut);
                if old != a.cut {
                    self.inner.split_moves.fetch_add(1, Ordering::AcqRel);
                    tracing::info!(from = ?old, to = ?a.cut, "split moved: new requests cut at the new layer, running ones keep theirs");
                }
                tracing::info!(
                    plan = %plan.summary(),
                    predicted_ms = plan.predicted_latency_ms,
                    rtt_ms = est.rtt_ms,
                    goodput_bps = est.goodput_bps,
                    "re-planned: new requests use the new plan, running ones keep theirs"
                );
                if let Ok(mut w) = self.inner.applied.write() {
                    *w = Some(a);
                }
                self.inner.replans.fetch_add(1, Ordering::AcqRel);
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "the new plan cannot be applied; keeping the old one");
                false
            }
        }
    }

    /// Prometheus lines for the parent links (live estimates, probes, fail-overs) and
    /// run-time planning (re-plans, predicted latency of the plan in force).
    pub fn planning_metrics(&self) -> String {
        use std::fmt::Write as _;
        let mut o = String::new();
        if let Some(ps) = &self.inner.parents {
            let gauges: [(&str, &str); 5] = [
                (
                    "aiflow_link_rtt_ms",
                    "Smoothed RTT of the parent link (ms).",
                ),
                (
                    "aiflow_link_goodput_bps",
                    "Smoothed goodput of the parent link (bit/s).",
                ),
                (
                    "aiflow_link_confidence",
                    "Confidence of the link estimate, 0..1.",
                ),
                (
                    "aiflow_link_probes_total",
                    "Probe rounds completed on the parent link.",
                ),
                (
                    "aiflow_link_up",
                    "1 when the last dial or probe of the parent link succeeded.",
                ),
            ];
            let active = ps.active();
            let rows: Vec<(String, [f64; 5])> = ps
                .all()
                .iter()
                .map(|l| {
                    let e = l.estimate();
                    (
                        format!(
                            "parent=\"{}\",active=\"{}\"",
                            l.addr(),
                            Arc::ptr_eq(l, &active)
                        ),
                        [
                            e.rtt_ms,
                            e.goodput_bps,
                            e.confidence,
                            l.probe_rounds() as f64,
                            f64::from(u8::from(l.reachable())),
                        ],
                    )
                })
                .collect();
            for (k, (name, help)) in gauges.iter().enumerate() {
                let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} gauge");
                for (labels, v) in &rows {
                    let _ = writeln!(o, "{name}{{{labels}}} {}", v[k]);
                }
            }
            let _ = writeln!(
                o,
                "# HELP aiflow_parent_failovers_total Requests moved to another parent after losing one.\n# TYPE aiflow_parent_failovers_total counter\naiflow_parent_failovers_total {}",
                ps.failovers()
            );
        }
        if let Some(p) = self.current_plan() {
            let _ = writeln!(
                o,
                "# HELP aiflow_replans_total Run-time re-plans.\n# TYPE aiflow_replans_total counter\naiflow_replans_total {}",
                self.replans()
            );
            let _ = writeln!(
                o,
                "# HELP aiflow_split_moves_total Re-plans that moved this node's cut.\n# TYPE aiflow_split_moves_total counter\naiflow_split_moves_total {}",
                self.split_moves()
            );
            let _ = writeln!(
                o,
                "# HELP aiflow_plan_predicted_ms Predicted latency per token of the plan in force (ms).\n# TYPE aiflow_plan_predicted_ms gauge\naiflow_plan_predicted_ms {}",
                p.predicted_latency_ms
            );
        }
        o
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

    // ----- serving children -------------------------------------------------------------

    async fn accept_loop(self) {
        let Some(server) = self.inner.server.as_ref() else {
            return;
        };
        while let Some(conn) = server.accept().await {
            match conn {
                Ok(c) => {
                    tracing::info!(child = %c.peer_hello().node_id, role = %c.peer_hello().role, addr = %c.remote_address(), "child connected");
                    if let Some(control) = c.take_control() {
                        tokio::spawn(answer_probes(control, server.config().codec.limits));
                    }
                    let me = self.clone();
                    let c = Arc::new(c);
                    self.inner.fleet.add_child(&c);
                    tokio::spawn(async move { me.serve_connection(c).await });
                }
                Err(e) => tracing::warn!(error = %e, "refused a child connection"),
            }
        }
    }

    async fn serve_connection(self, conn: Arc<PeerConnection>) {
        loop {
            match conn.accept_session().await {
                Ok(stream) => {
                    let me = self.clone();
                    let local = conn.remote_address().ip().is_loopback();
                    tokio::spawn(async move { me.serve_session(stream, local).await });
                }
                Err(e) => {
                    tracing::info!(child = %conn.peer_hello().node_id, reason = %e, "child connection ended");
                    return;
                }
            }
        }
    }

    /// Serves one child session. `from_loopback`: the child connected from this host;
    /// only such a peer may send operator requests (`flow-node fleet` push, rollback,
    /// round), since a child's certificate cannot tell an operator from a device.
    async fn serve_session(self, mut stream: SessionStream, from_loopback: bool) {
        let Ok(_guard) = self.enter() else {
            let _ = stream
                .send(&Message::error(
                    ErrorCode::Overloaded,
                    "this node is shutting down",
                    None,
                ))
                .await;
            return;
        };
        self.inner.metrics.sessions_served.inc();
        let mut tier: Option<Driver> = None;
        let hidden = self.inner.model_cfg.hidden_size;
        loop {
            let msg = match stream.recv().await {
                Ok(Some(m)) => m,
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!(error = %e, "child session ended");
                    break;
                }
            };
            let reply = match msg {
                Message::Continue(c) => match self.child_session(
                    &mut tier,
                    c.layer,
                    c.request_id,
                    &c.policy,
                    &c.sampling,
                ) {
                    Ok(t) => {
                        t.session_mut().on_continue(c, hidden, Instant::now());
                        child_reply(t).await
                    }
                    Err(e) => Err(e),
                },
                Message::Draft(d) => match self.child_session(
                    &mut tier,
                    d.layer,
                    d.request_id,
                    &d.policy,
                    &d.sampling,
                ) {
                    Ok(t) => {
                        t.session_mut().on_draft(d, hidden, Instant::now());
                        child_reply(t).await
                    }
                    Err(e) => Err(e),
                },
                Message::Cancel(_) | Message::Done(_) => break,
                Message::Heartbeat(_) => continue,
                // An operator's push, rollback or round request (`flow-node fleet`).
                m @ (Message::DeltaOffer(_)
                | Message::DeltaRollback(_)
                | Message::RoundUpdate(_))
                    if tier.is_none() =>
                {
                    if !from_loopback {
                        tracing::warn!(
                            kind = m.name(),
                            "refused an operator request from another host"
                        );
                        let _ = stream
                            .send(&Message::error(
                                ErrorCode::Unauthorized,
                                "operator requests (fleet push, rollback, round) are accepted only \
                                 from this node's own host: run `flow-node fleet` on it (e.g. \
                                 `docker exec`) against its loopback address",
                                None,
                            ))
                            .await;
                        return;
                    }
                    return crate::fleet::serve_fleet_session(self.clone(), m, stream).await;
                }
                other => Err(NodeError::Protocol(format!(
                    "unexpected {} on a request session",
                    other.name()
                ))),
            };
            let out = match reply {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(error = %e, "child request failed");
                    let code = match &e {
                        NodeError::Protocol(_) | NodeError::BadRequest(_) => ErrorCode::Malformed,
                        NodeError::Evicted(_) | NodeError::Unavailable(_) => ErrorCode::Overloaded,
                        _ => ErrorCode::Internal,
                    };
                    Message::error(code, e.to_string(), None)
                }
            };
            let is_err = matches!(out, Message::Error(_));
            if let Err(e) = stream.send(&out).await {
                tracing::debug!(error = %e, "could not reply to child");
                break;
            }
            if is_err {
                break;
            }
        }
        if let Some(mut t) = tier {
            t.close().await;
        }
        let _ = stream.finish();
    }

    /// The session of a child's request stream: created by its first message, starting
    /// at that message's `layer` (anywhere inside the hosted layers: the child's cut may
    /// have moved), and refusing a later message from another layer (its KV holds the
    /// layers it started with).
    fn child_session<'t>(
        &self,
        tier: &'t mut Option<Driver>,
        layer: u32,
        request: u64,
        policy: &Policy,
        sampling: &Sampling,
    ) -> Result<&'t mut Driver> {
        let hosted = self.inner.cfg.stage;
        let layer = layer as usize;
        if let Some(t) = tier {
            let a = t.session().stage().a;
            if layer != a {
                return Err(NodeError::Protocol(format!(
                    "message from layer {layer}, but this session started at layer {a}"
                )));
            }
            return Ok(t);
        }
        if layer < hosted.a || layer > hosted.b || (layer == hosted.b && !hosted.exit) {
            return Err(NodeError::Protocol(format!(
                "hidden states after layer {layer}, but this node hosts layers {}..{}",
                hosted.a, hosted.b
            )));
        }
        if layer == 0 {
            return Err(NodeError::Protocol(
                "hidden states after layer 0 are embeddings; send tokens to the entry node".into(),
            ));
        }
        let stage = Stage { a: layer, ..hosted };
        let cfg = self.session_config(request, policy.clone(), sampling.clone(), stage);
        let t = self.driver(Session::child(cfg, Instant::now()));
        Ok(tier.insert(t))
    }

    // ----- entry point ------------------------------------------------------------------

    /// Start generating; events stream on the returned bounded channel. The request runs on
    /// its own task; dropping the receiver cancels it.
    pub async fn generate(&self, req: GenerateRequest) -> Result<mpsc::Receiver<GenEvent>> {
        if self.inner.cfg.stage.a != 0 {
            return Err(NodeError::BadRequest(format!(
                "this node starts at layer {}; send requests to the entry (device) node",
                self.inner.cfg.stage.a
            )));
        }
        if req.prompt.is_empty() {
            return Err(NodeError::BadRequest("the prompt is empty".into()));
        }
        let max_pos = self.inner.model_cfg.max_position_embeddings;
        if req.prompt.len() + req.max_new_tokens > max_pos {
            return Err(NodeError::BadRequest(format!(
                "prompt ({}) + max_tokens ({}) exceeds the model's context of {max_pos} positions",
                req.prompt.len(),
                req.max_new_tokens
            )));
        }
        // A request without a policy takes the plan in force when it starts, and keeps it;
        // every request runs at the plan's cut in force when it starts (its KV here and
        // above holds exactly those layers).
        let applied = self.applied_plan();
        let stage = self
            .session_stage(applied.as_ref().and_then(|a| a.cut))
            .unwrap_or(self.inner.cfg.stage);
        let policy = match req.policy.clone() {
            Some(p) => p,
            None => applied
                .map(|a| a.policy)
                .unwrap_or_else(|| self.inner.cfg.default_policy.clone()),
        };
        self.check_policy(&policy)?;
        let guard = self.enter()?;
        let (tx, rx) = mpsc::channel(64);
        let me = self.clone();
        self.inner.metrics.requests.inc();
        tokio::spawn(async move {
            let _guard = guard;
            let t0 = Instant::now();
            let res = me.run_request(req, policy, stage, &tx, t0).await;
            match res {
                Ok(stats) => {
                    me.inner
                        .metrics
                        .request_latency
                        .observe(t0.elapsed().as_secs_f64());
                    let _ = tx.send(GenEvent::Done(stats)).await;
                }
                Err(e) => {
                    me.inner.metrics.request_errors.inc();
                    let _ = tx.send(GenEvent::Error(e.to_string())).await;
                }
            }
        });
        Ok(rx)
    }

    /// Classification / scoring: one forward pass through the same tiers (no generation).
    /// Returns the predicted next token with the tier, exit and confidence that produced it.
    pub async fn classify(&self, prompt: Vec<u32>, policy: Option<Policy>) -> Result<TokenOut> {
        let (toks, _) = self
            .generate_collect(GenerateRequest {
                prompt,
                max_new_tokens: 1,
                sampling: Sampling::default(),
                policy,
                stop_tokens: vec![],
            })
            .await?;
        toks.into_iter()
            .next()
            .ok_or_else(|| NodeError::Internal("classification produced no token".into()))
    }

    fn check_policy(&self, p: &Policy) -> Result<()> {
        if let Some(e) = p.answer_exit {
            if self.inner.model_cfg.exit_index(e as usize).is_err() {
                return Err(NodeError::BadRequest(format!(
                    "exit {e} is not an exit of this family (exits: {:?})",
                    self.inner.model_cfg.exit_points()
                )));
            }
        }
        if p.mode == InferMode::Speculate && !(1..=16).contains(&p.draft_len) {
            return Err(NodeError::BadRequest(format!(
                "draft_len {} must be in 1..=16",
                p.draft_len
            )));
        }
        Ok(())
    }

    /// Generate and collect everything (tests, the demo, the embedded API).
    pub async fn generate_collect(
        &self,
        req: GenerateRequest,
    ) -> Result<(Vec<TokenOut>, GenStats)> {
        let mut rx = self.generate(req).await?;
        let mut toks = Vec::new();
        while let Some(ev) = rx.recv().await {
            match ev {
                GenEvent::Token { token, .. } => toks.push(token),
                GenEvent::Done(s) => return Ok((toks, s)),
                GenEvent::Error(e) => return Err(NodeError::Unavailable(e)),
            }
        }
        Err(NodeError::Internal(
            "generation ended without a result".into(),
        ))
    }

    fn record(&self, stats: &mut GenStats, t: &TokenOut, degraded: bool, t0: Instant) {
        if stats.completion_tokens == 0 {
            stats.ttft_ms = t0.elapsed().as_secs_f64() * 1e3;
            self.inner.metrics.ttft.observe(stats.ttft_ms / 1e3);
        }
        stats.completion_tokens += 1;
        *stats
            .tokens_per_exit
            .entry(format!("{}:{}", t.tier, t.exit))
            .or_default() += 1;
        if degraded {
            stats.degraded_tokens += 1;
        }
        self.inner
            .metrics
            .tokens
            .add(format!("tier=\"{}\",exit=\"{}\"", t.tier, t.exit), 1);
    }

    /// One client request at this (entry) node, stepwise or speculative.
    async fn run_request(
        &self,
        req: GenerateRequest,
        policy: Policy,
        stage: Stage,
        tx: &mpsc::Sender<GenEvent>,
        t0: Instant,
    ) -> Result<GenStats> {
        let mut stats = GenStats {
            prompt_tokens: req.prompt.len(),
            finish_reason: "length".into(),
            cut: stage.b,
            ..GenStats::default()
        };
        let mut stop = req.stop_tokens.clone();
        stop.extend(self.inner.model_cfg.eos_token_ids.iter().copied());
        let cfg = self.session_config(tier_request_id(), policy, req.sampling.clone(), stage);
        let entry = EntryRequest {
            prompt: req.prompt,
            max_new_tokens: req.max_new_tokens,
            stop,
        };
        let mut d = self.driver(Session::entry(cfg, entry, t0));
        let result = async {
            loop {
                match d.next().await? {
                    Event::Token { token, degraded } => {
                        self.record(&mut stats, &token, degraded, t0);
                        if tx.send(GenEvent::Token { token, degraded }).await.is_err() {
                            stats.finish_reason = "cancelled".into();
                            return Ok(());
                        }
                    }
                    Event::Done(reason) => {
                        stats.finish_reason = reason.into();
                        return Ok(());
                    }
                    Event::Reply(m) => {
                        return Err(NodeError::Internal(format!(
                            "an entry session answered a child ({})",
                            m.name()
                        )))
                    }
                }
            }
        }
        .await;
        let s = d.session().stats();
        stats.bytes_up = s.bytes_up;
        stats.hops = s.hops;
        stats.failovers = s.failovers;
        stats.drafts_proposed = s.drafts_proposed;
        stats.drafts_accepted = s.drafts_accepted;
        let m = &self.inner.metrics;
        m.drafts_proposed.add(s.drafts_proposed as u64);
        m.drafts_accepted.add(s.drafts_accepted as u64);
        stats.total_ms = t0.elapsed().as_secs_f64() * 1e3;
        d.close().await;
        result.map(|_| stats)
    }
}

/// Run a child's message through its session: the reply for the child.
async fn child_reply(d: &mut Driver) -> Result<Message> {
    match d.next().await? {
        Event::Reply(m) => Ok(*m),
        other => Err(NodeError::Internal(format!(
            "a child session produced {other:?} instead of a reply"
        ))),
    }
}

/// The plan may cut an entry node only where it has loaded: boundary 0 of the planner
/// input is pinned to its split points and its hosted end (in planner depths). A node
/// further up (its layers do not start at 0) keeps the template's `allowed_cuts`.
fn pin_entry_cuts(
    input: &mut flow_partition::PlanInput,
    cfg: &AgentConfig,
    exit_depths: &[(u32, usize)],
) {
    if cfg.stage.a != 0 {
        return;
    }
    let depth = |p: usize| {
        exit_depths
            .iter()
            .find(|(e, _)| *e as usize == p)
            .map(|(_, d)| *d)
            .unwrap_or(p)
    };
    let mut cuts: Vec<usize> = cfg.split_points.iter().map(|&p| depth(p)).collect();
    cuts.push(depth(cfg.stage.b));
    cuts.sort_unstable();
    cuts.dedup();
    let allowed = &mut input.config.allowed_cuts;
    if allowed.is_empty() {
        allowed.push(cuts);
    } else {
        allowed[0] = cuts;
    }
}

fn tier_request_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
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

/// Builder for an [`Agent`] — the embedded API for running a node inside an application.
///
/// ```no_run
/// # async fn f() -> flow_node::Result<()> {
/// use flow_node::Agent;
/// use flow_protocol::Role;
/// // A device hosting the first layer and exit 1, escalating to an edge.
/// let agent = Agent::builder("models/small")
///     .role(Role::Device)
///     .layers(0..1)
///     .parent("10.0.0.2:7000".parse().unwrap(), "edge")
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
    /// Escalate to the parent at `addr` whose certificate is named `name`. Called again,
    /// adds a parent to fail over to (in preference order).
    pub fn parent(mut self, addr: SocketAddr, name: impl Into<String>) -> Self {
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

impl GenerateRequest {
    /// Greedy generation of up to `max_new_tokens` with the node's default policy.
    pub fn greedy(prompt: Vec<u32>, max_new_tokens: usize) -> Self {
        Self {
            prompt,
            max_new_tokens,
            sampling: Sampling::default(),
            policy: None,
            stop_tokens: vec![],
        }
    }
}
