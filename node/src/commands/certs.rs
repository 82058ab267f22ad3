//! `flow-node certs init|issue`: the cluster CA and node certificates for mutual TLS.

use std::path::PathBuf;

use anyhow::Context;
use flow_protocol::transport::certs;
use flow_protocol::Role;

/// Create the cluster CA and issue node certificates (mutual TLS between tiers).
///
/// Every node of a cluster trusts one CA. Each node gets a certificate naming it (DNS
/// name = node name) and binding its role (`aiflow:role:<role>` URI SAN). A child accepts a
/// parent whose certificate is signed by the CA and carries a parent role, whatever its
/// name (`--parent-name` pins a name); peers refuse a certificate whose role they do not
/// accept, so a device certificate cannot serve or register as an edge.
///
/// Rotation: issue the node's certificate again into the same directory; the running node
/// presents the new one from its next handshake on (no restart).
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
    /// Issue a node certificate signed by the CA: writes OUT/NAME.pem and OUT/NAME.key,
    /// replacing earlier ones (a running node picks the new pair up at its next handshake).
    Issue {
        /// CA directory created by `certs init` (needs ca.pem and ca.key).
        #[arg(long, value_name = "DIR")]
        ca: PathBuf,
        /// Node name: a DNS-style name such as `edge-1` (letters, digits, '-', '.'),
        /// written as the certificate's DNS name (children may pin it with --parent-name).
        #[arg(long)]
        name: String,
        /// Role bound into the certificate: device, edge or cloud.
        #[arg(long, value_parser = ["device", "edge", "cloud"])]
        role: String,
        /// Directory for NAME.pem and NAME.key (created if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Valid for this many days from now (default: until 2099). Reissue before it
        /// ends; running nodes pick the new files up without a restart.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
        days: Option<u64>,
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
            days,
        } => {
            let role: Role = role.parse()?;
            let validity = match days {
                Some(d) => certs::Validity::days(d)?,
                None => certs::Validity::long(),
            };
            let files = certs::issue_with_validity(&ca, &name, role, &out, validity)
                .with_context(|| format!("issuing a certificate for {name} (role {role})"))?;
            println!("{name} ({role}) certificate: {}", files.cert.display());
            println!("{name} ({role}) key:         {}", files.key.display());
        }
    }
    Ok(())
}
