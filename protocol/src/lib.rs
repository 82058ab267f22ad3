//! # flow-protocol: the aiflow wire
//!
//! Nodes of a device → edge → cloud chain ship hidden states ("continue from layer k with
//! these activations") and stream tokens back. This crate is everything on the wire:
//!
//! - **Messages** ([`message`]): [`Hello`] (version + model negotiation), [`Heartbeat`],
//!   [`Tokens`], [`Verdict`], [`Cancel`],
//!   [`Done`], [`Probe`]/[`ProbeReply`], and typed errors ([`ErrorMsg`] + [`ErrorCode`]);
//!   [`step`]: a request stream's [`Open`] (sent once: ids, layer, policy, sampling) and
//!   its per-step [`Continue`] and [`Draft`] (a start position and tensors, protocol 4);
//!   [`delta`]: pushing fine-tuned delta checkpoints to devices ([`DeltaOffer`],
//!   [`DeltaChunk`], [`DeltaAck`], [`DeltaRollback`]) and federated rounds
//!   ([`RoundUpdate`]); [`classify`]: a vision exit's
//!   answer about a camera frame ([`Classification`], the traffic app's reply to
//!   `Continue`); [`upstream`]: a parent's report of the tiers beyond it ([`Upstream`],
//!   protocol 3).
//! - **Framing** ([`codec`]): magic, version, kind, header length, payload length, a
//!   postcard header, then raw little-endian tensor bytes. [`Codec`] encodes;
//!   [`FrameDecoder`] decodes incrementally (push bytes, pull messages) and checks every
//!   length against [`Limits`] *before* allocating (invariant I6).
//! - **Tensors** ([`tensor`]): [`WireTensor`] in f32, f16, bf16 or int8 with per-row
//!   scales ([`Encoding`]), optional zstd per link ([`Compression`]).
//! - **Negotiation** ([`handshake::negotiate`]): protocol version ranges, model
//!   fingerprint, peer role.
//! - **Transport** ([`transport`], feature `transport`, the only place with tokio): QUIC
//!   via quinn + rustls (ring provider, TLS 1.3, ALPN `aiflow/1`), mutual TLS against a
//!   cluster CA with the node's role bound in its certificate ([`transport::certs`]), one
//!   stream per request session, per-connection stats for the planner.
//!
//! Everything except [`transport`] is sans-IO: no sockets, no clocks, plain functions and
//! structs, so the hard cases are unit tests.
//!
//! ```
//! use flow_protocol::{Codec, Continue, Encoding, Limits, Message, Open, Sampling, WireTensor};
//! let hidden = WireTensor::encode(&[0.5f32; 2 * 8], &[2, 8], Encoding::F16)?;
//! let open = Message::Open(Open {
//!     request_id: 1, session_id: 1, layer: 4, policy: Default::default(),
//!     sampling: Sampling::default(), deadline_ms: None,
//! });
//! let msg = Message::Continue(Continue { start: 0, hidden, backfill: None, deadline_ms: Some(500) });
//! let codec = Codec::new(Limits::default());
//! assert_eq!(codec.decode(&codec.encode(&open)?)?, open);
//! let bytes = codec.encode(&msg)?;
//! let mut dec = codec.decoder();
//! dec.push(&bytes[..10]);
//! assert!(dec.next_message()?.is_none()); // needs more bytes
//! dec.push(&bytes[10..]);
//! assert_eq!(dec.next_message()?, Some(msg));
//! # Ok::<(), flow_protocol::Error>(())
//! ```

pub mod classify;
pub mod codec;
pub mod delta;
pub mod error;
pub mod handshake;
pub mod limits;
pub mod message;
pub mod step;
pub mod tensor;
#[cfg(feature = "transport")]
pub mod transport;
pub mod upstream;

/// Re-exported: [`WireTensor::bytes`] hands out `bytes::Bytes`.
pub use bytes;
pub use classify::Classification;
pub use codec::{Codec, Compression, FrameDecoder, MAGIC, PREFIX_LEN};
pub use delta::{DeltaAck, DeltaChunk, DeltaOffer, DeltaRollback, DeltaStatus, RoundUpdate};
pub use error::{Error, Result};
pub use limits::Limits;
pub use message::{
    Cancel, Capacity, ConfidenceMeasure, Done, DoneStats, ErrorCode, ErrorMsg, ExitThreshold,
    Heartbeat, Hello, HostedLayers, InferMode, Load, Message, ModelFingerprint, Policy, Probe,
    ProbeReply, Role, Sampling, TokenOut, Tokens, TopLogprob, Verdict, MAX_TOP_LOGPROBS,
    MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
};
pub use step::{Backfill, Continue, Draft, Open, StepError};
pub use tensor::{Encoding, WireTensor};
pub use upstream::{
    LinkState, Upstream, UpstreamLink, UpstreamPeer, UpstreamQuic, UPSTREAM_SINCE_VERSION,
};
