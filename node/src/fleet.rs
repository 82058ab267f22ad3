//! Fleet operations on running agents: fine-tuned deltas distributed down the tree over
//! the live QUIC connections, and federated rounds aggregated up it.
//!
//! **Distribution.** Every agent keeps its hosted weights in a [`WeightStore`] (base +
//! versions). A parent opens a session on a child's existing connection (the child dialled
//! it; QUIC lets either side open streams) and sends a delta transfer or a rollback; the
//! child verifies the base fingerprint and version at the offer, reassembles and checks
//! the SHA-256, applies, builds a new engine over the new weights and swaps it in, pushes
//! the delta on to its own children, and only then answers with a [`DeltaAck`]. Sessions
//! hold the engine they started on, so a request in flight finishes on the old weights and
//! every request started after the ack runs on the new ones; the old engine thread ends
//! when its last session closes. Entry points: [`Agent::apply_delta`],
//! [`Agent::distribute`], [`Agent::rollback_everywhere`]; an operator pushes to a running
//! edge or cloud with `flow-node fleet push` (a session on a child connection, handled
//! the same way).
//!
//! **Aggregation.** A participant trains locally and posts its update with
//! [`Agent::offer_update`]. The aggregator asks each child for its update of a round
//! ([`RoundUpdate`] with `samples: 0`); the child answers with its sample count and the
//! update as a delta transfer. A child with children of its own (an edge) first runs the
//! round over them with three quarters of the time it was given and answers with their
//! FedAvg (weighted by samples; the sample count is the sum), so the cloud's average is
//! the flat sample-weighted mean of every device that made the deadlines. Rounds use
//! [`flow_finetune::aggregate::run_round`]: a participant that has not answered at the
//! deadline is dropped, so a round never waits for a dead node. [`Agent::federate`] runs
//! rounds, distributes each aggregate as a new version, and stops after `rounds` or when
//! the aggregate moves less than `min_change`.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use candle_core::{DType, Tensor};
use flow_familial::weights::{Checkpoint, TensorSource};
use flow_familial::{FamilialModel, ModelConfig, Part};
use flow_finetune::aggregate::{run_round, Job, RoundConfig, RoundOutcome, Update};
use flow_finetune::Delta;
use flow_protocol::transport::{PeerConnection, SessionStream};
use flow_protocol::{DeltaAck, DeltaOffer, DeltaStatus, ErrorCode, Message, RoundUpdate};
use tokio::sync::watch;

use crate::agent::Agent;
use crate::delta::{ack_message, push_delta, push_rollback, send_transfer_await_ack};
use crate::delta::{Assembler, WeightStore};
use crate::engine::EngineHandle;
use crate::error::{NodeError, Result};

/// Load this node's hosted tensors from `ck` into a [`WeightStore`] and build the model
/// over them (the store and the model share the tensors). `all` are the family's tensor
/// names and `family` their fingerprint, reused as the base fingerprint when they are
/// every tensor of the checkpoint.
pub(crate) fn load_store(
    ck: &Checkpoint,
    mc: &ModelConfig,
    part: &Part,
    all: &[String],
    family: [u8; 32],
) -> Result<(WeightStore, FamilialModel)> {
    let infos = ck.tensor_infos();
    let fp = if infos.len() == all.len() && all.iter().all(|n| infos.contains_key(n)) {
        family
    } else {
        flow_finetune::delta::base_fingerprint(ck).map_err(|e| NodeError::Model(e.to_string()))?
    };
    let mut tensors = HashMap::new();
    for n in FamilialModel::tensor_names(mc, part)? {
        if let Some((_, shape)) = infos.get(&n) {
            let t = ck.get(&n, shape)?;
            tensors.insert(n, t);
        }
    }
    let store = WeightStore::new(tensors, fp);
    let model = store.current()?.model(mc, part.clone())?;
    Ok((store, model))
}

/// The engine new sessions run on; replaced when the weights change.
#[derive(Debug)]
pub struct EngineSlot(RwLock<EngineHandle>);

impl EngineSlot {
    /// A slot holding `engine`.
    pub fn new(engine: EngineHandle) -> Self {
        Self(RwLock::new(engine))
    }

    /// The engine for a new session.
    pub fn get(&self) -> EngineHandle {
        match self.0.read() {
            Ok(e) => e.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    fn set(&self, engine: EngineHandle) {
        match self.0.write() {
            Ok(mut e) => *e = engine,
            Err(p) => *p.into_inner() = engine,
        }
    }
}

/// An update this node offers to the next round it is asked for.
#[derive(Debug, Clone)]
pub struct LocalUpdate {
    /// Training samples behind it (the FedAvg weight).
    pub samples: u64,
    /// The trained tensors (against this node's base).
    pub delta: Delta,
}

/// Per-agent fleet state: the weights, the children, the update on offer.
#[derive(Debug)]
pub struct FleetState {
    store: Arc<WeightStore>,
    part: Part,
    children: Mutex<Vec<Weak<PeerConnection>>>,
    update: watch::Sender<Option<LocalUpdate>>,
    /// Serialises weight changes (apply/rollback + engine swap).
    swap: tokio::sync::Mutex<()>,
    next_id: AtomicU64,
}

impl FleetState {
    /// State over `store` (this node's hosted tensors) for the model part `part`.
    pub fn new(store: Arc<WeightStore>, part: Part) -> Self {
        Self {
            store,
            part,
            children: Mutex::new(Vec::new()),
            update: watch::channel(None).0,
            swap: tokio::sync::Mutex::new(()),
            next_id: AtomicU64::new(1),
        }
    }

    /// Remember a child connection (the parent side of distribution and rounds).
    pub fn add_child(&self, conn: &Arc<PeerConnection>) {
        if let Ok(mut c) = self.children.lock() {
            c.retain(|w| {
                w.upgrade()
                    .is_some_and(|c| c.quic().close_reason().is_none())
            });
            c.push(Arc::downgrade(conn));
        }
    }

    fn id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// The connected children's session counts, for `/metrics`.
    pub fn child_sessions(&self) -> Vec<ChildSessions> {
        let Ok(c) = self.children.lock() else {
            return Vec::new();
        };
        c.iter()
            .filter_map(Weak::upgrade)
            .filter(|c| c.quic().close_reason().is_none())
            .map(|c| ChildSessions {
                child: c.peer_hello().node_id.clone(),
                role: c.peer_hello().role.to_string(),
                active: c.active_sessions(),
                refused: c.refused_sessions(),
                limit: c.session_limit(),
            })
            .collect()
    }
}

/// One child connection's sessions against the per-peer limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChildSessions {
    pub child: String,
    pub role: String,
    /// Sessions open now.
    pub active: usize,
    /// Sessions refused on this connection for going over `limit`.
    pub refused: u64,
    pub limit: usize,
}

/// What one distribution did, here and on each child (recursively summarised by them).
#[derive(Debug, Clone)]
pub struct Distribution {
    /// This node: the version now live, or why the delta was refused here.
    pub local: std::result::Result<u64, String>,
    /// Each child by node id: its answer, or why it could not be reached.
    pub children: Vec<(String, std::result::Result<DeltaAck, String>)>,
}

impl Distribution {
    /// Whether this node and every child took it.
    pub fn all_ok(&self) -> bool {
        self.local.is_ok()
            && self
                .children
                .iter()
                .all(|(_, r)| matches!(r, Ok(a) if a.status != DeltaStatus::Refused))
    }

    /// One line per node, for humans.
    pub fn summary(&self) -> String {
        let mut s = match &self.local {
            Ok(v) => format!("here: version {v} live"),
            Err(e) => format!("here: refused: {e}"),
        };
        for (name, r) in &self.children {
            match r {
                Ok(a) => s.push_str(&format!(
                    "; {name}: {:?} v{} ({})",
                    a.status, a.version, a.message
                )),
                Err(e) => s.push_str(&format!("; {name}: unreachable: {e}")),
            }
        }
        s
    }
}

/// Rounds and stop condition of [`Agent::federate`].
#[derive(Debug, Clone, Copy)]
pub struct FederationPlan {
    /// Most rounds.
    pub rounds: u64,
    /// Deadline and quorum of each round at this node (children with children of their
    /// own get three quarters of the deadline for theirs).
    pub round: RoundConfig,
    /// Stop when no aggregated value moved by more than this since the previous round.
    pub min_change: f64,
}

/// One round of [`Agent::federate`].
#[derive(Debug, Clone)]
pub struct RoundReport {
    pub round: u64,
    /// Who joined, was dropped at the deadline, or failed; samples aggregated.
    pub outcome: RoundOutcome,
    /// The version the aggregate was distributed as (`None`: nothing aggregated).
    pub version: Option<u64>,
    /// Largest change of an aggregated value since the previous round's aggregate.
    pub max_change: Option<f64>,
    /// The distribution of the aggregate.
    pub distribution: Option<Distribution>,
}

/// Largest absolute difference between same-named tensors of `a` and `b` (infinite when
/// `b` lacks one).
pub fn largest_change(a: &HashMap<String, Tensor>, b: &HashMap<String, Tensor>) -> Result<f64> {
    let mut m = 0f64;
    for (n, t) in a {
        let Some(u) = b.get(n) else {
            return Ok(f64::INFINITY);
        };
        let d = (t.to_dtype(DType::F64)? - u.to_dtype(DType::F64)?)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f64>()?;
        m = m.max(d);
    }
    Ok(m)
}

impl Agent {
    /// The base fingerprint deltas for this family must name.
    pub fn base_fingerprint(&self) -> [u8; 32] {
        self.fleet().store.fingerprint()
    }

    /// The live weights of this node's part (a snapshot).
    pub fn weights(&self) -> Result<Arc<crate::delta::Versioned>> {
        self.fleet().store.current()
    }

    /// The live weights version (0 = the base).
    pub fn weights_version(&self) -> u64 {
        self.fleet().store.version().unwrap_or(0)
    }

    /// Verify and apply `delta` on this node: new sessions run on the new weights once
    /// this returns; sessions in flight finish on the old ones. Returns the live version.
    pub async fn apply_delta(&self, delta: &Delta) -> Result<u64> {
        self.deltas_supported()?;
        let f = self.fleet();
        let _g = f.swap.lock().await;
        let v = f.store.apply(delta)?;
        if let Err(e) = self.reload_engine().await {
            let _ = f.store.rollback(v);
            return Err(e);
        }
        Ok(v)
    }

    /// Undo `from_version` (it must be live) on this node; returns the live version.
    pub async fn rollback_delta(&self, from_version: u64) -> Result<u64> {
        self.deltas_supported()?;
        let f = self.fleet();
        let _g = f.swap.lock().await;
        let v = f.store.rollback(from_version)?;
        self.reload_engine().await?;
        Ok(v)
    }

    /// Deltas need the hosted tensors in memory; a node serving with MoE expert pruning
    /// pages experts in per task instead, so it refuses them.
    fn deltas_supported(&self) -> Result<()> {
        if self.config().moe.is_some() {
            return Err(NodeError::Config(
                "this node serves with MoE expert pruning (--moe-patterns), which does not \
                 take weight deltas yet: restart it on a checkpoint with the delta merged"
                    .into(),
            ));
        }
        if flow_familial::source::is_gguf(&self.config().model_dir) {
            return Err(NodeError::Config(
                "this node serves a GGUF model, whose weights stay quantized in the mapped \
                 file; weight deltas need an HF (safetensors) checkpoint of the same base"
                    .into(),
            ));
        }
        Ok(())
    }

    async fn reload_engine(&self) -> Result<()> {
        let cur = self.fleet().store.current()?;
        let mc = self.model_config().clone();
        let part = self.fleet().part.clone();
        let model = tokio::task::spawn_blocking(move || cur.model(&mc, part))
            .await
            .map_err(|e| NodeError::Internal(format!("model building task: {e}")))??;
        let engine = EngineHandle::spawn(model, self.config().stage, self.config().engine)?;
        self.engine_slot().set(engine);
        tracing::info!(
            version = self.weights_version(),
            "new sessions run on the new weights"
        );
        Ok(())
    }

    /// Children connected now. A peer that hosts no layers (an operator running
    /// `flow-node fleet`) is not a child: nothing is pushed to it and no round asks it.
    pub fn children(&self) -> Vec<Arc<PeerConnection>> {
        let Ok(c) = self.fleet().children.lock() else {
            return Vec::new();
        };
        c.iter()
            .filter_map(Weak::upgrade)
            .filter(|c| c.quic().close_reason().is_none() && !c.peer_hello().hosted.is_empty())
            .collect()
    }

    /// Apply `delta` here, then push it to every child (each applies it and pushes it on);
    /// a child that does not answer within `timeout` is reported unreachable.
    pub async fn distribute(&self, delta: &Delta, timeout: Duration) -> Distribution {
        let local = self.apply_delta(delta).await.map_err(|e| e.to_string());
        let children = if local.is_ok() {
            let id = self.fleet().id();
            let d = Arc::new(delta.clone());
            self.each_child(timeout, move |c| {
                let d = d.clone();
                async move { push_delta(&c, id, &d).await }
            })
            .await
        } else {
            Vec::new()
        };
        Distribution { local, children }
    }

    /// Undo `from_version` here and on every child.
    pub async fn rollback_everywhere(&self, from_version: u64, timeout: Duration) -> Distribution {
        let local = self
            .rollback_delta(from_version)
            .await
            .map_err(|e| e.to_string());
        let id = self.fleet().id();
        let children = self
            .each_child(timeout, move |c| async move {
                push_rollback(&c, id, from_version).await
            })
            .await;
        Distribution { local, children }
    }

    async fn each_child<F, Fut>(
        &self,
        timeout: Duration,
        f: F,
    ) -> Vec<(String, std::result::Result<DeltaAck, String>)>
    where
        F: Fn(Arc<PeerConnection>) -> Fut,
        Fut: std::future::Future<Output = Result<DeltaAck>> + Send + 'static,
    {
        let mut set = tokio::task::JoinSet::new();
        for c in self.children() {
            let name = c.peer_hello().node_id.clone();
            let fut = f(c);
            set.spawn(async move {
                let r = match tokio::time::timeout(timeout, fut).await {
                    Ok(Ok(a)) => Ok(a),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err(format!("no answer within {} ms", timeout.as_millis())),
                };
                (name, r)
            });
        }
        let mut out = Vec::new();
        while let Some(r) = set.join_next().await {
            if let Ok(x) = r {
                out.push(x);
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Offer an update (trained locally on `samples` samples) to the next round this node
    /// is asked for; replaces an update not yet taken.
    pub fn offer_update(&self, samples: u64, delta: Delta) {
        self.fleet()
            .update
            .send_replace(Some(LocalUpdate { samples, delta }));
    }

    /// One round at this node: ask every child for its update of `round` (and take this
    /// node's own offered update, if any), drop those that miss `cfg.deadline`, and
    /// average the rest by samples.
    pub async fn aggregate_round(&self, round: u64, cfg: RoundConfig) -> RoundOutcome {
        let fp = self.base_fingerprint();
        let mut jobs: Vec<(String, Job)> = Vec::new();
        for c in self.children() {
            let name = c.peer_hello().node_id.clone();
            let n2 = name.clone();
            jobs.push((
                name,
                Box::pin(async move {
                    ask_for_update(&c, n2, round, cfg.deadline, Some(fp))
                        .await
                        .map_err(|e| flow_finetune::Error::Aggregate(e.to_string()))
                }),
            ));
        }
        if let Some(u) = self.fleet().update.send_replace(None) {
            let me = self.config().node_id.clone();
            let upd = local_to_update(me.clone(), u);
            jobs.push((me, Box::pin(async move { Ok(upd) })));
        }
        run_round(jobs, cfg).await
    }

    /// Run federated rounds from this node (the root of the aggregation tree): each
    /// round's aggregate becomes a new version, distributed down the tree; stops after
    /// `plan.rounds` or when the aggregate stops moving.
    pub async fn federate(&self, plan: FederationPlan) -> Result<Vec<RoundReport>> {
        let mut reports = Vec::new();
        let mut prev: Option<HashMap<String, Tensor>> = None;
        for round in 1..=plan.rounds {
            let mut outcome = self.aggregate_round(round, plan.round).await;
            let mut report = RoundReport {
                round,
                outcome: RoundOutcome::default(),
                version: None,
                max_change: None,
                distribution: None,
            };
            let mut stop = false;
            if let Some(agg) = outcome.aggregate.take() {
                let delta = self.delta_of(&agg, "fedavg");
                let dist = self.distribute(&delta, plan.round.deadline).await;
                report.version = dist.local.as_ref().ok().copied();
                report.distribution = Some(dist);
                if let Some(p) = &prev {
                    let ch = largest_change(p, &agg.tensors)?;
                    report.max_change = Some(ch);
                    stop = ch < plan.min_change;
                }
                prev = Some(agg.tensors);
            }
            tracing::info!(
                round,
                joined = ?outcome.joined,
                dropped = ?outcome.dropped,
                samples = outcome.samples,
                "federated round"
            );
            report.outcome = outcome;
            reports.push(report);
            if stop {
                break;
            }
        }
        Ok(reports)
    }

    fn delta_of(&self, u: &Update, scheme: &str) -> Delta {
        Delta {
            base_fingerprint: self.base_fingerprint(),
            version: self.weights_version() + 1,
            scheme: scheme.into(),
            tensors: u
                .tensors
                .iter()
                .map(|(n, t)| (n.clone(), t.clone()))
                .collect::<BTreeMap<_, _>>(),
        }
    }
}

fn local_to_update(name: String, u: LocalUpdate) -> Update {
    Update {
        samples: u.samples,
        tensors: u.delta.tensors.into_iter().collect(),
        contributors: vec![name],
    }
}

/// Receive the chunks of a transfer whose offer `o` arrived on `s` and passed `check`;
/// refusals are answered on `s`. The caller answers a success.
async fn receive_transfer(
    s: &mut SessionStream,
    o: DeltaOffer,
    check: Result<()>,
    version: u64,
) -> Result<Delta> {
    let id = o.update_id;
    let refuse = |e: NodeError| ack_message(id, DeltaStatus::Refused, version, e.to_string());
    if let Err(e) = check {
        let msg = e.to_string();
        s.send(&refuse(e)).await?;
        let _ = s.finish();
        return Err(NodeError::BadRequest(msg));
    }
    let mut asm = Assembler::default();
    asm.offer(o);
    loop {
        let r = match s.recv().await? {
            Some(Message::DeltaChunk(c)) => asm.chunk(c),
            Some(other) => Err(NodeError::Protocol(format!(
                "expected DeltaChunk, got {}",
                other.name()
            ))),
            None => Err(NodeError::Protocol("stream closed mid-transfer".into())),
        };
        match r {
            Ok(None) => continue,
            Ok(Some(d)) => return Ok(d),
            Err(e) => {
                let msg = e.to_string();
                let _ = s.send(&refuse(e)).await;
                let _ = s.finish();
                return Err(NodeError::BadRequest(msg));
            }
        }
    }
}

fn check_base(o: &DeltaOffer, fp: &[u8; 32]) -> Result<()> {
    if &o.base_digest != fp {
        return Err(NodeError::BadRequest(format!(
            "update is for base {} but this round is over base {}",
            &hex::encode(o.base_digest)[..16],
            &hex::encode(fp)[..16]
        )));
    }
    Ok(())
}

/// Aggregator side: ask `conn` (a child, or for an operator the node it connected to)
/// for its update of `round`, answered within `deadline`; `fp` = the base the update must
/// name (`None`: any).
pub async fn ask_for_update(
    conn: &PeerConnection,
    name: String,
    round: u64,
    deadline: Duration,
    fp: Option<[u8; 32]>,
) -> Result<Update> {
    let (samples, delta) = ask_for_delta(conn, &name, round, deadline, fp).await?;
    Ok(Update {
        samples,
        tensors: delta.tensors.into_iter().collect(),
        contributors: vec![name],
    })
}

/// [`ask_for_update`] answered as the sample count and the delta as sent (a node with
/// children names its average as its next version).
pub async fn ask_for_delta(
    conn: &PeerConnection,
    name: &str,
    round: u64,
    deadline: Duration,
    fp: Option<[u8; 32]>,
) -> Result<(u64, Delta)> {
    let mut s = conn.open_session().await?;
    s.send(&Message::RoundUpdate(RoundUpdate {
        round,
        samples: 0,
        deadline_ms: deadline.as_millis() as u64,
    }))
    .await?;
    let samples = match s.recv().await? {
        Some(Message::RoundUpdate(r)) if r.round == round => r.samples,
        Some(Message::Error(e)) => {
            return Err(NodeError::Unavailable(format!(
                "{name} has no update for round {round}: {}",
                e.message
            )))
        }
        Some(other) => {
            return Err(NodeError::Protocol(format!(
                "{name} answered round {round} with {}",
                other.name()
            )))
        }
        None => return Err(NodeError::Protocol(format!("{name} closed the round"))),
    };
    let offer = match s.recv().await? {
        Some(Message::DeltaOffer(o)) => o,
        other => {
            return Err(NodeError::Protocol(format!(
                "{name}: expected the update's DeltaOffer, got {:?}",
                other.map(|m| m.name())
            )))
        }
    };
    let check = match fp {
        Some(fp) => check_base(&offer, &fp),
        None => Ok(()),
    };
    let id = offer.update_id;
    let delta = receive_transfer(&mut s, offer, check, 0).await?;
    s.send(&ack_message(
        id,
        DeltaStatus::Applied,
        0,
        format!("joined round {round} with {samples} samples"),
    ))
    .await?;
    let _ = s.finish();
    Ok((samples, delta))
}

/// Serve one fleet session whose first message is `first`: from the parent (a push, a
/// rollback, a round request) or from an operator on a child connection (`flow-node
/// fleet`). A push or rollback is applied here and passed on to the children.
pub(crate) async fn serve_fleet_session(agent: Agent, first: Message, mut s: SessionStream) {
    if let Err(e) = serve(&agent, first, &mut s).await {
        tracing::warn!(error = %e, "fleet session failed");
        let _ = s
            .send(&Message::error(ErrorCode::Unexpected, e.to_string(), None))
            .await;
    }
    let _ = s.finish();
}

async fn serve(agent: &Agent, first: Message, s: &mut SessionStream) -> Result<()> {
    let timeout = Duration::from_secs(60);
    match first {
        Message::DeltaOffer(o) => {
            let store = &agent.fleet().store;
            let check = store.check(&o.base_digest, o.version);
            let id = o.update_id;
            let delta = match receive_transfer(s, o, check, store.version()?).await {
                Ok(d) => d,
                Err(_) => return Ok(()), // refused and answered
            };
            let dist = agent.distribute(&delta, timeout).await;
            let status = if dist.local.is_ok() {
                DeltaStatus::Applied
            } else {
                DeltaStatus::Refused
            };
            s.send(&ack_message(
                id,
                status,
                agent.weights_version(),
                dist.summary(),
            ))
            .await?;
        }
        Message::DeltaRollback(r) => {
            let dist = agent.rollback_everywhere(r.from_version, timeout).await;
            let status = if dist.local.is_ok() {
                DeltaStatus::RolledBack
            } else {
                DeltaStatus::Refused
            };
            s.send(&ack_message(
                r.update_id,
                status,
                agent.weights_version(),
                dist.summary(),
            ))
            .await?;
        }
        Message::RoundUpdate(req) if req.samples == 0 => participate(agent, req, s).await?,
        other => {
            return Err(NodeError::Protocol(format!(
                "unexpected {} to start a fleet session",
                other.name()
            )))
        }
    }
    Ok(())
}

/// Answer a round request: a node with children runs the round over them (with three
/// quarters of the time it was given) and answers with their average; a leaf answers with
/// the update it was offered, waiting for one until the deadline.
async fn participate(agent: &Agent, req: RoundUpdate, s: &mut SessionStream) -> Result<()> {
    let deadline = Duration::from_millis(req.deadline_ms.max(1));
    let update = if agent.children().is_empty() {
        let mut rx = agent.fleet().update.subscribe();
        let ready = matches!(
            tokio::time::timeout(deadline, rx.wait_for(Option::is_some)).await,
            Ok(Ok(_))
        );
        let taken = if ready {
            agent.fleet().update.send_replace(None)
        } else {
            None
        };
        taken.map(|u| (u.samples, u.delta))
    } else {
        let cfg = RoundConfig {
            deadline: deadline * 3 / 4,
            min_participants: 1,
        };
        let out = agent.aggregate_round(req.round, cfg).await;
        out.aggregate
            .map(|a| (a.samples, agent.delta_of(&a, "fedavg")))
    };
    let Some((samples, delta)) = update else {
        s.send(&Message::error(
            ErrorCode::DeadlineExceeded,
            format!("no update for round {} before the deadline", req.round),
            None,
        ))
        .await?;
        return Ok(());
    };
    s.send(&Message::RoundUpdate(RoundUpdate {
        round: req.round,
        samples,
        deadline_ms: req.deadline_ms,
    }))
    .await?;
    let ack = send_transfer_await_ack(s, req.round, &delta).await?;
    tracing::info!(round = req.round, samples, status = ?ack.status, message = %ack.message, "update sent");
    Ok(())
}

/// Accept the sessions a parent opens on this node's parent connections (pushes,
/// rollbacks, round requests), for as long as the agent lives. Connections are picked up
/// as the parent links (re-)dial them.
pub(crate) fn spawn_parent_sessions(agent: &Agent) {
    let Some(parents) = agent.parents().cloned() else {
        return;
    };
    let weak = agent.downgrade();
    tokio::spawn(async move {
        let mut served: Vec<Weak<PeerConnection>> = Vec::new();
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tick.tick().await;
            if weak.upgrade().is_none() {
                return;
            }
            for link in parents.all() {
                let Some(conn) = link.connection().await else {
                    continue;
                };
                if served
                    .iter()
                    .any(|w| w.upgrade().is_some_and(|c| Arc::ptr_eq(&c, &conn)))
                {
                    continue;
                }
                served.retain(|w| w.strong_count() > 0);
                served.push(Arc::downgrade(&conn));
                let w = weak.clone();
                tokio::spawn(async move {
                    while let Ok(mut s) = conn.accept_session().await {
                        let Some(agent) = w.upgrade() else { return };
                        tokio::spawn(async move {
                            match s.recv().await {
                                Ok(Some(first)) => serve_fleet_session(agent, first, s).await,
                                Ok(None) => {}
                                Err(e) => tracing::debug!(error = %e, "parent session ended"),
                            }
                        });
                    }
                });
            }
        }
    });
}
