//! `flow-node fleet ...`: push fine-tuned deltas into a running cluster, roll them back,
//! and run federated rounds, talking to a running edge or cloud over QUIC.
//!
//! The command connects to the node at `--to` the way a child does (same mTLS, same model
//! check) and opens one fleet session per operation. The node applies a push or rollback
//! itself and passes it on to every child, recursively; a round request makes it run the
//! round over its children (each edge over its devices) and answer with the
//! sample-weighted average, which this command pushes back as the next version.
//!
//! Nodes take fleet requests only from peers on their own host (loopback): the certificate
//! a fleet command presents is a child's, which cannot tell an operator from a device.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use candle_core::Tensor;
use clap::{Args, Subcommand};
use flow_familial::weights::Checkpoint;
use flow_familial::{FamilialModel, Part};
use flow_finetune::Delta;
use flow_node::delta::{push_delta, push_rollback};
use flow_node::fleet::{ask_for_delta, largest_change};
use flow_protocol::transport::{Endpoint, EndpointConfig, PeerConnection};
use flow_protocol::{
    Capacity, DeltaAck, DeltaStatus, Hello, ModelFingerprint, Role, MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
};

/// `flow-node fleet ...`
#[derive(Subcommand, Debug)]
pub enum FleetCmd {
    /// Push a delta checkpoint (from `flow-node finetune`) to a running edge or cloud; it
    /// applies it (new requests use it, running ones finish on the old weights) and pushes
    /// it on to its devices. Example:
    /// `flow-node fleet push --to 127.0.0.1:7000 --model models/small --delta ft.delta --ca ca.pem --cert op.pem --key op.key`
    Push(PushArgs),
    /// Undo a version on a running edge or cloud and everything below it. Example:
    /// `flow-node fleet rollback --to 127.0.0.1:7000 --model models/small --from-version 3 --insecure-loopback`
    Rollback(RollbackArgs),
    /// Federated rounds: the node at --to (the cloud, or an edge) collects its children's
    /// updates (devices post theirs after local training), averages them by samples,
    /// drops whoever misses the deadline; the average is pushed back as the next version.
    /// Stops after --rounds or when the average moves less than --min-change. Example:
    /// `flow-node fleet round --to 127.0.0.1:7000 --model models/small --rounds 5 --deadline-ms 30000 --insecure-loopback`
    Round(RoundArgs),
}

/// How to reach the node.
#[derive(Args, Debug)]
pub struct Target {
    /// Address of the running edge or cloud (its --listen address). Nodes accept fleet
    /// requests only over loopback (a child certificate cannot tell an operator from a
    /// device), so run this on the node's host (e.g. `docker exec`) against 127.0.0.1.
    #[arg(long)]
    pub to: SocketAddr,
    /// Name in that node's certificate (default: edge).
    #[arg(long, default_value = "edge")]
    pub name: String,
    /// The family checkpoint the cluster runs (the connection is refused for another).
    #[arg(long)]
    pub model: PathBuf,
    /// Cluster CA certificate.
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// A certificate and key the node accepts as a child (issued with `flow-node certs
    /// issue` for the child role of that node: device for an edge, edge for a cloud).
    #[arg(long)]
    pub cert: Option<PathBuf>,
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// No certificates; loopback only. For local experiments.
    #[arg(long)]
    pub insecure_loopback: bool,
    /// Role to present (the child role of the node at --to): device or edge.
    #[arg(long, default_value = "device")]
    pub role: String,
}

#[derive(Args, Debug)]
pub struct PushArgs {
    #[command(flatten)]
    pub target: Target,
    /// The delta checkpoint (only changed tensors, with the base fingerprint and version).
    #[arg(long)]
    pub delta: PathBuf,
}

#[derive(Args, Debug)]
pub struct RollbackArgs {
    #[command(flatten)]
    pub target: Target,
    /// The version to undo (must be live on the node).
    #[arg(long)]
    pub from_version: u64,
}

#[derive(Args, Debug)]
pub struct RoundArgs {
    #[command(flatten)]
    pub target: Target,
    /// Most rounds.
    #[arg(long, default_value_t = 1)]
    pub rounds: u64,
    /// How long the node waits for its children's updates per round (edges below it get
    /// three quarters of it for their devices).
    #[arg(long, default_value_t = 30_000)]
    pub deadline_ms: u64,
    /// Stop when no averaged value moved by more than this since the previous round.
    #[arg(long, default_value_t = 0.0)]
    pub min_change: f64,
    /// Write each round's average here as a delta file (overwritten every round).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Only collect and write the average; do not push it back.
    #[arg(long)]
    pub no_push: bool,
}

pub fn run(cmd: FleetCmd) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        match cmd {
            FleetCmd::Push(a) => {
                let delta = Delta::load(&a.delta)
                    .with_context(|| format!("reading the delta {}", a.delta.display()))?;
                let conn = connect(&a.target).await?;
                let ack = push_delta(&conn, 1, &delta).await?;
                report(&ack)
            }
            FleetCmd::Rollback(a) => {
                let conn = connect(&a.target).await?;
                let ack = push_rollback(&conn, 1, a.from_version).await?;
                report(&ack)
            }
            FleetCmd::Round(a) => round(a).await,
        }
    })
}

fn report(ack: &DeltaAck) -> anyhow::Result<()> {
    println!(
        "{:?}: version {} live; {}",
        ack.status, ack.version, ack.message
    );
    if ack.status == DeltaStatus::Refused {
        bail!("refused: {}", ack.message);
    }
    Ok(())
}

async fn round(a: RoundArgs) -> anyhow::Result<()> {
    if a.rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    let conn = connect(&a.target).await?;
    let deadline = Duration::from_millis(a.deadline_ms.max(1));
    let mut prev = None;
    for r in 1..=a.rounds {
        let name = conn.peer_hello().node_id.clone();
        // The node answers within the deadline; allow the transfer on top.
        let (samples, delta) = match tokio::time::timeout(
            deadline * 2,
            ask_for_delta(&conn, &name, r, deadline, None),
        )
        .await
        {
            Ok(Ok(u)) => u,
            Ok(Err(e)) => {
                println!("round {r}: no average ({e})");
                continue;
            }
            Err(_) => {
                println!("round {r}: {name} did not answer in time");
                continue;
            }
        };
        println!(
            "round {r}: average of {samples} samples over {} tensor(s), as version {}",
            delta.tensors.len(),
            delta.version
        );
        let tensors: HashMap<String, Tensor> = delta
            .tensors
            .iter()
            .map(|(n, t)| (n.clone(), t.clone()))
            .collect();
        let change = match &prev {
            Some(p) => Some(largest_change(p, &tensors)?),
            None => None,
        };
        if let Some(out) = &a.out {
            delta.save(out)?;
            println!("  written to {}", out.display());
        }
        if !a.no_push {
            let ack = push_delta(&conn, r, &delta).await?;
            report(&ack)?;
        }
        if let Some(ch) = change {
            println!("  largest change since the previous round: {ch:.3e}");
            if ch < a.min_change {
                println!("stopping: below --min-change {}", a.min_change);
                break;
            }
        }
        prev = Some(tensors);
    }
    Ok(())
}

async fn connect(t: &Target) -> anyhow::Result<PeerConnection> {
    let role: Role = t.role.parse().map_err(|e| anyhow::anyhow!("--role: {e}"))?;
    let security = super::node::security(
        t.insecure_loopback,
        t.ca.clone(),
        t.cert.clone(),
        t.key.clone(),
    )?;
    let mc = flow_familial::source::model_config(&t.model)
        .with_context(|| format!("--model {}", t.model.display()))?;
    let ck = Checkpoint::open(&t.model)?;
    let all = FamilialModel::tensor_names(&mc, &Part::full(&mc))?;
    let digest = ck.fingerprint(all.iter().map(String::as_str))?;
    let hello = Hello {
        node_id: "fleet-operator".into(),
        // Hosting no layers marks this peer as an operator, not a child.
        role,
        protocol_version: PROTOCOL_VERSION,
        min_protocol_version: MIN_PROTOCOL_VERSION,
        model: ModelFingerprint {
            family: format!("{}:{}", mc.layout.model_type(), hex::encode(&digest[..8])),
            digest,
        },
        hosted: vec![],
        capacity: Capacity::default(),
    };
    let bind: SocketAddr = if t.to.is_ipv6() {
        "[::]:0".parse()?
    } else if t.to.ip().is_loopback() {
        "127.0.0.1:0".parse()?
    } else {
        "0.0.0.0:0".parse()?
    };
    let ep = Endpoint::client(EndpointConfig::new(bind, security, hello))?;
    let conn = ep
        .connect(t.to, &t.name)
        .await
        .with_context(|| format!("connecting to {}", t.to))?;
    Ok(conn)
}
