//! `flow-node certs init|issue`: the cluster CA and node certificates for mutual TLS.

use std::path::PathBuf;

use anyhow::Context;
use flow_protocol::transport::certs;
use flow_protocol::Role;

/// Create the cluster CA and issue node certificates (mutual TLS between tiers).
///
/// Every node of a cluster trusts one CA. Each node gets a certificate naming it (DNS
/// name = node name, which peers pass as the server name) and binding its role
/// (`aiflow:role:<role>` URI SAN); peers refuse a certificate whose role they do not accept,
/// so a device certificate cannot register as an edge.
///
/// Example:
///   flow-node certs init --out pki/ca
///   flow-node certs issue --ca pki/ca --name edge-1 --role edge --out pki/nodes
#[derive(clap::Subcommand, Debug)]
pub enum CertsCmd {
    /// Create a new cluster CA: writes DIR/ca.pem (give to every node) and DIR/ca.key (keep
    /// private, mode 0600). Refuses to overwrite an existing CA.
    Init {
        /// Directory to write ca.pem and ca.key into (created if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// Issue a node certificate signed by the CA: writes OUT/NAME.pem and OUT/NAME.key.
    Issue {
        /// CA directory created by `certs init` (needs ca.pem and ca.key).
        #[arg(long, value_name = "DIR")]
        ca: PathBuf,
        /// Node name: a DNS-style name such as `edge-1` (letters, digits, '-', '.').
        /// Peers connect with this name as the TLS server name.
        #[arg(long)]
        name: String,
        /// Role bound into the certificate: device, edge or cloud.
        #[arg(long, value_parser = ["device", "edge", "cloud"])]
        role: String,
        /// Directory for NAME.pem and NAME.key (created if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
}

/// Run a `certs` subcommand.
pub fn run(cmd: CertsCmd) -> anyhow::Result<()> {
    match cmd {
        CertsCmd::Init { out } => {
            let files = certs::init_ca(&out)
                .with_context(|| format!("creating a CA in {}", out.display()))?;
            println!("CA certificate: {}", files.cert.display());
            println!("CA key:         {} (keep private)", files.key.display());
            println!("next: flow-node certs issue --ca {} --name NODE --role device|edge|cloud --out DIR", out.display());
        }
        CertsCmd::Issue {
            ca,
            name,
            role,
            out,
        } => {
            let role: Role = role.parse()?;
            let files = certs::issue(&ca, &name, role, &out)
                .with_context(|| format!("issuing a certificate for {name} (role {role})"))?;
            println!("{name} ({role}) certificate: {}", files.cert.display());
            println!("{name} ({role}) key:         {}", files.key.display());
        }
    }
    Ok(())
}
