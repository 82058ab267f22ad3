//! Fine-tuned deltas on a node: versioned weights, the receiving side of a delta transfer,
//! and the sending side.
//!
//! - [`WeightStore`]: the base tensors plus the live version. [`WeightStore::apply`]
//!   verifies a [`Delta`]'s base fingerprint, that its version is newer than the live one and
//!   that every tensor exists with the same shape, then swaps in a new `Arc` of weights in
//!   one step. Whoever holds a [`WeightStore::current`] snapshot (a session in flight) keeps
//!   computing on the old weights until it drops it. [`WeightStore::rollback`] returns to the
//!   previous version. Every delta is complete relative to the base (it holds every tensor
//!   its run changed), so applying one never depends on the versions before it.
//! - [`DeltaReceiver`]: the device side of the wire transfer as a sans-IO state machine
//!   (offer → chunks in order → SHA-256 check → apply → [`DeltaAck`]); a wrong base or an
//!   old version is refused at the offer, before any chunk is buffered.
//! - [`transfer_messages`] / [`push_delta`] / [`serve_delta_session`]: the edge side and
//!   the stream loop over a [`PeerConnection`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use candle_core::Tensor;
use flow_familial::weights::MemorySource;
use flow_familial::{FamilialModel, Mode, ModelConfig, Part};
use flow_finetune::Delta;
use flow_protocol::delta::DELTA_CHUNK_BYTES;
use flow_protocol::transport::{PeerConnection, SessionStream};
use flow_protocol::{DeltaAck, DeltaChunk, DeltaOffer, DeltaRollback, DeltaStatus, Message};
use sha2::{Digest, Sha256};

use crate::error::{NodeError, Result};

/// Previous versions kept for rollback.
pub const MAX_HISTORY: usize = 8;

/// One version of a node's weights.
#[derive(Debug)]
pub struct Versioned {
    /// 0 = the base.
    pub version: u64,
    /// Scheme of the delta (empty for the base).
    pub scheme: String,
    /// Every tensor.
    pub tensors: HashMap<String, Tensor>,
}

impl Versioned {
    /// An inference model of `part` over these weights.
    pub fn model(&self, cfg: &ModelConfig, part: Part) -> Result<FamilialModel> {
        Ok(FamilialModel::from_source(
            cfg.clone(),
            part,
            &MemorySource::new(self.tensors.clone()),
            Mode::Infer,
        )?)
    }
}

/// Base weights, the live version and the versions before it.
#[derive(Debug)]
pub struct WeightStore {
    fingerprint: [u8; 32],
    base: Arc<Versioned>,
    live: RwLock<Arc<Versioned>>,
    history: Mutex<Vec<Arc<Versioned>>>,
}

fn poisoned<T>(_: T) -> NodeError {
    NodeError::Internal("weight store lock poisoned".into())
}

impl WeightStore {
    /// A store whose base is `tensors` with fingerprint `fingerprint`.
    pub fn new(tensors: HashMap<String, Tensor>, fingerprint: [u8; 32]) -> Self {
        let base = Arc::new(Versioned {
            version: 0,
            scheme: String::new(),
            tensors,
        });
        Self {
            fingerprint,
            live: RwLock::new(base.clone()),
            base,
            history: Mutex::new(Vec::new()),
        }
    }

    /// The base fingerprint deltas must name.
    pub fn fingerprint(&self) -> [u8; 32] {
        self.fingerprint
    }

    /// The live weights (a snapshot: later applies do not change it).
    pub fn current(&self) -> Result<Arc<Versioned>> {
        Ok(self.live.read().map_err(poisoned)?.clone())
    }

    /// The live version.
    pub fn version(&self) -> Result<u64> {
        Ok(self.current()?.version)
    }

    /// Whether `delta` would be accepted now.
    pub fn check(&self, base_digest: &[u8; 32], version: u64) -> Result<()> {
        if base_digest != &self.fingerprint {
            return Err(NodeError::BadRequest(format!(
                "delta is for base {} but this node runs base {}",
                &hex::encode(base_digest)[..16],
                &hex::encode(self.fingerprint)[..16]
            )));
        }
        let live = self.version()?;
        if version <= live {
            return Err(NodeError::BadRequest(format!(
                "delta version {version} is not newer than the live version {live}"
            )));
        }
        Ok(())
    }

    /// Verify and apply `delta` atomically; returns the new live version. A node hosting
    /// part of the family applies the delta's tensors it hosts and ignores the others
    /// (they belong to other tiers); the version moves either way, so every tier of a
    /// cluster reports the same version.
    pub fn apply(&self, delta: &Delta) -> Result<u64> {
        self.check(&delta.base_fingerprint, delta.version)?;
        let hosted = Delta {
            tensors: delta
                .tensors
                .iter()
                .filter(|(n, _)| self.base.tensors.contains_key(*n))
                .map(|(n, t)| (n.clone(), t.clone()))
                .collect(),
            ..delta.clone()
        };
        if hosted.tensors.len() < delta.tensors.len() {
            tracing::debug!(
                hosted = hosted.tensors.len(),
                total = delta.tensors.len(),
                "delta touches tensors this node does not host; applying the hosted ones"
            );
        }
        let tensors = hosted
            .apply(&self.base.tensors, &self.fingerprint)
            .map_err(|e| NodeError::BadRequest(e.to_string()))?;
        let next = Arc::new(Versioned {
            version: delta.version,
            scheme: delta.scheme.clone(),
            tensors,
        });
        let mut hist = self.history.lock().map_err(poisoned)?;
        let mut live = self.live.write().map_err(poisoned)?;
        if delta.version <= live.version {
            return Err(NodeError::BadRequest(format!(
                "delta version {} lost a race with version {}",
                delta.version, live.version
            )));
        }
        let old = std::mem::replace(&mut *live, next);
        hist.push(old);
        if hist.len() > MAX_HISTORY {
            hist.remove(0);
        }
        tracing::info!(version = delta.version, scheme = %delta.scheme, "delta applied");
        Ok(delta.version)
    }

    /// Undo `from_version` (must be live); returns the version live afterwards.
    pub fn rollback(&self, from_version: u64) -> Result<u64> {
        let mut hist = self.history.lock().map_err(poisoned)?;
        let mut live = self.live.write().map_err(poisoned)?;
        if live.version != from_version {
            return Err(NodeError::BadRequest(format!(
                "cannot roll back version {from_version}: version {} is live",
                live.version
            )));
        }
        let prev = hist.pop().ok_or_else(|| {
            NodeError::BadRequest(format!("no version before {from_version} is kept"))
        })?;
        *live = prev;
        tracing::info!(from_version, to = live.version, "delta rolled back");
        Ok(live.version)
    }
}

struct Pending {
    offer: DeltaOffer,
    buf: Vec<u8>,
    next: u32,
}

/// Reassembles one transfer (offer → chunks in order → SHA-256 check) into a [`Delta`]
/// (sans-IO). Used by devices receiving a push and by aggregators receiving updates.
#[derive(Debug, Default)]
pub struct Assembler {
    pending: Option<Box<PendingDebug>>,
}

/// `Pending` with a Debug that does not print the buffer.
struct PendingDebug(Pending);

impl std::fmt::Debug for PendingDebug {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending")
            .field("update_id", &self.0.offer.update_id)
            .field("received", &self.0.buf.len())
            .finish()
    }
}

impl Assembler {
    /// Start a transfer (the offer was already checked by the caller).
    pub fn offer(&mut self, o: DeltaOffer) {
        self.pending = Some(Box::new(PendingDebug(Pending {
            buf: Vec::with_capacity(o.total_bytes as usize),
            offer: o,
            next: 0,
        })));
    }

    /// Add a chunk: `Ok(None)` = more to come, `Ok(Some(delta))` = complete and verified
    /// (size, SHA-256, base and version equal to the offer's); `Err` = refused, the
    /// transfer is dropped.
    pub fn chunk(&mut self, c: DeltaChunk) -> Result<Option<Delta>> {
        let Some(mut boxed) = self.pending.take() else {
            return Err(NodeError::BadRequest(
                "chunk without an accepted offer".into(),
            ));
        };
        let p = &mut boxed.0;
        if c.update_id != p.offer.update_id || c.index != p.next {
            return Err(NodeError::BadRequest(format!(
                "chunk {} of transfer {} out of order (expected chunk {} of transfer {})",
                c.index, c.update_id, p.next, p.offer.update_id
            )));
        }
        if p.buf.len() + c.data.len() > p.offer.total_bytes as usize {
            return Err(NodeError::BadRequest(format!(
                "chunks exceed the announced {} bytes",
                p.offer.total_bytes
            )));
        }
        p.buf.extend_from_slice(&c.data);
        p.next += 1;
        if p.next < p.offer.chunks {
            self.pending = Some(boxed);
            return Ok(None);
        }
        finish(&boxed.0).map(Some)
    }
}

fn finish(p: &Pending) -> Result<Delta> {
    if p.buf.len() as u64 != p.offer.total_bytes {
        return Err(NodeError::BadRequest(format!(
            "received {} bytes, the offer announced {}",
            p.buf.len(),
            p.offer.total_bytes
        )));
    }
    let digest: [u8; 32] = Sha256::digest(&p.buf).into();
    if digest != p.offer.sha256 {
        return Err(NodeError::BadRequest(
            "SHA-256 of the received delta does not match the offer".into(),
        ));
    }
    let delta = Delta::from_bytes(&p.buf).map_err(|e| NodeError::BadRequest(e.to_string()))?;
    if delta.base_fingerprint != p.offer.base_digest || delta.version != p.offer.version {
        return Err(NodeError::BadRequest(
            "the delta file's base or version differs from its offer".into(),
        ));
    }
    Ok(delta)
}

/// The device side of delta transfers (sans-IO): feed it messages, send what it returns.
#[derive(Debug)]
pub struct DeltaReceiver {
    store: Arc<WeightStore>,
    asm: Assembler,
}

impl DeltaReceiver {
    /// A receiver applying to `store`.
    pub fn new(store: Arc<WeightStore>) -> Self {
        Self {
            store,
            asm: Assembler::default(),
        }
    }

    fn ack(&self, update_id: u64, status: DeltaStatus, message: String) -> Message {
        let version = self.store.version().unwrap_or(0);
        ack_message(update_id, status, version, message)
    }

    /// Handle one message of a transfer; `Some` is the answer to send back.
    pub fn handle(&mut self, msg: Message) -> Option<Message> {
        match msg {
            Message::DeltaOffer(o) => {
                self.asm = Assembler::default();
                if let Err(e) = self.store.check(&o.base_digest, o.version) {
                    return Some(self.ack(o.update_id, DeltaStatus::Refused, e.to_string()));
                }
                self.asm.offer(o);
                None
            }
            Message::DeltaChunk(c) => {
                let id = c.update_id;
                match self.asm.chunk(c) {
                    Ok(None) => None,
                    Ok(Some(delta)) => Some(match self.store.apply(&delta) {
                        Ok(v) => self.ack(id, DeltaStatus::Applied, format!("version {v} live")),
                        Err(e) => self.ack(id, DeltaStatus::Refused, e.to_string()),
                    }),
                    Err(e) => Some(self.ack(id, DeltaStatus::Refused, e.to_string())),
                }
            }
            Message::DeltaRollback(DeltaRollback {
                update_id,
                from_version,
            }) => Some(match self.store.rollback(from_version) {
                Ok(v) => self.ack(
                    update_id,
                    DeltaStatus::RolledBack,
                    format!("rolled back {from_version} -> {v}"),
                ),
                Err(e) => self.ack(update_id, DeltaStatus::Refused, e.to_string()),
            }),
            other => Some(self.ack(
                0,
                DeltaStatus::Refused,
                format!("unexpected {} in a delta transfer", other.name()),
            )),
        }
    }
}

/// A [`DeltaAck`] with its message cut to the protocol's limit (refusals are logged).
pub fn ack_message(update_id: u64, status: DeltaStatus, version: u64, message: String) -> Message {
    if status == DeltaStatus::Refused {
        tracing::warn!(update_id, %message, "delta refused");
    }
    let mut message = message;
    let mut cut = message.len().min(flow_protocol::delta::MAX_DELTA_TEXT);
    while !message.is_char_boundary(cut) {
        cut -= 1;
    }
    message.truncate(cut);
    Message::DeltaAck(DeltaAck {
        update_id,
        status,
        version,
        message,
    })
}

/// The messages of one transfer of `delta`: an offer, then its chunks.
pub fn transfer_messages(update_id: u64, delta: &Delta) -> Result<Vec<Message>> {
    let bytes = delta
        .to_bytes()
        .map_err(|e| NodeError::Internal(e.to_string()))?;
    let mut out = vec![Message::DeltaOffer(DeltaOffer {
        update_id,
        base_digest: delta.base_fingerprint,
        version: delta.version,
        total_bytes: bytes.len() as u64,
        chunks: DeltaOffer::chunks_for(bytes.len() as u64),
        sha256: Sha256::digest(&bytes).into(),
        scheme: delta.scheme.chars().take(256).collect(),
    })];
    for (i, c) in bytes.chunks(DELTA_CHUNK_BYTES).enumerate() {
        out.push(Message::DeltaChunk(DeltaChunk {
            update_id,
            index: i as u32,
            data: c.to_vec(),
        }));
    }
    Ok(out)
}

async fn await_ack(s: &mut SessionStream) -> Result<DeltaAck> {
    match s.recv().await? {
        Some(Message::DeltaAck(a)) => Ok(a),
        Some(other) => Err(NodeError::Protocol(format!(
            "expected DeltaAck, got {}",
            other.name()
        ))),
        None => Err(NodeError::Protocol("stream closed before DeltaAck".into())),
    }
}

/// Edge side: send `delta` on a new session of `conn` and wait for the device's answer.
/// A refusal at the offer stops the transfer early.
pub async fn push_delta(conn: &PeerConnection, update_id: u64, delta: &Delta) -> Result<DeltaAck> {
    let mut s = conn.open_session().await?;
    send_transfer_await_ack(&mut s, update_id, delta).await
}

/// Send `delta` as a transfer on `s` (already open, possibly after other messages) and
/// wait for the receiver's [`DeltaAck`].
pub async fn send_transfer_await_ack(
    s: &mut SessionStream,
    update_id: u64,
    delta: &Delta,
) -> Result<DeltaAck> {
    let msgs = transfer_messages(update_id, delta)?;
    // A receiver that refuses at the offer answers and stops reading: the next send
    // fails, but its ack is already on the way back.
    let mut send_err = None;
    for m in &msgs {
        if let Err(e) = s.send(m).await {
            send_err = Some(e);
            break;
        }
    }
    match await_ack(s).await {
        Ok(ack) => {
            let _ = s.finish();
            Ok(ack)
        }
        Err(e) => Err(send_err.map(NodeError::from).unwrap_or(e)),
    }
}

/// Edge side: ask the device to undo `from_version`.
pub async fn push_rollback(
    conn: &PeerConnection,
    update_id: u64,
    from_version: u64,
) -> Result<DeltaAck> {
    let mut s = conn.open_session().await?;
    s.send(&Message::DeltaRollback(DeltaRollback {
        update_id,
        from_version,
    }))
    .await?;
    let ack = await_ack(&mut s).await?;
    s.finish()?;
    Ok(ack)
}

/// Device side: serve one session stream carrying a transfer or a rollback.
pub async fn serve_delta_session(mut s: SessionStream, rx: &mut DeltaReceiver) -> Result<()> {
    while let Some(msg) = s.recv().await? {
        if let Some(reply) = rx.handle(msg) {
            s.send(&reply).await?;
            s.finish()?;
            break;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn base() -> HashMap<String, Tensor> {
        HashMap::from([
            (
                "w".to_string(),
                Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &Device::Cpu).unwrap(),
            ),
            (
                "b".to_string(),
                Tensor::new(&[0f32, 0.0], &Device::Cpu).unwrap(),
            ),
        ])
    }

    fn delta(fp: [u8; 32], version: u64, v: f32) -> Delta {
        let b = base();
        let mut up = b.clone();
        up.insert("b".into(), Tensor::new(&[v, v], &Device::Cpu).unwrap());
        Delta::diff(&b, &up, DType::F32, fp, version, "bias-norm:1").unwrap()
    }

    fn b_of(v: &Versioned) -> Vec<f32> {
        v.tensors["b"].to_vec1().unwrap()
    }

    #[test]
    fn apply_is_atomic_and_rollback_restores() {
        let fp = [1u8; 32];
        let store = WeightStore::new(base(), fp);
        let in_flight = store.current().unwrap();
        assert_eq!(store.apply(&delta(fp, 1, 5.0)).unwrap(), 1);
        // A session that started before keeps the old weights.
        assert_eq!(b_of(&in_flight), vec![0.0, 0.0]);
        assert_eq!(b_of(&store.current().unwrap()), vec![5.0, 5.0]);
        assert_eq!(store.apply(&delta(fp, 2, 7.0)).unwrap(), 2);
        // Old or equal versions are refused.
        assert!(store.apply(&delta(fp, 2, 9.0)).is_err());
        assert_eq!(store.rollback(2).unwrap(), 1);
        assert_eq!(b_of(&store.current().unwrap()), vec![5.0, 5.0]);
        assert!(store.rollback(2).is_err(), "2 is no longer live");
        assert_eq!(store.rollback(1).unwrap(), 0);
        assert_eq!(b_of(&store.current().unwrap()), vec![0.0, 0.0]);
        assert!(store.rollback(0).is_err(), "nothing before the base");
    }

    #[test]
    fn a_delta_for_another_base_is_refused() {
        let store = WeightStore::new(base(), [1u8; 32]);
        let e = store.apply(&delta([2u8; 32], 1, 5.0)).unwrap_err();
        assert!(e.to_string().contains("base"), "{e}");
        assert_eq!(store.version().unwrap(), 0);
    }

    fn status(m: Option<Message>) -> DeltaStatus {
        match m {
            Some(Message::DeltaAck(a)) => a.status,
            other => panic!("expected an ack, got {other:?}"),
        }
    }

    #[test]
    fn receiver_applies_in_order_and_refuses_bad_transfers() {
        let fp = [1u8; 32];
        let store = Arc::new(WeightStore::new(base(), fp));
        let mut rx = DeltaReceiver::new(store.clone());
        let msgs = transfer_messages(1, &delta(fp, 1, 3.0)).unwrap();
        let n = msgs.len();
        for (i, m) in msgs.into_iter().enumerate() {
            let r = rx.handle(m);
            if i + 1 < n {
                assert!(r.is_none());
            } else {
                assert_eq!(status(r), DeltaStatus::Applied);
            }
        }
        assert_eq!(store.version().unwrap(), 1);
        // Wrong base: refused at the offer.
        let mut msgs = transfer_messages(2, &delta([9u8; 32], 2, 3.0)).unwrap();
        assert_eq!(status(rx.handle(msgs.remove(0))), DeltaStatus::Refused);
        // Corrupted bytes: the digest check refuses it, the live version stays.
        let mut msgs = transfer_messages(3, &delta(fp, 2, 4.0)).unwrap();
        if let Message::DeltaChunk(c) = &mut msgs[1] {
            let last = c.data.len() - 1;
            c.data[last] ^= 0xff;
        }
        assert!(rx.handle(msgs.remove(0)).is_none());
        assert_eq!(status(rx.handle(msgs.remove(0))), DeltaStatus::Refused);
        assert_eq!(store.version().unwrap(), 1);
        // A chunk with no offer.
        let msgs = transfer_messages(4, &delta(fp, 2, 4.0)).unwrap();
        assert_eq!(status(rx.handle(msgs[1].clone())), DeltaStatus::Refused);
        // Rollback over the same receiver.
        let r = rx.handle(Message::DeltaRollback(DeltaRollback {
            update_id: 5,
            from_version: 1,
        }));
        assert_eq!(status(r), DeltaStatus::RolledBack);
        assert_eq!(store.version().unwrap(), 0);
    }

    /// A real edge → device push over loopback QUIC: a multi-chunk delta is applied, a
    /// rollback restores the base, and a delta for another base is refused at the offer.
    #[tokio::test]
    async fn push_over_quic_applies_refuses_and_rolls_back() {
        use flow_protocol::transport::{Endpoint, EndpointConfig, Security};
        use flow_protocol::{Capacity, Hello, ModelFingerprint, Role};
        let hello = |id: &str, role| Hello {
            node_id: id.into(),
            role,
            protocol_version: flow_protocol::PROTOCOL_VERSION,
            min_protocol_version: flow_protocol::MIN_PROTOCOL_VERSION,
            model: ModelFingerprint {
                family: "t".into(),
                digest: [0; 32],
            },
            hosted: vec![],
            capacity: Capacity::default(),
        };
        let local = "127.0.0.1:0".parse().unwrap();
        let fp = [1u8; 32];
        let big = Tensor::randn(0f32, 1.0, (256, 400), &Device::Cpu).unwrap();
        let mut b = base();
        b.insert("big".into(), big.clone());
        let mut up = b.clone();
        up.insert("big".into(), (big + 1.0).unwrap());
        let d = Delta::diff(&b, &up, DType::F32, fp, 1, "full").unwrap();
        assert!(
            transfer_messages(1, &d).unwrap().len() > 3,
            "several chunks"
        );
        let store = Arc::new(WeightStore::new(b, fp));

        let edge = Endpoint::server(EndpointConfig::new(
            local,
            Security::InsecureLoopback,
            hello("edge-1", Role::Edge),
        ))
        .unwrap();
        let addr = edge.local_addr().unwrap();
        let dev = Endpoint::client(EndpointConfig::new(
            local,
            Security::InsecureLoopback,
            hello("dev-1", Role::Device),
        ))
        .unwrap();
        let st = store.clone();
        let device = tokio::spawn(async move {
            let conn = dev.connect(addr, "localhost").await?;
            let mut rx = DeltaReceiver::new(st);
            for _ in 0..3 {
                let s = conn.accept_session().await?;
                // A transfer refused at the offer may end with the edge's unread chunks
                // reset; that session's error must not end the device's loop.
                if let Err(e) = serve_delta_session(s, &mut rx).await {
                    eprintln!("delta session ended: {e}");
                }
            }
            // Stay connected until the edge has read the last ack.
            let _ = conn.closed().await;
            Ok::<_, NodeError>(())
        });
        let run = async {
            let conn = match edge.accept().await {
                Some(Ok(c)) => c,
                other => panic!("edge accept: {other:?}; device: {:?}", device.await),
            };
            let a = push_delta(&conn, 1, &d).await.unwrap();
            assert_eq!(
                (a.status, a.version),
                (DeltaStatus::Applied, 1),
                "{}",
                a.message
            );
            let a = match push_rollback(&conn, 2, 1).await {
                Ok(a) => a,
                Err(e) => panic!("rollback: {e}; device: {:?}", device.await),
            };
            assert_eq!((a.status, a.version), (DeltaStatus::RolledBack, 0));
            let other = Delta {
                base_fingerprint: [9; 32],
                version: 2,
                ..d.clone()
            };
            let a = push_delta(&conn, 3, &other).await.unwrap();
            assert_eq!((a.status, a.version), (DeltaStatus::Refused, 0));
            assert!(a.message.contains("base"), "{}", a.message);
            conn.close("done");
            device.await.unwrap().unwrap();
        };
        tokio::time::timeout(std::time::Duration::from_secs(60), run)
            .await
            .expect("transfer timed out");
        assert_eq!(store.version().unwrap(), 0);
    }
}
