//! The messages nodes exchange.
//!
//! Each [`Message`] variant is one frame kind ([`Message::kind`]). Scalar fields travel in the
//! postcard header; [`WireTensor`]s contribute only their shape and encoding to the header and
//! their bytes to the frame payload (see [`crate::codec`]).
//!
//! Typical flows:
//! - connection start (control stream): `Hello` ⇄ `Hello` (or `Error` with
//!   [`ErrorCode::VersionMismatch`] / [`ErrorCode::ModelMismatch`]), then `Heartbeat`s and
//!   `Probe`/`ProbeReply`.
//! - one request session (its own stream): child → parent `Open` (once, first: what is fixed
//!   for the session, no reply), then `Continue`s (and later `Draft`s, `Cancel`), parent →
//!   child one `Tokens` per `Continue`, a `Verdict` per `Draft`, `Done` or `Error`
//!   (see [`crate::step`]).

use serde::{Deserialize, Serialize};

use crate::delta::{DeltaAck, DeltaChunk, DeltaOffer, DeltaRollback, RoundUpdate};
use crate::step::{Continue, Draft, Open};
use crate::tensor::WireTensor;

/// Newest protocol version this build speaks (frame prefix and `Hello`).
///
/// 2: `TokenOut` carries the token's log-probability and the top alternatives at the exit
/// that produced it; `Sampling` asks for them (`top_logprobs`).
///
/// 3: [`Message::Upstream`], a parent's report of the tiers beyond it. Every other frame is
/// unchanged and still goes out marked 2 ([`Message::min_version`]), so protocol-2 nodes
/// keep working beside protocol-3 ones; they are never sent an `Upstream`.
///
/// 4: a request stream starts with [`Message::Open`] (request and session ids, layer,
/// policy, sampling, request deadline, sent once); `Continue`, its `Backfill` and `Draft`
/// carry a start position and tensors only (see [`crate::step`]). Not readable by older
/// nodes in either direction, so 4 is also the oldest version spoken: a protocol-2 or -3
/// peer is refused at the `Hello` with [`ErrorCode::VersionMismatch`] naming both ranges,
/// and every frame goes out marked 4.
pub const PROTOCOL_VERSION: u16 = 4;
/// Oldest protocol version this build still reads.
pub const MIN_PROTOCOL_VERSION: u16 = 4;

/// A node's tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Role {
    /// Camera, phone: embedding and the first layers.
    Device,
    /// Base station: middle layers.
    Edge,
    /// Data centre: the rest of the model.
    Cloud,
}

impl Role {
    /// Lowercase name as used in certificates and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Device => "device",
            Role::Edge => "edge",
            Role::Cloud => "cloud",
        }
    }

    /// The role of the children a node of this role accepts by default (edge ← device,
    /// cloud ← edge). Devices accept no children.
    pub fn default_children(self) -> &'static [Role] {
        match self {
            Role::Device => &[],
            Role::Edge => &[Role::Device],
            Role::Cloud => &[Role::Edge],
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "device" => Ok(Role::Device),
            "edge" => Ok(Role::Edge),
            "cloud" => Ok(Role::Cloud),
            other => Err(crate::Error::invalid(
                "role",
                format!("unknown role {other:?} (device|edge|cloud)"),
            )),
        }
    }
}

/// Identity of the model family both ends must agree on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelFingerprint {
    /// Human-readable family name (e.g. `qwen2-familial-0.5b`).
    pub family: String,
    /// Digest of config + weights (e.g. SHA-256).
    pub digest: [u8; 32],
}

/// A layer range a node hosts, with the digest of those layers' weights.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostedLayers {
    /// First layer (inclusive).
    pub start: u32,
    /// Last layer (exclusive).
    pub end: u32,
    /// Digest of the weights of `start..end` (and their exits).
    pub digest: [u8; 32],
}

/// What a node can take on.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Capacity {
    /// Concurrent sessions it accepts from this peer.
    pub max_sessions: u32,
    /// Largest batch (tokens per engine step).
    pub max_batch_tokens: u32,
    /// Rough compute speed, layers × tokens per second (planner hint).
    pub layer_tokens_per_s: f32,
    /// Free accelerator/host memory for KV, bytes.
    pub free_memory_bytes: u64,
}

/// First message on the control stream, both directions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    /// Stable node name (matches its certificate's DNS name under mTLS).
    pub node_id: String,
    /// The sender's tier.
    pub role: Role,
    /// Newest protocol version the sender speaks.
    pub protocol_version: u16,
    /// Oldest protocol version the sender accepts.
    pub min_protocol_version: u16,
    /// The model family the sender serves.
    pub model: ModelFingerprint,
    /// Layer ranges the sender hosts.
    pub hosted: Vec<HostedLayers>,
    /// What the sender can take on.
    pub capacity: Capacity,
}

/// Current load, sent periodically on the control stream.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Load {
    /// Sessions in progress.
    pub active_sessions: u32,
    /// Work items waiting for the engine.
    pub queue_depth: u32,
    /// Recent decode throughput, tokens per second.
    pub tokens_per_s: f32,
    /// Engine busy fraction, 0..=1.
    pub utilisation: f32,
}

/// Liveness + load report.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Monotonic sequence number.
    pub seq: u64,
    /// Sender's load.
    pub load: Load,
}

/// Sampling parameters for a request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sampling {
    /// 0 means greedy.
    pub temperature: f32,
    /// Nucleus sampling threshold (1.0 = off).
    pub top_p: f32,
    /// Top-k (0 = off).
    pub top_k: u32,
    /// RNG seed for reproducible sampling.
    pub seed: u64,
    /// Tokens to generate at most.
    pub max_new_tokens: u32,
    /// Stop token ids.
    pub stop_tokens: Vec<u32>,
    /// Alternatives (most likely first) to report with each token's log-probability
    /// (OpenAI's `top_logprobs`, at most [`MAX_TOP_LOGPROBS`]); 0 reports none.
    pub top_logprobs: u32,
}

/// Most alternatives a token may carry (OpenAI's limit for `top_logprobs`).
pub const MAX_TOP_LOGPROBS: u32 = 20;

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
            max_new_tokens: 64,
            stop_tokens: Vec::new(),
            top_logprobs: 0,
        }
    }
}

/// How tiers decide for a request (fixed for the whole request).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub enum InferMode {
    /// One exit answers every token, chosen up front (`Policy::answer_exit`).
    Route,
    /// Per-token escalation: a tier answers when its exit is confident.
    #[default]
    Escalate,
    /// The entry tier drafts up to `draft_len` tokens; the top tier verifies them in one pass.
    Speculate,
    /// Never leave the entry node.
    Local,
}

impl std::str::FromStr for InferMode {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<Self> {
        match s {
            "route" => Ok(InferMode::Route),
            "escalate" => Ok(InferMode::Escalate),
            "speculate" => Ok(InferMode::Speculate),
            "local" => Ok(InferMode::Local),
            other => Err(crate::Error::invalid(
                "mode",
                format!("unknown mode {other:?} (route|escalate|speculate|local)"),
            )),
        }
    }
}

impl InferMode {
    /// The lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            InferMode::Route => "route",
            InferMode::Escalate => "escalate",
            InferMode::Speculate => "speculate",
            InferMode::Local => "local",
        }
    }
}

/// Which confidence number is compared with the thresholds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub enum ConfidenceMeasure {
    /// Largest softmax probability (in [0, 1]).
    #[default]
    MaxProb,
    /// Top-1 minus top-2 probability (in [0, 1]).
    Margin,
    /// Negated entropy in nats (≤ 0).
    NegEntropy,
}

/// Confidence threshold of one exit.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ExitThreshold {
    /// Exit point.
    pub exit: u32,
    /// A tier answers when its exit's confidence is at least this.
    pub threshold: f32,
}

/// The inference policy of a request, carried by its stream's [`Open`] so each tier decides
/// alike.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Policy {
    /// Route, escalate, speculate or local.
    pub mode: InferMode,
    /// `Route`: the exit that answers (the first tier whose exit is at least this).
    pub answer_exit: Option<u32>,
    /// `Escalate`: per-exit thresholds (exits not listed use `default_threshold`).
    pub thresholds: Vec<ExitThreshold>,
    /// Threshold of exits not in `thresholds`.
    pub default_threshold: f32,
    /// Confidence measure.
    pub measure: ConfidenceMeasure,
    /// `Speculate`: the most tokens drafted per round (the entry adapts the length within
    /// 1..=draft_len to acceptance and round-trip time; it starts at draft_len).
    pub draft_len: u32,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            mode: InferMode::Escalate,
            answer_exit: None,
            thresholds: Vec::new(),
            default_threshold: 0.9,
            measure: ConfidenceMeasure::MaxProb,
            draft_len: 4,
        }
    }
}

impl Policy {
    /// The threshold of `exit`.
    pub fn threshold_for(&self, exit: u32) -> f32 {
        self.thresholds
            .iter()
            .find(|t| t.exit == exit)
            .map(|t| t.threshold)
            .unwrap_or(self.default_threshold)
    }

    /// Whether the measure is bounded by 1 (so a threshold above 1 means "always escalate").
    pub fn measure_is_bounded(&self) -> bool {
        matches!(
            self.measure,
            ConfidenceMeasure::MaxProb | ConfidenceMeasure::Margin
        )
    }
}

/// The verifier's answer to a `Draft`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    /// Request id.
    pub request_id: u64,
    /// Session id.
    pub session_id: u64,
    /// Length of the accepted prefix of the draft.
    pub accepted: u32,
    /// The verifier's own next token (after the accepted prefix).
    pub next_token: u32,
    /// Tier that verified.
    pub tier: Role,
    /// Exit that produced `next_token`.
    pub exit: u32,
}

/// One generated token with its provenance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenOut {
    /// Token id.
    pub id: u32,
    /// Position in the sequence.
    pub position: u32,
    /// Tier that produced it.
    pub tier: Role,
    /// Exit index that produced it.
    pub exit: u32,
    /// Confidence measure at that exit (max-prob, margin or 1-entropy, per plan).
    pub confidence: f32,
    /// Natural-log probability of `id` under that exit's distribution (before temperature
    /// and nucleus truncation, as vLLM and OpenAI report it); NaN where the producing tier
    /// did not compute it (tokens accepted from a speculative draft).
    pub logprob: f32,
    /// The `Sampling::top_logprobs` most likely tokens at that exit, most likely first.
    pub top_logprobs: Vec<TopLogprob>,
}

/// One alternative token and its log-probability.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TopLogprob {
    /// Token id.
    pub id: u32,
    /// Natural-log probability.
    pub logprob: f32,
}

/// Streamed results.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tokens {
    /// Request id.
    pub request_id: u64,
    /// Session id.
    pub session_id: u64,
    /// Tokens in order.
    pub tokens: Vec<TokenOut>,
    /// True when produced under degraded conditions (parent unreachable, deadline missed,
    /// lossy fallback) so the answer may differ from the full model's.
    pub degraded: bool,
}

/// Stop a request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cancel {
    /// Request id.
    pub request_id: u64,
    /// Session id.
    pub session_id: u64,
    /// Why (for logs).
    pub reason: String,
}

/// Typed error codes carried by [`ErrorMsg`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ErrorCode {
    /// Frame could not be parsed.
    Malformed,
    /// Protocol versions do not overlap.
    VersionMismatch,
    /// The peers serve different models.
    ModelMismatch,
    /// Unknown frame kind.
    UnknownKind,
    /// A length field exceeded the receiver's limit.
    FrameTooLarge,
    /// A tensor or list exceeded a limit.
    LimitExceeded,
    /// The peer already has `max_sessions_per_peer` sessions open.
    TooManySessions,
    /// A tensor had NaN/inf where finite values were required.
    NonFinite,
    /// Authentication or role check failed.
    Unauthorized,
    /// The peer's role is not one this node accepts.
    RoleMismatch,
    /// The deadline passed.
    DeadlineExceeded,
    /// The request was cancelled.
    Cancelled,
    /// The node is overloaded; retry elsewhere or later.
    Overloaded,
    /// Unknown request or session.
    NotFound,
    /// A message arrived that this state does not expect.
    Unexpected,
    /// Anything else.
    Internal,
}

impl ErrorCode {
    /// Whether the code says "what you sent is wrong" (a malformed or unexpected message, a
    /// version, model, role or limit the receiver refuses): retrying the same message at the
    /// same peer cannot succeed, and the sender should not read it as the peer failing.
    pub fn is_refusal(self) -> bool {
        matches!(
            self,
            ErrorCode::Malformed
                | ErrorCode::VersionMismatch
                | ErrorCode::ModelMismatch
                | ErrorCode::UnknownKind
                | ErrorCode::FrameTooLarge
                | ErrorCode::LimitExceeded
                | ErrorCode::NonFinite
                | ErrorCode::Unauthorized
                | ErrorCode::RoleMismatch
                | ErrorCode::Unexpected
        )
    }
}

/// An error report; on a session stream it ends that session only.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorMsg {
    /// Typed code.
    pub code: ErrorCode,
    /// What happened and what to do, for humans.
    pub message: String,
    /// Request the error belongs to, if known.
    pub request_id: Option<u64>,
}

/// Per-request statistics sent with `Done`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DoneStats {
    /// Tokens generated by the sender's tier (and below it).
    pub tokens: u32,
    /// Compute time on the sender, µs.
    pub compute_us: u64,
    /// Time spent waiting for deeper tiers, µs.
    pub wait_us: u64,
    /// Drafted tokens accepted (speculative mode).
    pub drafts_accepted: u32,
    /// Drafted tokens rejected.
    pub drafts_rejected: u32,
}

/// The request finished normally.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Done {
    /// Request id.
    pub request_id: u64,
    /// Session id.
    pub session_id: u64,
    /// Statistics.
    pub stats: DoneStats,
}

/// Link probe: the receiver answers with a `ProbeReply` carrying `reply_bytes` of payload.
/// The payload is a 1-D int8 tensor (content irrelevant; [`Probe::new`] fills it with
/// incompressible bytes so zstd cannot distort the estimate).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Probe {
    /// Sequence number echoed in the reply.
    pub seq: u64,
    /// Payload size the reply should carry.
    pub reply_bytes: u32,
    /// Payload.
    pub payload: WireTensor,
}

/// Answer to a `Probe`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeReply {
    /// Echoed sequence number.
    pub seq: u64,
    /// Payload of the requested size.
    pub payload: WireTensor,
}

/// A 1-D int8 tensor with `bytes` bytes on the wire (at least 5) of pseudo-random content.
pub fn probe_payload(bytes: u32, seed: u64) -> WireTensor {
    let n = bytes.saturating_sub(4).max(1) as usize;
    let mut out = Vec::with_capacity(4 + n);
    out.extend_from_slice(&1.0f32.to_le_bytes());
    let mut s = seed | 1;
    for _ in 0..n {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        out.push((s >> 24) as u8);
    }
    // 4 scale bytes + n values = Int8.byte_len([n]) by construction.
    WireTensor::new_unchecked(vec![n as u32], crate::Encoding::Int8, out.into())
}

impl Probe {
    /// A probe carrying `payload_bytes` and asking for `reply_bytes` back.
    pub fn new(seq: u64, payload_bytes: u32, reply_bytes: u32) -> Self {
        Probe {
            seq,
            reply_bytes,
            payload: probe_payload(payload_bytes, seq),
        }
    }

    /// The answer to this probe. The requested size is peer-controlled, so it is capped at
    /// what `limits` allow in one frame (and at `limits.max_elements` int8 values).
    pub fn reply(&self, limits: &crate::Limits) -> ProbeReply {
        let cap = limits
            .max_frame_bytes
            .saturating_sub(1024)
            .min(limits.max_elements)
            .min(u64::from(u32::MAX)) as u32;
        ProbeReply {
            seq: self.seq,
            payload: probe_payload(self.reply_bytes.min(cap), !self.seq),
        }
    }
}

/// One frame's worth of meaning.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// Version/model negotiation.
    Hello(Hello),
    /// Liveness and load.
    Heartbeat(Heartbeat),
    /// First message of a request stream: what its later messages share (protocol 4).
    Open(Open),
    /// Hidden states for the next tier.
    Continue(Continue),
    /// Speculative draft.
    Draft(Draft),
    /// Speculative verdict.
    Verdict(Verdict),
    /// Streamed tokens.
    Tokens(Tokens),
    /// Stop a request.
    Cancel(Cancel),
    /// Typed error.
    Error(ErrorMsg),
    /// Request finished.
    Done(Done),
    /// Link probe.
    Probe(Probe),
    /// Link probe answer.
    ProbeReply(ProbeReply),
    /// Start of a delta checkpoint transfer (edge → device).
    DeltaOffer(DeltaOffer),
    /// A piece of a delta checkpoint.
    DeltaChunk(DeltaChunk),
    /// The device's answer to a transfer or rollback.
    DeltaAck(DeltaAck),
    /// Undo a delta version.
    DeltaRollback(DeltaRollback),
    /// A federated round: the aggregator's request, or a participant's sample count.
    RoundUpdate(RoundUpdate),
    /// A vision exit's answer about one camera frame (traffic app).
    Classification(crate::classify::Classification),
    /// A parent's links to its own parents and theirs (protocol 3, control stream).
    Upstream(crate::upstream::Upstream),
}

/// Frame kind bytes. Stable: new kinds get new numbers.
pub mod kind {
    #![allow(missing_docs)]
    pub const HELLO: u8 = 1;
    pub const HEARTBEAT: u8 = 2;
    pub const CONTINUE: u8 = 3;
    pub const DRAFT: u8 = 4;
    pub const VERDICT: u8 = 5;
    pub const TOKENS: u8 = 6;
    pub const CANCEL: u8 = 7;
    pub const ERROR: u8 = 8;
    pub const DONE: u8 = 9;
    pub const PROBE: u8 = 10;
    pub const PROBE_REPLY: u8 = 11;
    pub const DELTA_OFFER: u8 = 12;
    pub const DELTA_CHUNK: u8 = 13;
    pub const DELTA_ACK: u8 = 14;
    pub const DELTA_ROLLBACK: u8 = 15;
    pub const CLASSIFICATION: u8 = 16;
    pub const ROUND_UPDATE: u8 = 17;
    pub const UPSTREAM: u8 = 18;
    pub const OPEN: u8 = 19;
}

impl Message {
    /// The frame kind byte for this message.
    pub fn kind(&self) -> u8 {
        match self {
            Message::Hello(_) => kind::HELLO,
            Message::Heartbeat(_) => kind::HEARTBEAT,
            Message::Open(_) => kind::OPEN,
            Message::Continue(_) => kind::CONTINUE,
            Message::Draft(_) => kind::DRAFT,
            Message::Verdict(_) => kind::VERDICT,
            Message::Tokens(_) => kind::TOKENS,
            Message::Cancel(_) => kind::CANCEL,
            Message::Error(_) => kind::ERROR,
            Message::Done(_) => kind::DONE,
            Message::Probe(_) => kind::PROBE,
            Message::ProbeReply(_) => kind::PROBE_REPLY,
            Message::DeltaOffer(_) => kind::DELTA_OFFER,
            Message::DeltaChunk(_) => kind::DELTA_CHUNK,
            Message::DeltaAck(_) => kind::DELTA_ACK,
            Message::DeltaRollback(_) => kind::DELTA_ROLLBACK,
            Message::RoundUpdate(_) => kind::ROUND_UPDATE,
            Message::Classification(_) => kind::CLASSIFICATION,
            Message::Upstream(_) => kind::UPSTREAM,
        }
    }

    /// The oldest protocol version that can read this message: what its frame prefix says,
    /// so a peer on an older version reads every frame it can. Never below
    /// [`MIN_PROTOCOL_VERSION`] (since protocol 4 that is every frame's version).
    pub fn min_version(&self) -> u16 {
        let since = match self {
            Message::Upstream(_) => crate::upstream::UPSTREAM_SINCE_VERSION,
            _ => MIN_PROTOCOL_VERSION,
        };
        since.max(MIN_PROTOCOL_VERSION)
    }

    /// Variant name, for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello(_) => "Hello",
            Message::Heartbeat(_) => "Heartbeat",
            Message::Open(_) => "Open",
            Message::Continue(_) => "Continue",
            Message::Draft(_) => "Draft",
            Message::Verdict(_) => "Verdict",
            Message::Tokens(_) => "Tokens",
            Message::Cancel(_) => "Cancel",
            Message::Error(_) => "Error",
            Message::Done(_) => "Done",
            Message::Probe(_) => "Probe",
            Message::ProbeReply(_) => "ProbeReply",
            Message::DeltaOffer(_) => "DeltaOffer",
            Message::DeltaChunk(_) => "DeltaChunk",
            Message::DeltaAck(_) => "DeltaAck",
            Message::DeltaRollback(_) => "DeltaRollback",
            Message::RoundUpdate(_) => "RoundUpdate",
            Message::Classification(_) => "Classification",
            Message::Upstream(_) => "Upstream",
        }
    }

    /// Shorthand for an `Error` message.
    pub fn error(code: ErrorCode, message: impl Into<String>, request_id: Option<u64>) -> Self {
        Message::Error(ErrorMsg {
            code,
            message: message.into(),
            request_id,
        })
    }

    /// Structural consistency that shapes alone do not give: a step's hidden states are
    /// `[rows, hidden]` with sane positions and draft lengths ([`crate::step`]), and hosted
    /// layer ranges are ordered. The codec checks this on encode and decode.
    pub fn check_consistency(&self) -> crate::Result<()> {
        match self {
            Message::Continue(c) => c.validate()?,
            Message::Draft(d) => d.validate()?,
            Message::Hello(h) => {
                if let Some(r) = h.hosted.iter().find(|r| r.start > r.end) {
                    return Err(crate::Error::malformed(
                        "hello.hosted",
                        format!("layer range {}..{} is reversed", r.start, r.end),
                    ));
                }
            }
            Message::DeltaOffer(o) => o.check()?,
            Message::DeltaChunk(c) => c.check()?,
            Message::DeltaAck(a) => crate::delta::check_text("delta_ack.message", &a.message)?,
            Message::RoundUpdate(r) => r.check()?,
            Message::Classification(c) => c.check()?,
            Message::Upstream(u) => u.check()?,
            _ => {}
        }
        Ok(())
    }

    /// The tensors whose bytes travel in the payload, in payload order.
    pub fn tensors(&self) -> Vec<&WireTensor> {
        match self {
            Message::Continue(c) => {
                let mut v = vec![&c.hidden];
                if let Some(b) = &c.backfill {
                    v.push(&b.hidden);
                }
                v
            }
            Message::Draft(d) => vec![&d.hidden],
            Message::Probe(p) => vec![&p.payload],
            Message::ProbeReply(p) => vec![&p.payload],
            _ => Vec::new(),
        }
    }

    /// Mutable access in the same order as [`tensors`](Self::tensors).
    pub(crate) fn tensors_mut(&mut self) -> Vec<&mut WireTensor> {
        match self {
            Message::Continue(c) => {
                let mut v = vec![&mut c.hidden];
                if let Some(b) = &mut c.backfill {
                    v.push(&mut b.hidden);
                }
                v
            }
            Message::Draft(d) => vec![&mut d.hidden],
            Message::Probe(p) => vec![&mut p.payload],
            Message::ProbeReply(p) => vec![&mut p.payload],
            _ => Vec::new(),
        }
    }
}
