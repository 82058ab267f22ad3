//! `flow-node testbed ...`: the multi-host testbed (docker compose) and the pieces that run
//! inside its containers.
//!
//! Host side: `image` (a node image without any registry), `up`, `down`, `run SCENARIO`
//! (see `testbed_run.rs`), `soak SCENARIO` (`testbed_soak.rs`). Container side: `certs`
//! (one-shot, idempotent PKI), `shape` (the link shapers with a control port) and
//! `link-ctl` (`testbed_link.rs`), `load` (the open-loop load generator) and `health` (HTTP
//! probe for health checks; the image has no curl) (`testbed_load.rs`), `probe` (a node's
//! RSS and session/KV gauges, `testbed_probe.rs`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context};
use flow_protocol::transport::certs;
use flow_protocol::Role;

use super::testbed_link::{LinkCtlArgs, ShapeArgs};
use super::testbed_load::{HealthArgs, LoadArgs};
use super::testbed_probe::ProbeArgs;
use super::testbed_run::{DownArgs, RunArgs, UpArgs};
use super::testbed_soak::SoakArgs;

/// Image tag the compose file uses by default (`AIFLOW_IMAGE` overrides it there).
pub const DEFAULT_IMAGE: &str = "aiflow-node:dev";

/// `flow-node testbed ...`
///
/// A device-edge-cloud testbed on one Docker host: 1 cloud, 2 edges, 4 devices and a load
/// generator on separate networks (devices reach only edges, edges reach the cloud), every
/// tier-to-tier link through the user-space link shaper, faults injected from scenario
/// files, and a report at the end.
///
/// Quick start (no registry needed):
///   cargo build --release -p flow-node
///   ./target/release/flow-node testbed image            # docker import of a tiny rootfs
///   ./target/release/flow-node testbed run testbed/scenarios/edge_restart.toml
///   open target/testbed/edge_restart/report.md
#[derive(clap::Subcommand, Debug)]
pub enum TestbedCmd {
    /// Build the node image without any registry: a rootfs with this binary (or --binary),
    /// the shared libraries `ldd` lists, minimal /etc files and the model family, then
    /// `docker import`.
    Image(ImageArgs),
    /// Issue certs (idempotent) and start the testbed's nodes and link shapers; waits until
    /// they are healthy.
    Up(UpArgs),
    /// Stop the testbed and remove its containers, networks and volumes.
    Down(DownArgs),
    /// Bring the testbed up, replay load open-loop, inject the scenario's faults at their
    /// times, collect every request's outcome, write the report, bring it down.
    Run(RunArgs),
    /// A long run: the scenario's fault cycle repeated for --duration under looped trace
    /// load, every node's RSS and session/KV gauges sampled; fails (non-zero exit, the
    /// broken bound named) unless every request was answered or refused explicitly, RSS
    /// grew at most --max-rss-growth after warm-up and sessions and KV are back to zero.
    ///
    /// The scenario file is one fault cycle (its duration_s is the cycle length). Unlike
    /// `run`: --speed defaults to 2 (the trace loops, it is not fitted into the run), --out
    /// to target/testbed/soak-<scenario stem>, and the checks always apply. Example:
    /// `flow-node testbed soak testbed/scenarios/soak_cycle.toml --duration 30m`, then
    /// read target/testbed/soak-soak_cycle/soak.md.
    Soak(SoakArgs),
    /// (in the `certs` container) Create the cluster CA and node certificates unless they
    /// exist.
    Certs(CertsArgs),
    /// (in the `links` container) Run link shapers: UDP relays emulating delay, jitter,
    /// rate, loss, changed live through a control port or a schedule file.
    Shape(ShapeArgs),
    /// Talk to a running `shape` process: change a link now, or print byte counters.
    LinkCtl(LinkCtlArgs),
    /// (in the `loadgen` container) Replay a schedule (JSON on stdin) open-loop against
    /// nodes' HTTP APIs; print one JSON record per request on stdout.
    Load(LoadArgs),
    /// Exit 0 if an HTTP URL answers 200 (health checks; the image has no curl).
    Health(HealthArgs),
    /// (in a node container) Print one JSON reading of the node: RSS and start time from
    /// /proc, session and KV gauges from its /metrics. `testbed soak` runs it.
    Probe(ProbeArgs),
}

pub fn run(cmd: TestbedCmd) -> anyhow::Result<()> {
    match cmd {
        TestbedCmd::Image(a) => image(a),
        TestbedCmd::Up(a) => super::testbed_run::up(a),
        TestbedCmd::Down(a) => super::testbed_run::down(a),
        TestbedCmd::Run(a) => super::testbed_run::run(a),
        TestbedCmd::Soak(a) => super::testbed_soak::soak(a),
        TestbedCmd::Certs(a) => issue_certs(a),
        TestbedCmd::Shape(a) => super::testbed_link::shape(a),
        TestbedCmd::LinkCtl(a) => super::testbed_link::link_ctl(a),
        TestbedCmd::Load(a) => super::testbed_load::load(a),
        TestbedCmd::Health(a) => super::testbed_load::health(a),
        TestbedCmd::Probe(a) => super::testbed_probe::probe(a),
    }
}

/// Flags of `testbed image`.
#[derive(clap::Args, Debug)]
pub struct ImageArgs {
    /// The flow-node binary to put in the image. Default: this binary. CI passes the debug
    /// build `cargo test` already made; users normally use a release build.
    #[arg(long)]
    pub binary: Option<PathBuf>,
    /// Image tag.
    #[arg(long, default_value = DEFAULT_IMAGE)]
    pub tag: String,
    /// Model family copied to /models/small (seeds the compose file's `models` volume).
    #[arg(long, default_value = "models/small")]
    pub models: PathBuf,
    /// Keep debug info in the binary (by default it is stripped with `strip --strip-debug`
    /// when `strip` exists, which makes a debug binary several times smaller).
    #[arg(long)]
    pub keep_debug_info: bool,
}

/// The shared libraries (and the dynamic loader) `ldd` lists for `binary`, as absolute paths.
fn shared_libraries(binary: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .context("running ldd (needed to find the binary's shared libraries)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // a static binary: "not a dynamic executable"
        if String::from_utf8_lossy(&out.stderr).contains("not a dynamic") {
            return Ok(Vec::new());
        }
        bail!(
            "ldd {} failed: {}",
            binary.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    parse_ldd(&text)
}

/// Parse `ldd` output: `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)` and
/// `/lib64/ld-linux-x86-64.so.2 (0x...)`; the vDSO has no file and is skipped.
fn parse_ldd(text: &str) -> anyhow::Result<Vec<PathBuf>> {
    let mut libs = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let path = match line.split_once("=>") {
            Some((name, rest)) => {
                let rest = rest.trim();
                if rest.starts_with("not found") {
                    bail!("ldd: {} not found on this machine", name.trim());
                }
                rest.split_whitespace().next().unwrap_or("")
            }
            None => line.split_whitespace().next().unwrap_or(""),
        };
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        }
    }
    Ok(libs)
}

fn copy_into(root: &Path, src: &Path) -> anyhow::Result<()> {
    let rel = src.strip_prefix("/").unwrap_or(src);
    let dest = root.join(rel);
    if let Some(p) = dest.parent() {
        std::fs::create_dir_all(p)?;
    }
    // fs::copy follows symlinks: the image gets the library's contents under the linked name
    std::fs::copy(src, &dest)
        .with_context(|| format!("copying {} into the image", src.display()))?;
    Ok(())
}

/// Build the node image (see [`TestbedCmd::Image`]).
pub fn image(a: ImageArgs) -> anyhow::Result<()> {
    let binary = match a.binary {
        Some(b) => b,
        None => std::env::current_exe().context("finding this binary")?,
    };
    anyhow::ensure!(
        binary.is_file(),
        "--binary {}: no such file (build it with `cargo build --release -p flow-node`)",
        binary.display()
    );
    anyhow::ensure!(
        a.models.join("config.json").is_file(),
        "--models {}: not a model directory (config.json missing); run from the repository root",
        a.models.display()
    );
    let tmp = tempfile::tempdir()?;
    let root = tmp.path().join("rootfs");
    for d in ["etc/ssl/certs", "tmp", "models/small", "pki", "data"] {
        std::fs::create_dir_all(root.join(d))?;
    }
    let dest = root.join("flow-node");
    let stripped = !a.keep_debug_info
        && Command::new("strip")
            .args(["--strip-debug", "-o"])
            .arg(&dest)
            .arg(&binary)
            .status()
            .is_ok_and(|s| s.success());
    if !stripped {
        std::fs::copy(&binary, &dest).with_context(|| format!("copying {}", binary.display()))?;
    }
    let libs = shared_libraries(&binary)?;
    for lib in &libs {
        copy_into(&root, lib)?;
    }
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/:/flow-node\nnobody:x:65534:65534:nobody:/:/flow-node\n",
    )?;
    std::fs::write(root.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n")?;
    let bundle = Path::new("/etc/ssl/certs/ca-certificates.crt");
    if bundle.is_file() {
        copy_into(&root, bundle)?;
    }
    let mut model_bytes = 0u64;
    for e in std::fs::read_dir(&a.models)? {
        let e = e?;
        if e.file_type()?.is_file() {
            model_bytes += std::fs::copy(e.path(), root.join("models/small").join(e.file_name()))?;
        }
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(root.join("tmp"), std::fs::Permissions::from_mode(0o1777))?;
    }
    let tar = tmp.path().join("rootfs.tar");
    let status = Command::new("tar")
        .args(["--numeric-owner", "--owner=0", "--group=0", "-C"])
        .arg(&root)
        .args(["-cf"])
        .arg(&tar)
        .arg(".")
        .status()
        .context("running tar")?;
    anyhow::ensure!(status.success(), "tar failed ({status})");
    let version = env!("CARGO_PKG_VERSION");
    let out = Command::new("docker")
        .args([
            "import",
            "--change",
            r#"ENTRYPOINT ["/flow-node"]"#,
            "--change",
            "WORKDIR /",
            "--change",
            "ENV RAYON_NUM_THREADS=1 CANDLE_NUM_THREADS=1",
            "--change",
            &format!(
                "LABEL org.opencontainers.image.version={version} aiflow.binary={}",
                binary.display()
            ),
            "--message",
            "aiflow node image (flow-node testbed image)",
        ])
        .arg(&tar)
        .arg(&a.tag)
        .stderr(Stdio::inherit())
        .output()
        .context("running `docker import` (is Docker installed and running?)")?;
    anyhow::ensure!(
        out.status.success(),
        "docker import failed ({})",
        out.status
    );
    let size = std::fs::metadata(&tar)?.len();
    println!(
        "image {} ({}): flow-node{} + {} shared libraries + models ({:.1} MiB), {:.1} MiB",
        a.tag,
        String::from_utf8_lossy(&out.stdout).trim(),
        if stripped {
            " (debug info stripped)"
        } else {
            ""
        },
        libs.len(),
        model_bytes as f64 / (1 << 20) as f64,
        size as f64 / (1 << 20) as f64
    );
    Ok(())
}

/// Flags of `testbed certs`.
#[derive(clap::Args, Debug)]
pub struct CertsArgs {
    /// Directory for ca/ (CA) and nodes/ (NAME.pem, NAME.key).
    #[arg(long, default_value = "/pki")]
    pub out: PathBuf,
    /// Nodes to certify as NAME:ROLE (e.g. edge1:edge); repeatable.
    #[arg(long = "node", value_name = "NAME:ROLE", required = true)]
    pub nodes: Vec<String>,
}

/// Create the CA unless it exists, then issue every missing node certificate.
pub fn issue_certs(a: CertsArgs) -> anyhow::Result<()> {
    let ca = a.out.join("ca");
    if !ca.join("ca.pem").is_file() {
        certs::init_ca(&ca).with_context(|| format!("creating a CA in {}", ca.display()))?;
        println!("created CA {}", ca.display());
    }
    let nodes = a.out.join("nodes");
    for spec in &a.nodes {
        let (name, role) = spec
            .split_once(':')
            .with_context(|| format!("--node {spec:?}: expected NAME:ROLE, e.g. edge1:edge"))?;
        let role: Role = role
            .parse()
            .map_err(|e| anyhow::anyhow!("--node {spec:?}: {e}"))?;
        if nodes.join(format!("{name}.pem")).is_file() {
            continue;
        }
        certs::issue(&ca, name, role, &nodes)
            .with_context(|| format!("issuing a certificate for {name} ({role})"))?;
        println!("issued {name} ({role})");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_is_parsed() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                    \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        let libs = parse_ldd(text).unwrap();
        assert_eq!(
            libs,
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libgcc_s.so.1"),
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
        let err = parse_ldd("\tlibfoo.so.1 => not found\n").unwrap_err();
        assert!(err.to_string().contains("libfoo.so.1"), "{err}");
    }

    #[test]
    fn certs_are_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let args = || CertsArgs {
            out: dir.path().to_path_buf(),
            nodes: vec!["cloud:cloud".into(), "edge1:edge".into()],
        };
        issue_certs(args()).unwrap();
        let pem = std::fs::read(dir.path().join("nodes/edge1.pem")).unwrap();
        issue_certs(args()).unwrap();
        assert_eq!(
            std::fs::read(dir.path().join("nodes/edge1.pem")).unwrap(),
            pem
        );
        let bad = CertsArgs {
            out: dir.path().to_path_buf(),
            nodes: vec!["x:boss".into()],
        };
        assert!(issue_certs(bad).unwrap_err().to_string().contains("x:boss"));
    }
}
