//! `flow-node demo`: device, edge and cloud on loopback in one process (real QUIC, real
//! mutual TLS with a throwaway CA), a short mixed workload in every mode, and a report.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use flow_familial::init::{init_checkpoint, Preset};
use flow_familial::tokenizer::Tokenizer;
use flow_familial::{Layout, ModelConfig};
use flow_node::cluster::{single_node, ClusterSpec, LocalCluster};
use flow_node::{EngineConfig, GenerateRequest};
use flow_protocol::{InferMode, Policy, Sampling};

/// Run a three-tier cluster on this machine and show what collaborative inference does.
///
/// The family is cut in three: the device hosts the first layers and the shallowest exit,
/// the edge the middle layers and a middle exit, the cloud the rest and the deepest exit.
/// The same prompts are answered in every mode (local, route, escalate, speculate) and
/// compared with a cloud-only (full model) answer.
#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Model directory. Default: the committed trained `small` family (models/small), or a
    /// seeded untrained one if it is absent (with a warning).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Tokens to generate per request.
    #[arg(long, default_value_t = 12)]
    pub max_tokens: usize,
    /// Confidence threshold (max softmax probability) for `escalate`.
    #[arg(long, default_value_t = 0.6)]
    pub threshold: f32,
    /// Wire encoding of hidden states between tiers: f32, f16, bf16 or int8.
    #[arg(long, default_value = "f32")]
    pub encoding: String,
}

const PROMPTS: [&str; 6] = [
    "57+8=",
    "7+5=",
    "305+1196=",
    "k=37,b=05?b=",
    "rev abc=",
    "48+19=",
];

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

pub fn run(a: DemoArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(demo(a))
}

async fn demo(a: DemoArgs) -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let repo_model = PathBuf::from("models/small");
    let dir = match a.model {
        Some(d) => d,
        None if repo_model.join("config.json").exists() => repo_model,
        None => {
            eprintln!(
                "warning: models/small (the trained family) is not here; using a seeded UNTRAINED \
                 family, so answers are gibberish — the mechanics are the same"
            );
            let d = tmp.path().join("small");
            init_checkpoint(Preset::Small, Layout::RuyiQwen2, 1, &d)?;
            d
        }
    };
    let cfg = ModelConfig::from_file(&dir.join("config.json"))
        .with_context(|| format!("reading {}", dir.display()))?;
    let exits = cfg.exit_points();
    let (dev_exit, edge_exit, last) = super::cluster::three_tier_exits(&exits, "the demo")?;
    let encoding = super::node::parse_encoding(&a.encoding)?;
    println!(
        "aiflow demo — family {} ({}), exits {exits:?}",
        dir.display(),
        cfg.layout.model_type()
    );
    println!(
        "device: layers 0..{dev_exit} + exit {dev_exit} | edge: layers {dev_exit}..{edge_exit} + exit {edge_exit} | cloud: layers {edge_exit}..{last} + exit {last}"
    );
    println!(
        "links: QUIC over loopback, mutual TLS (throwaway CA), hidden states in {}\n",
        encoding.name()
    );
    let t0 = Instant::now();
    let cluster = LocalCluster::start(ClusterSpec {
        model_dir: dir.clone(),
        declare_exits: None,
        device_exit: dev_exit,
        edge_exit,
        certs_dir: tmp.path().join("certs"),
        policy: Policy::default(),
        encoding,
        engine: EngineConfig::default(),
    })
    .await?;
    let reference = single_node(
        &dir,
        None,
        None,
        Policy {
            mode: InferMode::Local,
            ..Policy::default()
        },
        EngineConfig::default(),
    )
    .await?;
    println!("cluster up in {:.0} ms\n", t0.elapsed().as_secs_f64() * 1e3);
    let tok = Tokenizer::from_dir(&dir)?;
    let bos = cfg.bos_token_id;
    let modes: Vec<(&str, Policy)> = vec![
        (
            "local (device only)",
            Policy {
                mode: InferMode::Local,
                ..Policy::default()
            },
        ),
        (
            "route → edge exit",
            Policy {
                mode: InferMode::Route,
                answer_exit: Some(edge_exit as u32),
                ..Policy::default()
            },
        ),
        (
            "escalate",
            Policy {
                mode: InferMode::Escalate,
                default_threshold: a.threshold,
                ..Policy::default()
            },
        ),
        (
            "speculate (n=4)",
            Policy {
                mode: InferMode::Speculate,
                draft_len: 4,
                ..Policy::default()
            },
        ),
        (
            "cloud-only (route)",
            Policy {
                mode: InferMode::Route,
                answer_exit: Some(last as u32),
                ..Policy::default()
            },
        ),
    ];
    let mut summary = Vec::new();
    for (name, policy) in &modes {
        println!("── {name}");
        let mut lat = Vec::new();
        let mut tiers = std::collections::BTreeMap::<String, usize>::new();
        let mut bytes = 0u64;
        let edge_up0 = cluster.edge.metrics().bytes_up.get();
        let mut agree = 0usize;
        let mut total = 0usize;
        for p in PROMPTS {
            let mut ids: Vec<u32> = bos.into_iter().collect();
            ids.extend(tok.encode(p)?);
            let req = GenerateRequest {
                prompt: ids.clone(),
                max_new_tokens: a.max_tokens,
                sampling: Sampling::default(),
                policy: Some(policy.clone()),
                stop_tokens: vec![],
            };
            let (want, _) = reference
                .generate_collect(GenerateRequest {
                    policy: None,
                    ..req.clone()
                })
                .await?;
            let (got, stats) = cluster.device.generate_collect(req).await?;
            lat.push(stats.total_ms);
            bytes += stats.bytes_up;
            for (k, v) in &stats.tokens_per_exit {
                *tiers.entry(k.clone()).or_default() += v;
            }
            let gi: Vec<u32> = got.iter().map(|t| t.id).collect();
            let wi: Vec<u32> = want.iter().map(|t| t.id).collect();
            agree += gi.iter().zip(&wi).filter(|(x, y)| x == y).count();
            total += wi.len().max(gi.len());
            println!("  {p:<18} → {:?}", tok.decode(&gi)?);
        }
        let edge_bytes = cluster.edge.metrics().bytes_up.get() - edge_up0;
        let n: usize = tiers.values().sum();
        let share: Vec<String> = tiers
            .iter()
            .map(|(k, v)| format!("{k} {:.0}%", 100.0 * *v as f64 / n.max(1) as f64))
            .collect();
        let (p50, p95) = (pct(&mut lat.clone(), 0.5), pct(&mut lat, 0.95));
        let ag = 100.0 * agree as f64 / total.max(1) as f64;
        println!(
            "  latency p50 {p50:.1} ms p95 {p95:.1} ms | tokens by tier:exit {} | bytes device→edge {bytes}, edge→cloud {edge_bytes} | agreement with cloud-only {ag:.0}%\n",
            share.join(", ")
        );
        summary.push((
            name.to_string(),
            p50,
            p95,
            share.join(", "),
            bytes,
            edge_bytes,
            ag,
        ));
    }
    println!(
        "{:<22} {:>8} {:>8} {:>11} {:>11} {:>8}  tokens by tier:exit",
        "mode", "p50 ms", "p95 ms", "dev→edge B", "edge→cl B", "agree %"
    );
    for (name, p50, p95, share, bytes, eb, ag) in &summary {
        println!("{name:<22} {p50:>8.1} {p95:>8.1} {bytes:>11} {eb:>11} {ag:>8.0}  {share}");
    }
    let m = cluster.device.metrics();
    println!(
        "\ndevice metrics: {} requests, {} escalations, {} degraded tokens; demo took {:.1} s",
        m.requests.get(),
        m.escalations.get(),
        m.degraded.get(),
        t0.elapsed().as_secs_f64()
    );
    cluster.shutdown().await;
    reference.shutdown().await;
    Ok(())
}
