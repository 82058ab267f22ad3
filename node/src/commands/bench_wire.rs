//! `flow-node bench wire`: wire encodings, codec time, QUIC round trip and goodput against a
//! raw quinn echo measured in the same run.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use flow_protocol::bytes::Bytes;
use flow_protocol::transport::{quinn, Endpoint, EndpointConfig, Security};
use flow_protocol::{
    Capacity, Codec, Compression, Continue, Encoding, Hello, Limits, Message, ModelFingerprint,
    Role, WireTensor, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
};

/// Benchmark the wire: bytes per encoding (± zstd), encode+decode time, and loopback QUIC
/// round trip and goodput through flow-protocol's transport vs a raw quinn stream echo.
///
/// Hidden states of POSITIONS × HIDDEN f32 values (default 1, 16, 128, 2048 positions ×
/// 896, 2048, 3584 hidden). Goodput = 2 × tensor bytes / round-trip time (a tensor goes
/// out and comes back); the raw quinn echo moves the same byte count on one stream with the
/// same TLS and transport settings, store-and-forward like the real server.
#[derive(clap::Args, Debug)]
pub struct BenchWireArgs {
    /// Short run: fewer iterations and sizes up to 128 positions.
    #[arg(long)]
    pub quick: bool,
    /// Positions to test (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = vec![1usize, 16, 128, 2048])]
    pub positions: Vec<usize>,
    /// Hidden sizes to test (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = vec![896usize, 2048, 3584])]
    pub hidden: Vec<usize>,
    /// Encode/decode iterations per size (median reported).
    #[arg(long, default_value_t = 51)]
    pub iters: usize,
    /// zstd level for the "with zstd" columns.
    #[arg(long, default_value_t = 1)]
    pub zstd_level: i32,
    /// Skip the QUIC part (codec numbers only).
    #[arg(long)]
    pub no_network: bool,
    /// Also write the results as JSON to this file.
    #[arg(long, value_name = "PATH")]
    pub json: Option<PathBuf>,
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Activation-like values: smooth, mixed scales, a few outliers, deterministic.
fn hidden_states(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed | 1;
    (0..n)
        .map(|i| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let noise = ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5;
            let outlier = if i % 997 == 0 { 20.0 } else { 1.0 };
            (noise * 2.0 + ((i % 64) as f32 * 0.1).sin() * 0.5) * outlier
        })
        .collect()
}

/// A step's frame (positions `0..rows`): what a decode or prefill step ships after its
/// stream's `Open`.
fn continue_msg(hidden: WireTensor) -> Message {
    Message::Continue(Continue {
        start: 0,
        hidden,
        backfill: None,
        deadline_ms: Some(1000),
    })
}

struct CodecRow {
    positions: usize,
    hidden: usize,
    encoding: Encoding,
    wire_bytes: usize,
    wire_bytes_zstd: usize,
    enc_dec_us: f64,
    enc_dec_zstd_us: f64,
    max_abs_err: f32,
}

/// Tensor encode + frame encode (chunks, as the transport writes them) + incremental frame
/// decode + tensor decode into a reused buffer.
fn time_pipeline(
    data: &[f32],
    shape: &[usize],
    enc: Encoding,
    codec: &Codec,
    iters: usize,
) -> anyhow::Result<f64> {
    let mut out = vec![0f32; data.len()];
    let mut samples = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t0 = super::OsInstant::now();
        let t = WireTensor::encode(data, shape, enc)?;
        let chunks = codec.encode_chunks(&continue_msg(t))?;
        let mut dec = codec.decoder();
        for c in &chunks {
            dec.push(c);
        }
        if let Some(Message::Continue(c)) = dec.next_message()? {
            c.hidden.decode_into(&mut out)?;
        } else {
            anyhow::bail!("frame did not decode");
        }
        samples.push(t0.elapsed().as_secs_f64() * 1e6);
    }
    Ok(median(samples))
}

fn codec_rows(args: &BenchWireArgs, sizes: &[(usize, usize)]) -> anyhow::Result<Vec<CodecRow>> {
    let plain = Codec::new(Limits::default());
    let zstd = plain.with_compression(Compression::Zstd {
        level: args.zstd_level,
    });
    let mut rows = Vec::new();
    for &(p, h) in sizes {
        let data = hidden_states(p * h, (p * 31 + h) as u64);
        let shape = [p, h];
        let elements = p * h;
        // Fewer iterations for big tensors keeps the run short; the median stays robust.
        let iters = (args.iters * 4096 / elements.max(4096)).clamp(5, args.iters.max(5));
        for enc in Encoding::ALL {
            let t = WireTensor::encode(&data, &shape, enc)?;
            let back = t.decode()?;
            let max_abs_err = data
                .iter()
                .zip(&back)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            let msg = continue_msg(t);
            let wire_bytes = plain.encode(&msg)?.len();
            let wire_bytes_zstd = zstd.encode(&msg)?.len();
            let enc_dec_us = time_pipeline(&data, &shape, enc, &plain, iters)?;
            let enc_dec_zstd_us = time_pipeline(&data, &shape, enc, &zstd, iters.div_ceil(2))?;
            rows.push(CodecRow {
                positions: p,
                hidden: h,
                encoding: enc,
                wire_bytes,
                wire_bytes_zstd,
                enc_dec_us,
                enc_dec_zstd_us,
                max_abs_err,
            });
        }
    }
    Ok(rows)
}

struct NetRow {
    positions: usize,
    hidden: usize,
    encoding: Encoding,
    tensor_bytes: usize,
    iters: usize,
    rtt_us: f64,
    goodput_mbps: f64,
    raw_rtt_us: f64,
    raw_goodput_mbps: f64,
}

fn hello(id: &str, role: Role) -> Hello {
    Hello {
        node_id: id.into(),
        role,
        protocol_version: PROTOCOL_VERSION,
        min_protocol_version: MIN_PROTOCOL_VERSION,
        model: ModelFingerprint {
            family: "bench".into(),
            digest: [0; 32],
        },
        hosted: vec![],
        capacity: Capacity::default(),
    }
}

/// Raw quinn echo server: per message reads an 8-byte length and that many bytes, then
/// writes them back (store-and-forward, like the protocol server).
async fn raw_server(ep: quinn::Endpoint) -> anyhow::Result<()> {
    let conn = ep.accept().await.context("raw accept")?.await?;
    let (mut send, mut recv) = conn.accept_bi().await?;
    loop {
        let mut len = [0u8; 8];
        if recv.read_exact(&mut len).await.is_err() {
            return Ok(());
        }
        let mut left = u64::from_le_bytes(len) as usize;
        let mut chunks = Vec::new();
        while left > 0 {
            let c = recv
                .read_chunk(left, true)
                .await?
                .context("raw stream ended")?;
            left -= c.bytes.len();
            chunks.push(c.bytes);
        }
        send.write_all(&len).await?;
        send.write_all_chunks(&mut chunks).await?;
    }
}

async fn network_rows(sizes: &[(usize, usize)], quick: bool) -> anyhow::Result<Vec<NetRow>> {
    let any: SocketAddr = "127.0.0.1:0".parse()?;
    let mut server_cfg = EndpointConfig::new(
        any,
        Security::InsecureLoopback,
        hello("bench-edge", Role::Edge),
    );
    server_cfg.codec = Codec::new(Limits::default());
    let client_cfg = EndpointConfig::new(
        any,
        Security::InsecureLoopback,
        hello("bench-device", Role::Device),
    );

    // flow-protocol echo server.
    let server = Arc::new(Endpoint::server(server_cfg.clone())?);
    let addr = server.local_addr()?;
    let srv = server.clone();
    tokio::spawn(async move {
        while let Some(Ok(conn)) = srv.accept().await {
            tokio::spawn(async move {
                while let Ok(mut s) = conn.accept_session().await {
                    tokio::spawn(async move {
                        while let Ok(Some(m)) = s.recv().await {
                            if s.send(&m).await.is_err() {
                                break;
                            }
                        }
                    });
                }
            });
        }
    });
    let client = Endpoint::client(client_cfg.clone())?;
    let conn = client.connect(addr, "localhost").await?;
    let mut session = conn.open_session().await?;

    // Raw quinn echo with the same TLS and transport settings.
    let raw_ep = quinn::Endpoint::server(server_cfg.quinn_server_config()?, any)?;
    let raw_addr = raw_ep.local_addr()?;
    tokio::spawn(async move {
        if let Err(e) = raw_server(raw_ep).await {
            eprintln!("raw quinn server: {e:#}");
        }
    });
    let mut raw_client = quinn::Endpoint::client(any)?;
    raw_client.set_default_client_config(client_cfg.quinn_client_config()?);
    let raw_conn = raw_client.connect(raw_addr, "localhost")?.await?;
    let (mut raw_send, mut raw_recv) = raw_conn.open_bi().await?;

    let mut rows = Vec::new();
    for &(p, h) in sizes {
        let data = hidden_states(p * h, 7);
        for enc in [Encoding::F32, Encoding::Int8] {
            let t = WireTensor::encode(&data, &[p, h], enc)?;
            let tensor_bytes = t.bytes().len();
            let msg = continue_msg(t);
            let budget: usize = if quick { 64 << 20 } else { 512 << 20 };
            let iters = (budget / tensor_bytes.max(1)).clamp(5, if quick { 50 } else { 200 });
            let payload = Bytes::from(vec![0xA5u8; tensor_bytes]);
            let (mut ours, mut raw) = (Vec::new(), Vec::new());
            // Warm-up (congestion window, buffers), then alternate ours/raw so load on a
            // shared machine affects both alike.
            for i in 0..iters + 2 {
                let t0 = tokio::time::Instant::now();
                session.send(&msg).await?;
                let back = session.recv().await?.context("echo ended")?;
                let dt = t0.elapsed();
                anyhow::ensure!(
                    matches!(back, Message::Continue(_)),
                    "unexpected echo {}",
                    back.name()
                );

                let t1 = tokio::time::Instant::now();
                raw_send
                    .write_all(&(tensor_bytes as u64).to_le_bytes())
                    .await?;
                raw_send.write_chunk(payload.clone()).await?;
                let mut len = [0u8; 8];
                raw_recv.read_exact(&mut len).await?;
                let mut left = u64::from_le_bytes(len) as usize;
                while left > 0 {
                    let c = raw_recv
                        .read_chunk(left, true)
                        .await?
                        .context("raw echo ended")?;
                    left -= c.bytes.len();
                }
                let dr = t1.elapsed();
                if i >= 2 {
                    ours.push(dt.as_secs_f64() * 1e6);
                    raw.push(dr.as_secs_f64() * 1e6);
                }
            }
            let rtt_us = median(ours);
            let raw_rtt_us = median(raw);
            let goodput = |rtt: f64| 2.0 * tensor_bytes as f64 / rtt; // bytes/µs = MB/s
            rows.push(NetRow {
                positions: p,
                hidden: h,
                encoding: enc,
                tensor_bytes,
                iters,
                rtt_us,
                goodput_mbps: goodput(rtt_us),
                raw_rtt_us,
                raw_goodput_mbps: goodput(raw_rtt_us),
            });
        }
    }
    let stats = conn.stats();
    println!(
        "\nconnection stats: rtt {:?}, cwnd {} B, sent {} B, received {} B, lost {} packets",
        stats.rtt, stats.cwnd, stats.bytes_sent, stats.bytes_received, stats.lost_packets
    );
    conn.close("bench done");
    raw_conn.close(0u32.into(), b"bench done");
    Ok(rows)
}

/// Run `flow-node bench wire`.
pub fn run(args: BenchWireArgs) -> anyhow::Result<()> {
    let mut positions = args.positions.clone();
    if args.quick {
        positions.retain(|&p| p <= 128);
    }
    let sizes: Vec<(usize, usize)> = positions
        .iter()
        .flat_map(|&p| args.hidden.iter().map(move |&h| (p, h)))
        .collect();
    let args = BenchWireArgs {
        iters: if args.quick {
            args.iters.min(11)
        } else {
            args.iters
        },
        ..args
    };

    println!(
        "# flow-node bench wire{}",
        if args.quick { " (quick)" } else { "" }
    );
    println!("\n## Encodings (Continue frame; enc+dec = tensor encode + frame encode + frame decode + tensor decode, median)\n");
    println!("| positions | hidden | encoding | wire bytes | vs f32 | wire bytes zstd | enc+dec µs | enc+dec µs (zstd) | max abs err |");
    println!("|---:|---:|---|---:|---:|---:|---:|---:|---:|");
    let codec = codec_rows(&args, &sizes)?;
    for r in &codec {
        let f32_bytes = codec
            .iter()
            .find(|x| {
                x.positions == r.positions && x.hidden == r.hidden && x.encoding == Encoding::F32
            })
            .map_or(r.wire_bytes, |x| x.wire_bytes);
        println!(
            "| {} | {} | {} | {} | {:.2}× | {} | {:.1} | {:.1} | {:.2e} |",
            r.positions,
            r.hidden,
            r.encoding,
            r.wire_bytes,
            f32_bytes as f64 / r.wire_bytes as f64,
            r.wire_bytes_zstd,
            r.enc_dec_us,
            r.enc_dec_zstd_us,
            r.max_abs_err
        );
    }

    let net = if args.no_network {
        Vec::new()
    } else {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let net = rt.block_on(network_rows(&sizes, args.quick))?;
        println!("\n## Loopback QUIC echo (flow-protocol session vs raw quinn stream, same run, medians)\n");
        println!("| positions | hidden | encoding | tensor bytes | iters | RTT µs | goodput MB/s | raw RTT µs | raw goodput MB/s | goodput / raw |");
        println!("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|");
        for r in &net {
            println!(
                "| {} | {} | {} | {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.2} |",
                r.positions,
                r.hidden,
                r.encoding,
                r.tensor_bytes,
                r.iters,
                r.rtt_us,
                r.goodput_mbps,
                r.raw_rtt_us,
                r.raw_goodput_mbps,
                r.goodput_mbps / r.raw_goodput_mbps
            );
        }
        rt.shutdown_timeout(Duration::from_secs(1));
        net
    };

    if let Some(path) = &args.json {
        let json = serde_json::json!({
            "quick": args.quick,
            "codec": codec.iter().map(|r| serde_json::json!({
                "positions": r.positions, "hidden": r.hidden, "encoding": r.encoding.name(),
                "wire_bytes": r.wire_bytes, "wire_bytes_zstd": r.wire_bytes_zstd,
                "enc_dec_us": r.enc_dec_us, "enc_dec_zstd_us": r.enc_dec_zstd_us,
                "max_abs_err": r.max_abs_err,
            })).collect::<Vec<_>>(),
            "network": net.iter().map(|r| serde_json::json!({
                "positions": r.positions, "hidden": r.hidden, "encoding": r.encoding.name(),
                "tensor_bytes": r.tensor_bytes, "iters": r.iters,
                "rtt_us": r.rtt_us, "goodput_mb_s": r.goodput_mbps,
                "raw_rtt_us": r.raw_rtt_us, "raw_goodput_mb_s": r.raw_goodput_mbps,
                "goodput_ratio": r.goodput_mbps / r.raw_goodput_mbps,
            })).collect::<Vec<_>>(),
        });
        std::fs::write(path, serde_json::to_string_pretty(&json)?)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("\nwrote {}", path.display());
    }
    Ok(())
}
