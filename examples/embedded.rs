//! Run an aiflow agent inside an application (a camera or phone app, say) and call it
//! directly — no HTTP, no separate process.
//!
//! ```sh
//! cargo run --release --example embedded                       # whole family on-device
//! cargo run --release --example embedded -- 127.0.0.1:7000     # device part, escalating to an edge
//! ```
//! With a parent address the agent hosts only the first layers and exit 1 and escalates
//! unsure tokens (over QUIC, `--insecure-loopback` style security: loopback only).

use aiflow::node::{Agent, GenerateRequest};
use aiflow::protocol::{InferMode, Policy, Role};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let model = std::env::var("AIFLOW_MODEL").unwrap_or_else(|_| "models/small".into());
    let mut builder = Agent::builder(&model).role(Role::Device).threads(1);
    if let Some(parent) = std::env::args().nth(1) {
        builder = builder.layers(0..1).parent(parent.parse()?, "edge");
    } else {
        builder = builder.policy(Policy {
            mode: InferMode::Local,
            ..Policy::default()
        });
    }
    let agent = builder.start().await?;
    let tok = agent.tokenizer();
    let bos = agent.model_config().bos_token_id;
    for prompt in ["57+8=", "305+1196=", "rev camera="] {
        let mut ids: Vec<u32> = bos.into_iter().collect();
        ids.extend(tok.encode(prompt)?);
        let (tokens, stats) = agent
            .generate_collect(GenerateRequest::greedy(ids.clone(), 8))
            .await?;
        let text = tok.decode(&tokens.iter().map(|t| t.id).collect::<Vec<_>>())?;
        let by: Vec<String> = tokens
            .iter()
            .map(|t| format!("{}:{}", t.tier, t.exit))
            .collect();
        println!(
            "{prompt:<12} → {text:<8} ({} ms; tier:exit per token {})",
            stats.total_ms.round(),
            by.join(" ")
        );
        // Classification: one forward pass, same path.
        let c = agent.classify(ids, None).await?;
        println!(
            "{:<12}   first token {:?} from {}:{} (confidence {:.2})",
            "",
            tok.decode(&[c.id])?,
            c.tier,
            c.exit,
            c.confidence
        );
    }
    agent.shutdown().await;
    Ok(())
}
