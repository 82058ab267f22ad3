//! [`Agent`]: one node of an aiflow cluster — its model part, engine, parent link, the
//! server for its children, and the entry-point API ([`Agent::generate`]).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use candle_core::Tensor;
use flow_familial::tokenizer::Tokenizer;
use flow_familial::weights::Checkpoint;
use flow_familial::{FamilialModel, ModelConfig, Part};
use flow_protocol::transport::{Endpoint, EndpointConfig, PeerConnection, Security, SessionStream};
use flow_protocol::{
    Capacity, Encoding, ErrorCode, Hello, HostedLayers, InferMode, Message, ModelFingerprint,
    Policy, Role, Sampling, TokenOut, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::engine::{EngineConfig, EngineHandle, Input, Stage};
use crate::error::{NodeError, Result};
use crate::metrics::Metrics;
use crate::parent::ParentLink;
use crate::tier::{choose, from_wire, TierSession};

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
    pub security: Security,
    /// Wire encoding of hidden states sent to the parent.
    pub parent_encoding: Encoding,
    pub engine: EngineConfig,
    /// Policy for requests that do not set one.
    pub default_policy: Policy,
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
    pub drafts_proposed: usize,
    pub drafts_accepted: usize,
    pub ttft_ms: f64,
    pub total_ms: f64,
    pub finish_reason: String,
}

struct Inner {
    cfg: AgentConfig,
    model_cfg: ModelConfig,
    engine: EngineHandle,
    parent: Option<Arc<ParentLink>>,
    server: Option<Endpoint>,
    metrics: Arc<Metrics>,
    tokenizer: Tokenizer,
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
        let mut model_cfg = ModelConfig::from_file(&dir.join("config.json"))?;
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
        let part = Part {
            embed: a == 0,
            trunk: a..b,
            exits: if exit { vec![b] } else { vec![] },
        };
        let (model, hello) = {
            let cfg2 = cfg.clone();
            let mc = model_cfg.clone();
            let part2 = part.clone();
            tokio::task::spawn_blocking(move || -> Result<(FamilialModel, Hello)> {
                let ck = Checkpoint::open(&cfg2.model_dir)?;
                let all = FamilialModel::tensor_names(&mc, &Part::full(&mc))?;
                let family = ck.fingerprint(all.iter().map(String::as_str))?;
                let hosted_names = FamilialModel::tensor_names(&mc, &part2)?;
                let hosted = ck.fingerprint(hosted_names.iter().map(String::as_str))?;
                let model = FamilialModel::from_source(
                    mc.clone(),
                    part2.clone(),
                    &ck,
                    flow_familial::Mode::Infer,
                )?;
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
                Ok((model, hello))
            })
            .await
            .map_err(|e| NodeError::Internal(format!("model loading task: {e}")))??
        };
        let tokenizer = Tokenizer::from_dir(&dir)?;
        let engine = EngineHandle::spawn(model, cfg.stage, cfg.engine)?;
        let metrics = Arc::new(Metrics::default());
        let server = match cfg.listen {
            Some(addr) => {
                let ecfg = EndpointConfig::new(addr, cfg.security.clone(), hello.clone());
                Some(Endpoint::server(ecfg)?)
            }
            None => None,
        };
        let parent = match &cfg.parent {
            Some((addr, name)) => {
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
                ecfg.parent_roles = match cfg.role {
                    Role::Device => vec![Role::Edge, Role::Cloud],
                    Role::Edge => vec![Role::Cloud],
                    Role::Cloud => vec![],
                };
                let ep = Endpoint::client(ecfg)?;
                Some(Arc::new(
                    ParentLink::connect(ep, *addr, name.clone(), cfg.parent_encoding).await?,
                ))
            }
            None => None,
        };
        let inner = Arc::new(Inner {
            cfg,
            model_cfg,
            engine,
            parent,
            server,
            metrics,
            tokenizer,
            next_session: AtomicU64::new(1),
            hello,
            inflight: AtomicUsize::new(0),
            draining: AtomicBool::new(false),
        });
        let agent = Agent { inner };
        if agent.inner.server.is_some() {
            let a2 = agent.clone();
            tokio::spawn(async move { a2.accept_loop().await });
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

    /// Metrics of this node.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    /// Our `Hello` (fingerprints).
    pub fn hello(&self) -> &Hello {
        &self.inner.hello
    }

    /// Engine statistics.
    pub async fn engine_stats(&self) -> crate::engine::EngineStats {
        self.inner.engine.stats().await
    }

    /// Stop accepting children and close the parent link.
    pub async fn shutdown(&self) {
        self.drain(Duration::from_secs(30)).await;
        if let Some(s) = &self.inner.server {
            s.close();
        }
        if let Some(p) = &self.inner.parent {
            p.close().await;
        }
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

    fn new_session(&self, request: u64, policy: Policy, sampling: Sampling) -> TierSession {
        let id = self.inner.next_session.fetch_add(1, Ordering::Relaxed)
            | ((std::process::id() as u64) << 40);
        TierSession::new(
            id,
            request,
            self.inner.engine.clone(),
            self.inner.cfg.role,
            self.inner.parent.clone(),
            policy,
            sampling,
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
                    let me = self.clone();
                    tokio::spawn(async move { me.serve_connection(Arc::new(c)).await });
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
                    tokio::spawn(async move { me.serve_session(stream).await });
                }
                Err(e) => {
                    tracing::info!(child = %conn.peer_hello().node_id, reason = %e, "child connection ended");
                    return;
                }
            }
        }
    }

    async fn serve_session(self, mut stream: SessionStream) {
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
        let mut tier: Option<TierSession> = None;
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
                Message::Continue(c) => {
                    let t = tier.get_or_insert_with(|| {
                        self.new_session(c.request_id, c.policy.clone(), c.sampling.clone())
                    });
                    self.handle_continue(t, c, hidden).await
                }
                Message::Draft(d) => {
                    let t = tier.get_or_insert_with(|| {
                        self.new_session(d.request_id, d.policy.clone(), d.sampling.clone())
                    });
                    match from_wire(&d.hidden, hidden) {
                        Ok(h) => t.draft(d, h).await.map(Message::Verdict),
                        Err(e) => Err(e),
                    }
                }
                Message::Cancel(_) | Message::Done(_) => break,
                Message::Heartbeat(_) => continue,
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

    async fn handle_continue(
        &self,
        t: &mut TierSession,
        c: flow_protocol::Continue,
        hidden: usize,
    ) -> Result<Message> {
        if c.layer as usize != self.inner.cfg.stage.a {
            return Err(NodeError::Protocol(format!(
                "Continue from layer {}, but this node starts at layer {}",
                c.layer, self.inner.cfg.stage.a
            )));
        }
        let start = *c
            .positions
            .first()
            .ok_or_else(|| NodeError::Protocol("Continue without positions".into()))?
            as usize;
        check_positions(&c.positions, start)?;
        let h = from_wire(&c.hidden, hidden)?;
        if h.dim(0)? != c.positions.len() {
            return Err(NodeError::Protocol(format!(
                "{} positions but {} hidden rows",
                c.positions.len(),
                h.dim(0)?
            )));
        }
        let backfill = match &c.backfill {
            Some(bf) => {
                let s = *bf
                    .positions
                    .first()
                    .ok_or_else(|| NodeError::Protocol("backfill without positions".into()))?
                    as usize;
                check_positions(&bf.positions, s)?;
                if s + bf.positions.len() != start {
                    return Err(NodeError::Protocol(format!(
                        "backfill positions {}..{} do not end where the step starts ({start})",
                        s,
                        s + bf.positions.len()
                    )));
                }
                let bh = from_wire(&bf.hidden, hidden)?;
                if bh.dim(0)? != bf.positions.len() {
                    return Err(NodeError::Protocol("backfill rows ≠ positions".into()));
                }
                Some((s, bh))
            }
            None => None,
        };
        let r = t.step(Input::Hidden(h), start, backfill).await?;
        Ok(t.tokens_reply(&r))
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
        let policy = req
            .policy
            .clone()
            .unwrap_or_else(|| self.inner.cfg.default_policy.clone());
        self.check_policy(&policy)?;
        let guard = self.enter()?;
        let (tx, rx) = mpsc::channel(64);
        let me = self.clone();
        self.inner.metrics.requests.inc();
        tokio::spawn(async move {
            let _guard = guard;
            let t0 = Instant::now();
            let res = if policy.mode == InferMode::Speculate && me.inner.parent.is_some() {
                me.run_speculative(req, policy, &tx, t0).await
            } else {
                me.run_stepwise(req, policy, &tx, t0).await
            };
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

    fn is_stop(&self, req: &GenerateRequest, tok: u32) -> bool {
        req.stop_tokens.contains(&tok) || self.inner.model_cfg.eos_token_ids.contains(&tok)
    }

    async fn run_stepwise(
        &self,
        req: GenerateRequest,
        policy: Policy,
        tx: &mpsc::Sender<GenEvent>,
        t0: Instant,
    ) -> Result<GenStats> {
        let mut tier = self.new_session(tier_request_id(), policy, req.sampling.clone());
        let mut stats = GenStats {
            prompt_tokens: req.prompt.len(),
            finish_reason: "length".into(),
            ..GenStats::default()
        };
        let mut input = req.prompt.clone();
        let mut start = 0;
        let result = async {
            for _ in 0..req.max_new_tokens {
                let r = tier.step(Input::Tokens(input.clone()), start, None).await?;
                self.record(&mut stats, &r.token, r.degraded, t0);
                let id = r.token.id;
                if tx
                    .send(GenEvent::Token {
                        token: r.token,
                        degraded: r.degraded,
                    })
                    .await
                    .is_err()
                {
                    stats.finish_reason = "cancelled".into();
                    break;
                }
                if self.is_stop(&req, id) {
                    stats.finish_reason = "stop".into();
                    break;
                }
                start += input.len();
                input = vec![id];
            }
            Ok::<(), NodeError>(())
        }
        .await;
        stats.bytes_up = tier.bytes_up;
        stats.hops = tier.hops;
        stats.total_ms = t0.elapsed().as_secs_f64() * 1e3;
        tier.close().await;
        result.map(|_| stats)
    }

    async fn run_speculative(
        &self,
        req: GenerateRequest,
        policy: Policy,
        tx: &mpsc::Sender<GenEvent>,
        t0: Instant,
    ) -> Result<GenStats> {
        let n = policy.draft_len as usize;
        let mut tier = self.new_session(tier_request_id(), policy, req.sampling.clone());
        let engine = tier.engine().clone();
        let exit = engine.stage().b as u32;
        let mut stats = GenStats {
            prompt_tokens: req.prompt.len(),
            finish_reason: "length".into(),
            ..GenStats::default()
        };
        // `pending` = accepted tokens the verifier has not processed, starting at `s`.
        let mut pending = req.prompt.clone();
        let mut s = 0usize;
        let mut produced = 0usize;
        let result = async {
            'outer: while produced < req.max_new_tokens {
                let budget = (req.max_new_tokens - produced).min(n + 1);
                let drafts_n = budget.saturating_sub(1).max(1).min(n);
                // Draft: the pending rows, then one row per draft token.
                let mut rows: Vec<Tensor> = Vec::with_capacity(drafts_n + 1);
                let mut drafts = Vec::with_capacity(drafts_n);
                let mut pos = s;
                let mut feed = pending.clone();
                for i in 0..=drafts_n {
                    let out = engine
                        .step(crate::engine::StepJob {
                            session: tier.id,
                            start: pos,
                            input: Input::Tokens(feed.clone()),
                            backfill: None,
                            logit_rows: usize::from(i < drafts_n),
                            exit_kv: true,
                        })
                        .await?;
                    pos += feed.len();
                    rows.push(out.hidden);
                    if i < drafts_n {
                        let row =
                            out.logits.as_ref().and_then(|l| l.last()).ok_or_else(|| {
                                NodeError::Internal("draft without logits".into())
                            })?;
                        let d = choose(row, &req.sampling, pos);
                        drafts.push(d);
                        feed = vec![d];
                    }
                }
                let hidden = Tensor::cat(&rows, 0)?;
                self.inner.metrics.drafts_proposed.add(drafts.len() as u64);
                stats.drafts_proposed += drafts.len();
                let v = tier.verify_upstream(s, hidden, drafts.clone()).await?;
                let a = (v.accepted as usize).min(drafts.len());
                self.inner.metrics.drafts_accepted.add(a as u64);
                stats.drafts_accepted += a;
                let r = pending.len();
                engine.truncate(tier.id, s + r + a).await;
                let mut emitted: Vec<TokenOut> = drafts[..a]
                    .iter()
                    .enumerate()
                    .map(|(i, &d)| TokenOut {
                        id: d,
                        position: (s + r + i) as u32,
                        tier: self.inner.cfg.role,
                        exit,
                        confidence: 1.0,
                    })
                    .collect();
                emitted.push(TokenOut {
                    id: v.next_token,
                    position: (s + r + a) as u32,
                    tier: v.tier,
                    exit: v.exit,
                    confidence: 1.0,
                });
                for t in emitted {
                    let id = t.id;
                    self.record(&mut stats, &t, false, t0);
                    produced += 1;
                    if tx
                        .send(GenEvent::Token {
                            token: t,
                            degraded: false,
                        })
                        .await
                        .is_err()
                    {
                        stats.finish_reason = "cancelled".into();
                        break 'outer;
                    }
                    if self.is_stop(&req, id) {
                        stats.finish_reason = "stop".into();
                        break 'outer;
                    }
                    if produced >= req.max_new_tokens {
                        break 'outer;
                    }
                }
                s += r + a;
                pending = vec![v.next_token];
            }
            Ok::<(), NodeError>(())
        }
        .await;
        stats.bytes_up = tier.bytes_up;
        stats.hops = tier.hops;
        stats.total_ms = t0.elapsed().as_secs_f64() * 1e3;
        tier.close().await;
        result.map(|_| stats)
    }
}

fn check_positions(p: &[u32], start: usize) -> Result<()> {
    for (i, &x) in p.iter().enumerate() {
        if x as usize != start + i {
            return Err(NodeError::Protocol(format!(
                "positions must be consecutive: got {x} at index {i}, expected {}",
                start + i
            )));
        }
    }
    Ok(())
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
                security: Security::InsecureLoopback,
                parent_encoding: Encoding::F32,
                engine: EngineConfig::default(),
                default_policy: Policy::default(),
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
    /// Escalate to the parent at `addr` whose certificate is named `name`.
    pub fn parent(mut self, addr: SocketAddr, name: impl Into<String>) -> Self {
        self.cfg.parent = Some((addr, name.into()));
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
                let mut mc = ModelConfig::from_file(&cfg.model_dir.join("config.json"))?;
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
