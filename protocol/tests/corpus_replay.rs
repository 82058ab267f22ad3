//! Replays every file under `tests/corpus/` (also the seed corpus of the `frame_decoder`
//! fuzz target) through the decoder, whole and in small pieces, with default and tight
//! limits. Files must never panic; files named `valid-*` must decode.
//!
//! Regenerate the seeds with `cargo test -p flow-protocol --test corpus_replay -- --ignored`.

use std::path::PathBuf;

use flow_protocol::{
    Backfill, Classification, Codec, Compression, Continue, Encoding, ErrorCode, FrameDecoder,
    Heartbeat, Hello, Limits, Message, ModelFingerprint, Open, Probe, Role, Sampling, TokenOut,
    Tokens, WireTensor,
};
use flow_protocol::{DeltaAck, DeltaChunk, DeltaOffer, DeltaRollback, DeltaStatus, RoundUpdate};
use flow_protocol::{HostedLayers, LinkState, Upstream, UpstreamLink, UpstreamPeer, UpstreamQuic};

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("corpus")
}

fn drain(dec: &mut FrameDecoder) -> usize {
    let mut n = 0;
    while let Ok(Some(_)) = dec.next_message() {
        n += 1;
    }
    n
}

#[test]
fn replay_corpus() {
    let mut files: Vec<_> = std::fs::read_dir(corpus_dir())
        .expect("tests/corpus exists")
        .flatten()
        .collect();
    files.sort_by_key(|e| e.file_name());
    assert!(files.len() >= 5, "seed corpus missing");
    let tight = Limits {
        max_frame_bytes: 4096,
        max_header_bytes: 512,
        max_elements: 512,
        ..Limits::default()
    };
    for entry in files {
        let data = std::fs::read(entry.path()).unwrap();
        let name = entry.file_name().to_string_lossy().into_owned();
        for limits in [Limits::default(), tight] {
            let mut whole = FrameDecoder::new(limits);
            whole.push(&data);
            let n_whole = drain(&mut whole);
            let mut pieces = FrameDecoder::new(limits);
            let mut n_pieces = 0;
            for chunk in data.chunks(3) {
                pieces.push(chunk);
                n_pieces += drain(&mut pieces);
            }
            assert_eq!(n_whole, n_pieces, "{name}: chunking changed the result");
            if name.starts_with("valid-") && limits == Limits::default() {
                assert!(n_whole >= 1, "{name} should decode");
            }
        }
    }
}

/// Offer + one chunk + ack + rollback of a small delta transfer, back to back.
fn delta_transfer(codec: &Codec) -> Vec<u8> {
    let data = b"delta bytes".to_vec();
    let msgs = [
        Message::DeltaOffer(DeltaOffer {
            update_id: 9,
            base_digest: [5; 32],
            version: 2,
            total_bytes: data.len() as u64,
            chunks: 1,
            sha256: [6; 32],
            scheme: "channels:1:0.25".into(),
        }),
        Message::DeltaChunk(DeltaChunk {
            update_id: 9,
            index: 0,
            data,
        }),
        Message::DeltaAck(DeltaAck {
            update_id: 9,
            status: DeltaStatus::Applied,
            version: 2,
            message: "ok".into(),
        }),
        Message::DeltaRollback(DeltaRollback {
            update_id: 10,
            from_version: 2,
        }),
    ];
    msgs.iter().flat_map(|m| codec.encode(m).unwrap()).collect()
}

/// A federated round on one session: the aggregator's request, the participant's sample
/// count, a one-chunk update, the aggregator's ack.
fn fed_round(codec: &Codec) -> Vec<u8> {
    let data = b"update bytes".to_vec();
    let msgs = [
        Message::RoundUpdate(RoundUpdate {
            round: 3,
            samples: 0,
            deadline_ms: 5000,
        }),
        Message::RoundUpdate(RoundUpdate {
            round: 3,
            samples: 640,
            deadline_ms: 5000,
        }),
        Message::DeltaOffer(DeltaOffer {
            update_id: 3,
            base_digest: [5; 32],
            version: 3,
            total_bytes: data.len() as u64,
            chunks: 1,
            sha256: [6; 32],
            scheme: "bias-norm:1".into(),
        }),
        Message::DeltaChunk(DeltaChunk {
            update_id: 3,
            index: 0,
            data,
        }),
        Message::DeltaAck(DeltaAck {
            update_id: 3,
            status: DeltaStatus::Applied,
            version: 0,
            message: "joined round 3".into(),
        }),
    ];
    msgs.iter().flat_map(|m| codec.encode(m).unwrap()).collect()
}

fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let codec = Codec::default();
    let zstd = Codec::default().with_compression(Compression::Zstd { level: 1 });
    let hidden =
        |enc| WireTensor::encode(&[0.5, -1.25, 3.0, 0.0, 7.5, -0.125], &[2, 3], enc).unwrap();
    let hello = Message::Hello(Hello {
        node_id: "edge-1".into(),
        role: Role::Edge,
        protocol_version: 1,
        min_protocol_version: 1,
        model: ModelFingerprint {
            family: "fam".into(),
            digest: [3; 32],
        },
        hosted: vec![],
        capacity: Default::default(),
    });
    let cont = |enc| {
        Message::Continue(Continue {
            start: 4,
            hidden: hidden(enc),
            backfill: Some(Backfill {
                start: 2,
                hidden: hidden(Encoding::F16),
            }),
            deadline_ms: Some(250),
        })
    };
    let open = Message::Open(Open {
        request_id: 1,
        session_id: 2,
        layer: 6,
        policy: Default::default(),
        sampling: Sampling::default(),
        deadline_ms: Some(30_000),
    });
    let tokens = Message::Tokens(Tokens {
        request_id: 1,
        session_id: 2,
        tokens: vec![TokenOut {
            id: 42,
            position: 6,
            tier: Role::Cloud,
            exit: 3,
            confidence: 0.9,
            logprob: -0.1,
            top_logprobs: vec![flow_protocol::TopLogprob {
                id: 42,
                logprob: -0.1,
            }],
        }],
        degraded: false,
    });
    let big = WireTensor::encode(&vec![0.25; 4096], &[4, 1024], Encoding::F32).unwrap();
    let compressible = Message::Probe(Probe {
        seq: 1,
        reply_bytes: 8,
        payload: big,
    });
    let mut two = codec.encode(&hello).unwrap();
    two.extend(
        codec
            .encode(&Message::Heartbeat(Heartbeat::default()))
            .unwrap(),
    );
    let mut lying = codec.encode(&cont(Encoding::F32)).unwrap();
    lying[11..15].copy_from_slice(&u32::MAX.to_le_bytes());
    vec![
        ("valid-hello", codec.encode(&hello).unwrap()),
        ("valid-open", codec.encode(&open).unwrap()),
        (
            "valid-continue-f32",
            codec.encode(&cont(Encoding::F32)).unwrap(),
        ),
        (
            "valid-continue-int8",
            codec.encode(&cont(Encoding::Int8)).unwrap(),
        ),
        (
            "valid-continue-bf16",
            codec.encode(&cont(Encoding::Bf16)).unwrap(),
        ),
        ("valid-tokens", codec.encode(&tokens).unwrap()),
        (
            "valid-error",
            codec
                .encode(&Message::error(ErrorCode::Overloaded, "busy", Some(1)))
                .unwrap(),
        ),
        ("valid-probe-zstd", zstd.encode(&compressible).unwrap()),
        ("valid-two-frames", two),
        ("valid-delta-transfer", delta_transfer(&codec)),
        ("valid-fed-round", fed_round(&codec)),
        (
            "valid-classification",
            codec
                .encode(&Message::Classification(Classification {
                    request_id: 7,
                    session_id: 8,
                    tier: Role::Edge,
                    exit: 4,
                    p_emergency: 0.875,
                    congestion: 0.25,
                }))
                .unwrap(),
        ),
        (
            "valid-upstream",
            codec
                .encode(&Message::Upstream(Upstream {
                    links: vec![
                        UpstreamLink {
                            from: "edge-1".into(),
                            to: Some(UpstreamPeer {
                                node_id: "cloud-a".into(),
                                role: Role::Cloud,
                                hosted: vec![HostedLayers {
                                    start: 20,
                                    end: 30,
                                    digest: [9; 32],
                                }],
                            }),
                            addr: "10.0.0.3:7000".into(),
                            active: true,
                            state: LinkState::Up,
                            rtt_ms: 20.5,
                            goodput_bps: 9.8e6,
                            confidence: 0.75,
                            probes: 12,
                            quic: Some(UpstreamQuic {
                                rtt_ms: 21.0,
                                bytes_sent: 40_960,
                                bytes_received: 81_920,
                                lost_packets: 2,
                            }),
                        },
                        UpstreamLink {
                            from: "edge-1".into(),
                            to: None,
                            addr: "cloud-b.example:7000".into(),
                            active: false,
                            state: LinkState::Idle,
                            rtt_ms: 50.0,
                            goodput_bps: 1e7,
                            confidence: 0.0,
                            probes: 0,
                            quic: None,
                        },
                    ],
                }))
                .unwrap(),
        ),
        ("bad-lying-payload-len", lying),
        (
            "bad-magic",
            b"NOPE\x01\x00\x03\x00\x00\x00\x00\x00\x00\x00\x00".to_vec(),
        ),
    ]
}

#[test]
#[ignore = "writes the seed corpus; run on purpose"]
fn write_seed_corpus() {
    let dir = corpus_dir();
    std::fs::create_dir_all(&dir).unwrap();
    for (name, bytes) in seeds() {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}

#[test]
fn seeds_on_disk_are_current() {
    // The valid seeds must keep decoding to what generated them (catches accidental
    // wire-format changes: bump PROTOCOL_VERSION and regenerate if intended).
    for (name, bytes) in seeds() {
        let on_disk = std::fs::read(corpus_dir().join(name)).unwrap_or_default();
        if name.contains("zstd") {
            // zstd output may change between library versions; compare meaning instead.
            assert_eq!(
                Codec::default().decode(&on_disk).unwrap(),
                Codec::default().decode(&bytes).unwrap()
            );
            continue;
        }
        assert_eq!(
            on_disk, bytes,
            "{name} differs from the generator: wire format changed?"
        );
    }
}
