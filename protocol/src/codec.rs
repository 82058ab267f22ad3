//! Framing: [`Codec`] encodes messages, [`FrameDecoder`] decodes them incrementally.
//!
//! Frame layout (all integers little-endian):
//!
//! ```text
//! offset size  field
//! 0      4     magic        b"AIFL"
//! 4      2     version      protocol version of this frame (u16)
//! 6      1     kind         message kind (see message::kind)
//! 7      4     header_len   bytes of postcard header (u32)
//! 11     4     payload_len  bytes of tensor payload after the header (u32)
//! 15     H     header       postcard-encoded message fields; tensors appear as
//!                           (shape, encoding) only
//! 15+H   P     payload      one section per tensor, in message order:
//!                             compression u8 (0 = none, 1 = zstd)
//!                             wire_len    u32
//!                             bytes       wire_len bytes (layout: crate::tensor)
//! ```
//!
//! The decoder checks magic, version, kind, `header_len` and the whole frame length against
//! [`Limits`] as soon as the 15-byte prefix is in, before it reserves room for the frame; it
//! checks every tensor's shape and length before it looks at the tensor's bytes, and
//! decompresses zstd sections into a buffer bounded by the size the header implies.
//! A lying length field therefore never causes an allocation beyond the limits (I6).

use bytes::{Buf, Bytes, BytesMut};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::limits::Limits;
use crate::message::{kind, Message, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};

/// Frame magic.
pub const MAGIC: [u8; 4] = *b"AIFL";
/// Bytes in the fixed frame prefix.
pub const PREFIX_LEN: usize = 15;
/// Bytes in a tensor section's prefix (compression + wire_len).
pub const SECTION_PREFIX_LEN: usize = 5;

const SECTION_RAW: u8 = 0;
const SECTION_ZSTD: u8 = 1;
/// Tensors smaller than this are never compressed.
const ZSTD_MIN_BYTES: usize = 256;

/// Optional compression of tensor bytes, chosen per link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    /// Send tensor bytes as they are.
    #[default]
    None,
    /// zstd at this level (1 is fast; 3 is zstd's default). A section is sent raw when
    /// compression does not make it smaller.
    Zstd {
        /// zstd level.
        level: i32,
    },
}

/// Encoder settings plus a factory for decoders.
#[derive(Debug, Clone, Copy, Default)]
pub struct Codec {
    /// Limits checked on the way out (so a same-config peer accepts what we send) and given
    /// to decoders.
    pub limits: Limits,
    /// Compression applied to outgoing tensor sections.
    pub compression: Compression,
}

impl Codec {
    /// A codec with these limits and no compression.
    pub fn new(limits: Limits) -> Self {
        Codec {
            limits,
            compression: Compression::None,
        }
    }

    /// Same codec with `compression` for outgoing frames.
    pub fn with_compression(mut self, compression: Compression) -> Self {
        self.compression = compression;
        self
    }

    /// A fresh incremental decoder with this codec's limits.
    pub fn decoder(&self) -> FrameDecoder {
        FrameDecoder::new(self.limits)
    }

    /// Encode `msg` as a list of chunks (prefix+header, then section prefixes and tensor bytes)
    /// that can be written without copying tensor data (`quinn::SendStream::write_all_chunks`).
    pub fn encode_chunks(&self, msg: &Message) -> Result<Vec<Bytes>> {
        let header = encode_header(msg)?;
        if header.len() as u64 > self.limits.max_header_bytes {
            return Err(Error::FrameTooLarge {
                field: "header_len",
                got: header.len() as u64,
                limit: self.limits.max_header_bytes,
            });
        }
        msg.check_consistency()?;
        let tensors = msg.tensors();
        Limits::check(
            "tensors",
            tensors.len() as u64,
            self.limits.max_tensors as u64,
        )?;
        let mut sections: Vec<(u8, Bytes)> = Vec::with_capacity(tensors.len());
        for t in tensors {
            t.validate(&self.limits)?;
            let raw = t.bytes().clone();
            let section = match self.compression {
                Compression::Zstd { level } if raw.len() >= ZSTD_MIN_BYTES => {
                    let packed = zstd_compress(&raw, level)?;
                    if packed.len() < raw.len() {
                        (SECTION_ZSTD, Bytes::from(packed))
                    } else {
                        (SECTION_RAW, raw)
                    }
                }
                _ => (SECTION_RAW, raw),
            };
            sections.push(section);
        }
        let payload_len: u64 = sections
            .iter()
            .map(|(_, b)| (SECTION_PREFIX_LEN + b.len()) as u64)
            .sum();
        let frame_len = PREFIX_LEN as u64 + header.len() as u64 + payload_len;
        if frame_len > self.limits.max_frame_bytes {
            return Err(Error::FrameTooLarge {
                field: "frame_len",
                got: frame_len,
                limit: self.limits.max_frame_bytes,
            });
        }
        let payload_len = u32::try_from(payload_len).map_err(|_| Error::FrameTooLarge {
            field: "payload_len",
            got: payload_len,
            limit: u64::from(u32::MAX),
        })?;

        let mut head = Vec::with_capacity(PREFIX_LEN + header.len() + SECTION_PREFIX_LEN);
        head.extend_from_slice(&MAGIC);
        head.extend_from_slice(&msg.min_version().to_le_bytes());
        head.push(msg.kind());
        head.extend_from_slice(&(header.len() as u32).to_le_bytes());
        head.extend_from_slice(&payload_len.to_le_bytes());
        head.extend_from_slice(&header);
        let mut chunks = Vec::with_capacity(1 + 2 * sections.len());
        let mut pending_prefix = head;
        for (flag, data) in sections {
            pending_prefix.push(flag);
            pending_prefix.extend_from_slice(&(data.len() as u32).to_le_bytes());
            chunks.push(Bytes::from(std::mem::take(&mut pending_prefix)));
            chunks.push(data);
        }
        if !pending_prefix.is_empty() {
            chunks.push(Bytes::from(pending_prefix));
        }
        Ok(chunks)
    }

    /// Encode `msg` into one contiguous buffer.
    pub fn encode(&self, msg: &Message) -> Result<Vec<u8>> {
        let chunks = self.encode_chunks(msg)?;
        let mut out = Vec::with_capacity(chunks.iter().map(Bytes::len).sum());
        for c in chunks {
            out.extend_from_slice(&c);
        }
        Ok(out)
    }

    /// Decode exactly one complete frame from `bytes` (convenience for tests and files).
    /// Returns [`Error::Malformed`] if `bytes` is incomplete or has trailing data.
    pub fn decode(&self, bytes: &[u8]) -> Result<Message> {
        let mut d = self.decoder();
        d.push(bytes);
        match d.next_message()? {
            Some(m) if d.buffered() == 0 => Ok(m),
            Some(_) => Err(Error::malformed("frame", "trailing bytes after the frame")),
            None => Err(Error::malformed(
                "frame",
                format!("incomplete: {} more bytes needed", d.needed()),
            )),
        }
    }
}

thread_local! {
    /// zstd contexts are expensive to set up (tens of µs); keep one per thread.
    static ZSTD_C: std::cell::RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { std::cell::RefCell::new(None) };
    static ZSTD_D: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

fn zstd_err(e: std::io::Error) -> Error {
    Error::Zstd(e.to_string())
}

fn zstd_compress(data: &[u8], level: i32) -> Result<Vec<u8>> {
    ZSTD_C.with(|cell| {
        let mut slot = cell.borrow_mut();
        match slot.as_mut() {
            Some((l, c)) if *l == level => c.compress(data).map_err(zstd_err),
            _ => {
                let mut c = zstd::bulk::Compressor::new(level).map_err(zstd_err)?;
                let out = c.compress(data).map_err(zstd_err)?;
                *slot = Some((level, c));
                Ok(out)
            }
        }
    })
}

/// Decompress into at most `capacity` bytes (zstd errors if the output would be larger).
fn zstd_decompress(data: &[u8], capacity: usize) -> Result<Vec<u8>> {
    ZSTD_D.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(zstd::bulk::Decompressor::new().map_err(zstd_err)?);
        }
        match slot.as_mut() {
            Some(d) => d.decompress(data, capacity).map_err(zstd_err),
            None => Err(Error::Zstd("no decompression context".into())),
        }
    })
}

fn ser<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    Ok(postcard::to_allocvec(v)?)
}

fn encode_header(msg: &Message) -> Result<Vec<u8>> {
    match msg {
        Message::Hello(m) => ser(m),
        Message::Heartbeat(m) => ser(m),
        Message::Open(m) => ser(m),
        Message::Continue(m) => ser(m),
        Message::Draft(m) => ser(m),
        Message::Verdict(m) => ser(m),
        Message::Tokens(m) => ser(m),
        Message::Cancel(m) => ser(m),
        Message::Error(m) => ser(m),
        Message::Done(m) => ser(m),
        Message::Probe(m) => ser(m),
        Message::ProbeReply(m) => ser(m),
        Message::DeltaOffer(m) => ser(m),
        Message::DeltaChunk(m) => ser(m),
        Message::DeltaAck(m) => ser(m),
        Message::DeltaRollback(m) => ser(m),
        Message::RoundUpdate(m) => ser(m),
        Message::Classification(m) => ser(m),
        Message::Upstream(m) => ser(m),
    }
}

fn de<T: DeserializeOwned>(header: &[u8]) -> Result<T> {
    let (v, rest) = postcard::take_from_bytes(header)?;
    if !rest.is_empty() {
        return Err(Error::malformed(
            "header",
            format!("{} trailing bytes", rest.len()),
        ));
    }
    Ok(v)
}

fn decode_header(kind: u8, header: &[u8]) -> Result<Message> {
    Ok(match kind {
        kind::HELLO => Message::Hello(de(header)?),
        kind::HEARTBEAT => Message::Heartbeat(de(header)?),
        kind::OPEN => Message::Open(de(header)?),
        kind::CONTINUE => Message::Continue(de(header)?),
        kind::DRAFT => Message::Draft(de(header)?),
        kind::VERDICT => Message::Verdict(de(header)?),
        kind::TOKENS => Message::Tokens(de(header)?),
        kind::CANCEL => Message::Cancel(de(header)?),
        kind::ERROR => Message::Error(de(header)?),
        kind::DONE => Message::Done(de(header)?),
        kind::PROBE => Message::Probe(de(header)?),
        kind::PROBE_REPLY => Message::ProbeReply(de(header)?),
        kind::DELTA_OFFER => Message::DeltaOffer(de(header)?),
        kind::DELTA_CHUNK => Message::DeltaChunk(de(header)?),
        kind::DELTA_ACK => Message::DeltaAck(de(header)?),
        kind::DELTA_ROLLBACK => Message::DeltaRollback(de(header)?),
        kind::ROUND_UPDATE => Message::RoundUpdate(de(header)?),
        kind::CLASSIFICATION => Message::Classification(de(header)?),
        kind::UPSTREAM => Message::Upstream(de(header)?),
        other => return Err(Error::UnknownKind(other)),
    })
}

fn known_kind(k: u8) -> bool {
    (kind::HELLO..=kind::OPEN).contains(&k)
}

#[derive(Debug, Clone, Copy)]
struct Prefix {
    version: u16,
    kind: u8,
    header_len: usize,
    payload_len: usize,
}

/// Incremental frame decoder: [`push`](Self::push) bytes as they arrive, then call
/// [`next_message`](Self::next_message) until it returns `Ok(None)` ("need more bytes").
///
/// Errors in the fixed prefix (bad magic, version, kind, or a length over the limit) leave
/// the byte stream unaligned, so the decoder stops: every later call returns
/// [`Error::Closed`]. Errors inside a frame whose length was acceptable (a bad tensor shape,
/// a malformed header) consume just that frame; the caller may continue.
#[derive(Debug)]
pub struct FrameDecoder {
    limits: Limits,
    buf: BytesMut,
    pending: Option<Prefix>,
    failed: bool,
}

impl FrameDecoder {
    /// A decoder enforcing `limits`.
    pub fn new(limits: Limits) -> Self {
        FrameDecoder {
            limits,
            buf: BytesMut::new(),
            pending: None,
            failed: false,
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Append received bytes. Call [`next_message`](Self::next_message) after each push; the
    /// buffer then never holds more than one frame (within limits) plus the last push.
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// Bytes buffered but not yet consumed.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Bytes still missing before the next step can complete (prefix or whole frame).
    pub fn needed(&self) -> usize {
        let want = match self.pending {
            None => PREFIX_LEN,
            Some(p) => PREFIX_LEN + p.header_len + p.payload_len,
        };
        want.saturating_sub(self.buf.len())
    }

    /// Whether a prefix error stopped this decoder.
    pub fn is_failed(&self) -> bool {
        self.failed
    }

    /// The next complete message, `Ok(None)` if more bytes are needed, or an error.
    pub fn next_message(&mut self) -> Result<Option<Message>> {
        if self.failed {
            return Err(Error::Closed(
                "frame decoder stopped after an earlier framing error".into(),
            ));
        }
        let prefix = match self.pending {
            Some(p) => p,
            None => {
                if self.buf.len() < PREFIX_LEN {
                    return Ok(None);
                }
                match parse_prefix(&self.buf[..PREFIX_LEN], &self.limits) {
                    Ok(p) => {
                        // Bounded by max_frame_bytes, checked in parse_prefix.
                        let total = PREFIX_LEN + p.header_len + p.payload_len;
                        self.buf.reserve(total.saturating_sub(self.buf.len()));
                        self.pending = Some(p);
                        p
                    }
                    Err(e) => {
                        self.failed = true;
                        self.buf = BytesMut::new();
                        return Err(e);
                    }
                }
            }
        };
        let total = PREFIX_LEN + prefix.header_len + prefix.payload_len;
        if self.buf.len() < total {
            return Ok(None);
        }
        self.pending = None;
        let mut frame = self.buf.split_to(total).freeze();
        frame.advance(PREFIX_LEN);
        let header = frame.split_to(prefix.header_len);
        decode_frame(prefix, &header, frame, &self.limits).map(Some)
    }
}

fn parse_prefix(p: &[u8], limits: &Limits) -> Result<Prefix> {
    let magic = [p[0], p[1], p[2], p[3]];
    if magic != MAGIC {
        return Err(Error::BadMagic { got: magic });
    }
    let version = u16::from_le_bytes([p[4], p[5]]);
    if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&version) {
        return Err(Error::UnsupportedVersion {
            got: version,
            min: MIN_PROTOCOL_VERSION,
            max: PROTOCOL_VERSION,
        });
    }
    let kind = p[6];
    if !known_kind(kind) {
        return Err(Error::UnknownKind(kind));
    }
    let header_len = u64::from(u32::from_le_bytes([p[7], p[8], p[9], p[10]]));
    let payload_len = u64::from(u32::from_le_bytes([p[11], p[12], p[13], p[14]]));
    if header_len > limits.max_header_bytes {
        return Err(Error::FrameTooLarge {
            field: "header_len",
            got: header_len,
            limit: limits.max_header_bytes,
        });
    }
    let frame_len = PREFIX_LEN as u64 + header_len + payload_len;
    if frame_len > limits.max_frame_bytes {
        return Err(Error::FrameTooLarge {
            field: "payload_len",
            got: payload_len,
            limit: limits.max_frame_bytes,
        });
    }
    Ok(Prefix {
        version,
        kind,
        header_len: header_len as usize,
        payload_len: payload_len as usize,
    })
}

fn decode_frame(
    prefix: Prefix,
    header: &[u8],
    mut payload: Bytes,
    limits: &Limits,
) -> Result<Message> {
    let mut msg = decode_header(prefix.kind, header)?;
    if msg.min_version() > prefix.version {
        return Err(Error::malformed(
            "version",
            format!(
                "{} frames need protocol {}, the frame says {}",
                msg.name(),
                msg.min_version(),
                prefix.version
            ),
        ));
    }
    msg.check_consistency()?;
    let mut decompressed: u64 = 0;
    let tensors = msg.tensors_mut();
    Limits::check("tensors", tensors.len() as u64, limits.max_tensors as u64)?;
    for t in tensors {
        limits.check_shape(t.shape())?;
        let expected = t.encoding().byte_len(t.shape());
        if payload.len() < SECTION_PREFIX_LEN {
            return Err(Error::malformed(
                "payload",
                "truncated tensor section prefix",
            ));
        }
        let flag = payload[0];
        let wire_len =
            u32::from_le_bytes([payload[1], payload[2], payload[3], payload[4]]) as usize;
        payload.advance(SECTION_PREFIX_LEN);
        if wire_len > payload.len() {
            return Err(Error::LengthMismatch {
                field: "section.wire_len",
                expected: payload.len() as u64,
                got: wire_len as u64,
            });
        }
        let data = payload.split_to(wire_len);
        match flag {
            SECTION_RAW => {
                if wire_len as u64 != expected {
                    return Err(Error::LengthMismatch {
                        field: "tensor.bytes",
                        expected,
                        got: wire_len as u64,
                    });
                }
                t.set_bytes(data);
            }
            SECTION_ZSTD => {
                decompressed = decompressed.saturating_add(expected);
                if decompressed > limits.max_frame_bytes {
                    return Err(Error::FrameTooLarge {
                        field: "decompressed_len",
                        got: decompressed,
                        limit: limits.max_frame_bytes,
                    });
                }
                // Capacity is bounded by the checked shape; zstd errors if output would exceed it.
                let raw = zstd_decompress(&data, expected as usize)?;
                if raw.len() as u64 != expected {
                    return Err(Error::LengthMismatch {
                        field: "tensor.bytes",
                        expected,
                        got: raw.len() as u64,
                    });
                }
                t.set_bytes(Bytes::from(raw));
            }
            other => {
                return Err(Error::malformed(
                    "section.compression",
                    format!("unknown compression {other}"),
                ))
            }
        }
        if limits.require_finite {
            t.check_finite("tensor")?;
        }
    }
    if !payload.is_empty() {
        return Err(Error::malformed(
            "payload",
            format!("{} trailing bytes", payload.len()),
        ));
    }
    Ok(msg)
}
