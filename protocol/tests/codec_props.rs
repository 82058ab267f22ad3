//! Property tests: every message and encoding round-trips; lossy encodings stay within
//! their error bounds; the decoder survives garbage and mutations (invariant I6).

use flow_protocol::{
    Backfill, Cancel, Capacity, Classification, Codec, Compression, ConfidenceMeasure, Continue,
    Done, DoneStats, Draft, Encoding, Error, ErrorCode, ErrorMsg, ExitThreshold, FrameDecoder,
    Heartbeat, Hello, HostedLayers, InferMode, Limits, Load, Message, ModelFingerprint, Open,
    Policy, Probe, ProbeReply, Role, Sampling, StepError, TokenOut, Tokens, Verdict, WireTensor,
};
use flow_protocol::{DeltaAck, DeltaChunk, DeltaOffer, DeltaRollback, DeltaStatus, RoundUpdate};
use proptest::prelude::*;

fn role() -> impl Strategy<Value = Role> {
    prop_oneof![Just(Role::Device), Just(Role::Edge), Just(Role::Cloud)]
}

fn encoding() -> impl Strategy<Value = Encoding> {
    prop_oneof![
        Just(Encoding::F32),
        Just(Encoding::F16),
        Just(Encoding::Bf16),
        Just(Encoding::Int8)
    ]
}

fn code() -> impl Strategy<Value = ErrorCode> {
    prop_oneof![
        Just(ErrorCode::Malformed),
        Just(ErrorCode::VersionMismatch),
        Just(ErrorCode::ModelMismatch),
        Just(ErrorCode::FrameTooLarge),
        Just(ErrorCode::TooManySessions),
        Just(ErrorCode::Cancelled),
        Just(ErrorCode::Internal),
    ]
}

/// Finite f32 values in a realistic activation range, with some exact zeros.
fn values(n: usize) -> impl Strategy<Value = Vec<f32>> {
    prop::collection::vec(
        prop_oneof![Just(0.0f32), -1.0e4f32..1.0e4f32, -1.0f32..1.0f32],
        n,
    )
}

fn tensor_with_rows(rows: usize) -> impl Strategy<Value = WireTensor> {
    (0usize..40, encoding()).prop_flat_map(move |(cols, enc)| {
        values(rows * cols)
            .prop_map(move |v| WireTensor::encode(&v, &[rows, cols], enc).expect("valid tensor"))
    })
}

fn tensor() -> impl Strategy<Value = WireTensor> {
    (0usize..6).prop_flat_map(tensor_with_rows)
}

/// A start position and a `[rows, hidden]` tensor (1..6 rows) whose positions fit a u32.
fn states() -> impl Strategy<Value = (u32, WireTensor)> {
    (1usize..6, 0..=u32::MAX - 6)
        .prop_flat_map(|(rows, start)| tensor_with_rows(rows).prop_map(move |t| (start, t)))
}

fn rows(t: &WireTensor) -> u32 {
    t.shape()[0]
}

fn policy() -> impl Strategy<Value = Policy> {
    (
        prop_oneof![
            Just(InferMode::Route),
            Just(InferMode::Escalate),
            Just(InferMode::Speculate),
            Just(InferMode::Local)
        ],
        any::<Option<u32>>(),
        proptest::collection::vec((any::<u32>(), -2.0f32..2.0), 0..4),
        -2.0f32..2.0,
        prop_oneof![
            Just(ConfidenceMeasure::MaxProb),
            Just(ConfidenceMeasure::Margin),
            Just(ConfidenceMeasure::NegEntropy)
        ],
        1u32..16,
    )
        .prop_map(
            |(mode, answer_exit, th, default_threshold, measure, draft_len)| Policy {
                mode,
                answer_exit,
                thresholds: th
                    .into_iter()
                    .map(|(exit, threshold)| ExitThreshold { exit, threshold })
                    .collect(),
                default_threshold,
                measure,
                draft_len,
            },
        )
}

fn sampling() -> impl Strategy<Value = Sampling> {
    (
        any::<f32>(),
        any::<f32>(),
        any::<u32>(),
        any::<u64>(),
        any::<u32>(),
        prop::collection::vec(any::<u32>(), 0..4),
    )
        .prop_map(
            |(temperature, top_p, top_k, seed, max_new_tokens, stop_tokens)| Sampling {
                temperature,
                top_p,
                top_k,
                seed,
                max_new_tokens,
                stop_tokens,
                top_logprobs: max_new_tokens % 21,
            },
        )
}

fn message() -> impl Strategy<Value = Message> {
    let hello = (
        "[a-z0-9-]{0,12}",
        role(),
        any::<u16>(),
        any::<u16>(),
        any::<[u8; 32]>(),
        prop::collection::vec((0u32..100, 0u32..100, any::<[u8; 32]>()), 0..3),
        (any::<u32>(), any::<u32>(), any::<f32>(), any::<u64>()),
    )
        .prop_map(|(node_id, role, v, mv, digest, hosted, cap)| {
            Message::Hello(Hello {
                node_id,
                role,
                protocol_version: v,
                min_protocol_version: mv,
                model: ModelFingerprint {
                    family: "fam".into(),
                    digest,
                },
                hosted: hosted
                    .into_iter()
                    .map(|(a, b, digest)| HostedLayers {
                        start: a.min(b),
                        end: a.max(b),
                        digest,
                    })
                    .collect(),
                capacity: Capacity {
                    max_sessions: cap.0,
                    max_batch_tokens: cap.1,
                    layer_tokens_per_s: cap.2,
                    free_memory_bytes: cap.3,
                },
            })
        });
    let heartbeat = (
        any::<u64>(),
        any::<u32>(),
        any::<u32>(),
        any::<f32>(),
        any::<f32>(),
    )
        .prop_map(|(seq, a, q, t, u)| {
            Message::Heartbeat(Heartbeat {
                seq,
                load: Load {
                    active_sessions: a,
                    queue_depth: q,
                    tokens_per_s: t,
                    utilisation: u,
                },
            })
        });
    let open = (
        any::<u64>(),
        any::<u64>(),
        any::<u32>(),
        policy(),
        sampling(),
        any::<Option<u32>>(),
    )
        .prop_map(
            |(request_id, session_id, layer, policy, sampling, deadline_ms)| {
                Message::Open(Open {
                    request_id,
                    session_id,
                    layer,
                    policy,
                    sampling,
                    deadline_ms,
                })
            },
        );
    let cont = (states(), prop::option::of(states()), any::<Option<u32>>()).prop_map(
        |((start, hidden), backfill, deadline_ms)| {
            // A backfill ends where the step starts: shift the step past it.
            let (start, backfill) = match backfill {
                Some((_, b)) => {
                    let at = start.min(u32::MAX - 12);
                    let bf = Backfill {
                        start: at,
                        hidden: b,
                    };
                    (at + rows(&bf.hidden), Some(bf))
                }
                None => (start, None),
            };
            Message::Continue(Continue {
                start,
                hidden,
                backfill,
                deadline_ms,
            })
        },
    );
    let draft = (
        states().prop_filter("a draft needs two rows", |(_, t)| rows(t) >= 2),
        any::<Option<u32>>(),
    )
        .prop_map(|((start, hidden), deadline_ms)| {
            let tokens = (1..rows(&hidden)).map(|i| i.wrapping_mul(31)).collect();
            Message::Draft(Draft {
                start,
                tokens,
                hidden,
                deadline_ms,
            })
        });
    let verdict = (
        any::<u64>(),
        any::<u64>(),
        any::<u32>(),
        any::<u32>(),
        role(),
        any::<u32>(),
    )
        .prop_map(
            |(request_id, session_id, accepted, next_token, tier, exit)| {
                Message::Verdict(Verdict {
                    request_id,
                    session_id,
                    accepted,
                    next_token,
                    tier,
                    exit,
                })
            },
        );
    let tokens = (
        any::<u64>(),
        any::<u64>(),
        prop::collection::vec(
            (
                any::<u32>(),
                any::<u32>(),
                role(),
                any::<u32>(),
                any::<f32>(),
            ),
            0..6,
        ),
        any::<bool>(),
    )
        .prop_map(|(request_id, session_id, toks, degraded)| {
            Message::Tokens(Tokens {
                request_id,
                session_id,
                tokens: toks
                    .into_iter()
                    .map(|(id, position, tier, exit, confidence)| TokenOut {
                        id,
                        position,
                        tier,
                        exit,
                        confidence,
                        logprob: -confidence,
                        top_logprobs: vec![flow_protocol::TopLogprob {
                            id,
                            logprob: -confidence,
                        }],
                    })
                    .collect(),
                degraded,
            })
        });
    let cancel =
        (any::<u64>(), any::<u64>(), ".{0,20}").prop_map(|(request_id, session_id, reason)| {
            Message::Cancel(Cancel {
                request_id,
                session_id,
                reason,
            })
        });
    let error =
        (code(), ".{0,20}", any::<Option<u64>>()).prop_map(|(code, message, request_id)| {
            Message::Error(ErrorMsg {
                code,
                message,
                request_id,
            })
        });
    let done = (
        any::<u64>(),
        any::<u64>(),
        any::<(u32, u64, u64, u32, u32)>(),
    )
        .prop_map(|(request_id, session_id, s)| {
            Message::Done(Done {
                request_id,
                session_id,
                stats: DoneStats {
                    tokens: s.0,
                    compute_us: s.1,
                    wait_us: s.2,
                    drafts_accepted: s.3,
                    drafts_rejected: s.4,
                },
            })
        });
    let probe = (any::<u64>(), 0u32..2000, any::<u32>())
        .prop_map(|(seq, n, r)| Message::Probe(Probe::new(seq, n, r)));
    let reply = (any::<u64>(), tensor())
        .prop_map(|(seq, payload)| Message::ProbeReply(ProbeReply { seq, payload }));
    let offer = (
        any::<u64>(),
        any::<[u8; 32]>(),
        1u64..u64::MAX,
        1u64..(1 << 22),
        ".{0,20}",
    )
        .prop_map(|(update_id, base_digest, version, total_bytes, scheme)| {
            Message::DeltaOffer(DeltaOffer {
                update_id,
                base_digest,
                version,
                total_bytes,
                chunks: DeltaOffer::chunks_for(total_bytes),
                sha256: [7; 32],
                scheme,
            })
        });
    let chunk = (
        any::<u64>(),
        any::<u32>(),
        prop::collection::vec(any::<u8>(), 1..300),
    )
        .prop_map(|(update_id, index, data)| {
            Message::DeltaChunk(DeltaChunk {
                update_id,
                index,
                data,
            })
        });
    let ack = (any::<u64>(), 0u8..3, any::<u64>(), ".{0,20}").prop_map(
        |(update_id, s, version, message)| {
            let status = [
                DeltaStatus::Applied,
                DeltaStatus::Refused,
                DeltaStatus::RolledBack,
            ][s as usize];
            Message::DeltaAck(DeltaAck {
                update_id,
                status,
                version,
                message,
            })
        },
    );
    let rollback = any::<(u64, u64)>().prop_map(|(update_id, from_version)| {
        Message::DeltaRollback(DeltaRollback {
            update_id,
            from_version,
        })
    });
    let round =
        (1u64..u64::MAX, any::<u64>(), any::<u64>()).prop_map(|(round, samples, deadline_ms)| {
            Message::RoundUpdate(RoundUpdate {
                round,
                samples,
                deadline_ms,
            })
        });
    let classification = (
        any::<(u64, u64)>(),
        role(),
        any::<u32>(),
        0.0f32..=1.0,
        0.0f32..=1.0,
    )
        .prop_map(
            |((request_id, session_id), tier, exit, p_emergency, congestion)| {
                Message::Classification(Classification {
                    request_id,
                    session_id,
                    tier,
                    exit,
                    p_emergency,
                    congestion,
                })
            },
        );
    prop_oneof![
        hello,
        heartbeat,
        open,
        cont,
        draft,
        verdict,
        tokens,
        cancel,
        error,
        done,
        probe,
        reply,
        offer,
        chunk,
        ack,
        rollback,
        round,
        classification
    ]
}

/// Equality that treats NaN payloads bitwise (f32 fields in headers may be NaN).
fn same(a: &Message, b: &Message) -> bool {
    format!("{a:?}") == format!("{b:?}")
}

fn small_limits() -> Limits {
    Limits {
        max_frame_bytes: 1 << 16,
        max_header_bytes: 1 << 12,
        max_elements: 1 << 14,
        ..Limits::default()
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn every_message_round_trips(msg in message(), zstd in any::<bool>()) {
        let compression = if zstd { Compression::Zstd { level: 1 } } else { Compression::None };
        let codec = Codec::new(Limits::default()).with_compression(compression);
        let bytes = codec.encode(&msg).unwrap();
        let back = codec.decode(&bytes).unwrap();
        prop_assert!(same(&msg, &back), "{msg:?} != {back:?}");
    }

    #[test]
    fn truncated_input_needs_more_bytes_until_complete(msg in message(), cut in any::<prop::sample::Index>()) {
        let codec = Codec::default();
        let bytes = codec.encode(&msg).unwrap();
        let cut = cut.index(bytes.len());
        let mut dec = codec.decoder();
        dec.push(&bytes[..cut]);
        prop_assert!(dec.next_message().unwrap().is_none());
        prop_assert!(dec.needed() > 0);
        dec.push(&bytes[cut..]);
        let back = dec.next_message().unwrap().unwrap();
        prop_assert!(same(&msg, &back));
        prop_assert_eq!(dec.buffered(), 0);
    }

    #[test]
    fn byte_by_byte_stream_of_frames(msgs in prop::collection::vec(message(), 1..4)) {
        let codec = Codec::default();
        let mut wire = Vec::new();
        for m in &msgs {
            wire.extend(codec.encode(m).unwrap());
        }
        let mut dec = codec.decoder();
        let mut out = Vec::new();
        for chunk in wire.chunks(7) {
            dec.push(chunk);
            while let Some(m) = dec.next_message().unwrap() {
                out.push(m);
            }
        }
        prop_assert_eq!(out.len(), msgs.len());
        for (a, b) in msgs.iter().zip(&out) {
            prop_assert!(same(a, b));
        }
    }

    #[test]
    fn f32_is_bit_exact(rows in 0usize..5, cols in 0usize..50, seed in any::<u64>()) {
        let v: Vec<f32> = (0..rows * cols).map(|i| f32::from_bits((seed as u32).wrapping_mul(2654435761).wrapping_add(i as u32 * 7919)) ).map(|x| if x.is_finite() { x } else { 1.5 }).collect();
        let t = WireTensor::encode(&v, &[rows, cols], Encoding::F32).unwrap();
        let back = t.decode().unwrap();
        prop_assert_eq!(v.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), back.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
    }

    #[test]
    fn f16_error_bound(v in values(64)) {
        let t = WireTensor::encode(&v, &[4, 16], Encoding::F16).unwrap();
        for (x, y) in v.iter().zip(t.decode().unwrap()) {
            // f16: 11-bit significand → relative error ≤ 2^-11 in the normal range,
            // absolute ≤ 2^-25 in the subnormal range.
            prop_assert!((x - y).abs() <= x.abs() * 4.9e-4 + 6.0e-8, "{x} vs {y}");
        }
    }

    #[test]
    fn bf16_error_bound(v in values(64)) {
        let t = WireTensor::encode(&v, &[4, 16], Encoding::Bf16).unwrap();
        for (x, y) in v.iter().zip(t.decode().unwrap()) {
            // bf16: 8-bit significand → relative error ≤ 2^-8.
            prop_assert!((x - y).abs() <= x.abs() * 3.91e-3 + 1e-38, "{x} vs {y}");
        }
    }

    #[test]
    fn int8_error_bound(rows in 1usize..6, cols in 1usize..64, seed in any::<u64>()) {
        let mut s = seed | 1;
        let v: Vec<f32> = (0..rows * cols).map(|_| { s ^= s << 13; s ^= s >> 7; s ^= s << 17; ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 200.0 }).collect();
        let t = WireTensor::encode(&v, &[rows, cols], Encoding::Int8).unwrap();
        let back = t.decode().unwrap();
        for r in 0..rows {
            let row = &v[r * cols..(r + 1) * cols];
            let scale = row.iter().fold(0f32, |m, x| m.max(x.abs())) / 127.0;
            for c in 0..cols {
                let (x, y) = (row[c], back[r * cols + c]);
                prop_assert!((x - y).abs() <= scale * 0.5 * (1.0 + 1e-5) + x.abs() * 1e-6, "row {r}: {x} vs {y}, scale {scale}");
            }
        }
    }

    #[test]
    fn decode_into_matches_decode(t in tensor()) {
        let mut buf = vec![0f32; t.elements()];
        t.decode_into(&mut buf).unwrap();
        prop_assert_eq!(buf, t.decode().unwrap());
    }

    /// Garbage never panics; whatever happens, the decoder never reserves beyond the limit.
    #[test]
    fn garbage_never_panics(data in prop::collection::vec(any::<u8>(), 0..512), magic in any::<bool>()) {
        let mut data = data;
        if magic && data.len() >= 6 {
            data[..4].copy_from_slice(b"AIFL");
            data[4] = 1;
            data[5] = 0;
        }
        let limits = small_limits();
        let mut dec = FrameDecoder::new(limits);
        dec.push(&data);
        for _ in 0..4 {
            match dec.next_message() {
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
        prop_assert!(dec.needed() as u64 <= limits.max_frame_bytes);
    }

    /// Mutating any byte of a valid frame yields a message or a typed error, never a panic.
    #[test]
    fn mutated_frames_never_panic(msg in message(), pos in any::<prop::sample::Index>(), byte in any::<u8>(), zstd in any::<bool>()) {
        let compression = if zstd { Compression::Zstd { level: 1 } } else { Compression::None };
        let codec = Codec::new(Limits::default()).with_compression(compression);
        let mut bytes = codec.encode(&msg).unwrap();
        let i = pos.index(bytes.len());
        bytes[i] = byte;
        let limits = small_limits();
        let mut dec = FrameDecoder::new(limits);
        dec.push(&bytes);
        let _ = dec.next_message();
        prop_assert!(dec.needed() as u64 <= limits.max_frame_bytes);
    }
}

#[test]
fn lying_header_len_is_refused_before_allocating() {
    let mut frame = Vec::from(*b"AIFL");
    frame.extend_from_slice(&flow_protocol::PROTOCOL_VERSION.to_le_bytes());
    frame.push(3);
    frame.extend_from_slice(&u32::MAX.to_le_bytes());
    frame.extend_from_slice(&0u32.to_le_bytes());
    let mut dec = FrameDecoder::new(Limits::default());
    dec.push(&frame);
    match dec.next_message() {
        Err(Error::FrameTooLarge {
            field: "header_len",
            got,
            ..
        }) => assert_eq!(got, u64::from(u32::MAX)),
        other => panic!("expected FrameTooLarge(header_len), got {other:?}"),
    }
    // The stream is unaligned now; the decoder stays stopped.
    assert!(dec.is_failed());
    assert!(matches!(dec.next_message(), Err(Error::Closed(_))));
}

#[test]
fn lying_payload_len_is_refused() {
    let mut frame = Vec::from(*b"AIFL");
    frame.extend_from_slice(&flow_protocol::PROTOCOL_VERSION.to_le_bytes());
    frame.push(3);
    frame.extend_from_slice(&10u32.to_le_bytes());
    frame.extend_from_slice(&(200u32 << 20).to_le_bytes());
    let mut dec = FrameDecoder::new(Limits::default());
    dec.push(&frame);
    assert!(matches!(
        dec.next_message(),
        Err(Error::FrameTooLarge {
            field: "payload_len",
            ..
        })
    ));
}

#[test]
fn tensor_shape_over_limits_is_a_typed_error_and_stream_continues() {
    let limits = Limits {
        max_rank: 2,
        max_dim: 100,
        ..Limits::default()
    };
    let big = WireTensor::encode(&vec![0.0; 200], &[1, 200], Encoding::F32).unwrap();
    let msg = Message::Probe(Probe {
        seq: 1,
        reply_bytes: 0,
        payload: big,
    });
    let ok = Message::Probe(Probe::new(2, 10, 10));
    let sender = Codec::default();
    let mut wire = sender.encode(&msg).unwrap();
    wire.extend(sender.encode(&ok).unwrap());
    let mut dec = FrameDecoder::new(limits);
    dec.push(&wire);
    match dec.next_message() {
        Err(Error::LimitExceeded {
            field: "dim",
            got: 200,
            limit: 100,
        }) => {}
        other => panic!("expected LimitExceeded(dim), got {other:?}"),
    }
    assert_eq!(dec.next_message().unwrap(), Some(ok));
}

#[test]
fn inconsistent_messages_are_refused() {
    let hidden = WireTensor::encode(&[0.0; 6], &[2, 3], Encoding::F32).unwrap();
    let msg = Message::Continue(Continue {
        start: 7,
        hidden: hidden.clone(),
        backfill: Some(Backfill { start: 0, hidden }),
        deadline_ms: None,
    });
    assert!(matches!(
        Codec::default().encode(&msg),
        Err(Error::Step(StepError::BackfillGap {
            start: 0,
            end: 2,
            step_start: 7
        }))
    ));
}

#[test]
fn probe_reply_size_is_capped_by_limits() {
    let limits = Limits {
        max_frame_bytes: 1 << 16,
        ..Limits::default()
    };
    let probe = Probe::new(3, 100, u32::MAX);
    let reply = probe.reply(&limits);
    assert_eq!(reply.seq, 3);
    let frame = Codec::new(limits)
        .encode(&Message::ProbeReply(reply))
        .unwrap();
    assert!(frame.len() as u64 <= limits.max_frame_bytes);
    let small = Probe::new(4, 100, 5000).reply(&limits);
    assert_eq!(small.payload.bytes().len(), 5000);
}

#[test]
fn require_finite_rejects_nan() {
    let t = WireTensor::encode(&[1.0, f32::NAN, 2.0], &[1, 3], Encoding::F16).unwrap();
    let msg = Message::ProbeReply(ProbeReply { seq: 0, payload: t });
    let bytes = Codec::default().encode(&msg).unwrap();
    let strict = Codec::new(Limits {
        require_finite: true,
        ..Limits::default()
    });
    assert!(matches!(
        strict.decode(&bytes),
        Err(Error::NonFinite { index: 1, .. })
    ));
    assert!(Codec::default().decode(&bytes).is_ok());
}

#[test]
fn encoder_refuses_frames_over_its_own_limit() {
    let limits = Limits {
        max_frame_bytes: 1000,
        ..Limits::default()
    };
    let t = WireTensor::encode(&[0.0; 400], &[1, 400], Encoding::F32).unwrap();
    let msg = Message::ProbeReply(ProbeReply { seq: 0, payload: t });
    assert!(matches!(
        Codec::new(limits).encode(&msg),
        Err(Error::FrameTooLarge {
            field: "frame_len",
            ..
        })
    ));
}

#[test]
fn zstd_shrinks_compressible_tensors() {
    let t = WireTensor::encode(&[0.25; 4096], &[1, 4096], Encoding::F32).unwrap();
    let msg = Message::ProbeReply(ProbeReply { seq: 0, payload: t });
    let raw = Codec::default().encode(&msg).unwrap();
    let z = Codec::default()
        .with_compression(Compression::Zstd { level: 1 })
        .encode(&msg)
        .unwrap();
    assert!(z.len() * 10 < raw.len(), "{} vs {}", z.len(), raw.len());
    assert_eq!(Codec::default().decode(&z).unwrap(), msg);
}

#[test]
fn delta_messages_are_validated() {
    let codec = Codec::default();
    let offer = |total_bytes: u64, chunks: u32, version: u64| {
        Message::DeltaOffer(DeltaOffer {
            update_id: 1,
            base_digest: [0; 32],
            version,
            total_bytes,
            chunks,
            sha256: [0; 32],
            scheme: "full".into(),
        })
    };
    assert!(codec.encode(&offer(1000, 1, 1)).is_ok());
    assert!(
        codec.encode(&offer(1000, 2, 1)).is_err(),
        "wrong chunk count"
    );
    assert!(codec.encode(&offer(0, 0, 1)).is_err(), "empty");
    assert!(codec.encode(&offer(1000, 1, 0)).is_err(), "version 0");
    let huge = flow_protocol::delta::MAX_DELTA_BYTES + 1;
    assert!(codec
        .encode(&offer(huge, DeltaOffer::chunks_for(huge), 1))
        .is_err());
    let chunk = |n: usize| {
        Message::DeltaChunk(DeltaChunk {
            update_id: 1,
            index: 0,
            data: vec![1; n],
        })
    };
    assert!(codec.encode(&chunk(10)).is_ok());
    assert!(codec.encode(&chunk(0)).is_err());
    assert!(codec
        .encode(&chunk(flow_protocol::delta::DELTA_CHUNK_BYTES + 1))
        .is_err());
    // The decoder checks too: a frame with a valid header for a wrong count is refused.
    let good = codec.encode(&offer(1000, 1, 1)).unwrap();
    assert!(codec.decode(&good).is_ok());
}
