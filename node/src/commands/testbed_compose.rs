//! The compose testbed's plumbing: which `compose` implementation is here (v2 plugin or v1),
//! a project bound to its file and image, container ids by compose labels (one `docker ps`
//! for every service), container health and addresses. Used by `testbed up|down|run|soak`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{bail, Context};

use super::testbed::DEFAULT_IMAGE;

/// Services the compose file defines that a scenario may name.
pub(super) const NODES: [&str; 7] = [
    "cloud", "edge1", "edge2", "device1", "device2", "device3", "device4",
];

/// Where to find the testbed (shared by up, down and run).
#[derive(clap::Args, Debug, Clone)]
pub struct ComposeArgs {
    /// The compose file.
    #[arg(long, default_value = "testbed/docker-compose.yml")]
    pub compose_file: PathBuf,
    /// Compose project name (prefixes containers, networks and volumes).
    #[arg(long, default_value = "aiflowtb")]
    pub project: String,
    /// Node image (built by `flow-node testbed image`).
    #[arg(long, default_value = DEFAULT_IMAGE)]
    pub image: String,
}

/// `docker compose` (v2) or `docker-compose` (v1), whichever exists, bound to one project.
pub struct Compose {
    program: Vec<String>,
    args: ComposeArgs,
}

pub(super) fn run_ok(cmd: &mut Command, what: &str) -> anyhow::Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("{what}: could not start {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

pub(super) fn docker(args: &[&str], what: &str) -> anyhow::Result<String> {
    run_ok(Command::new("docker").args(args), what)
}

impl Compose {
    /// Find a compose implementation; errors say how to get one.
    pub fn detect(args: &ComposeArgs) -> anyhow::Result<Self> {
        anyhow::ensure!(
            args.compose_file.is_file(),
            "{}: compose file not found (run from the repository root or pass --compose-file)",
            args.compose_file.display()
        );
        let works = |p: &[&str]| {
            Command::new(p[0])
                .args(&p[1..])
                .arg("version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        let program: Vec<String> = if works(&["docker", "compose"]) {
            vec!["docker".into(), "compose".into()]
        } else if works(&["docker-compose"]) {
            vec!["docker-compose".into()]
        } else {
            bail!("neither `docker compose` nor `docker-compose` works; install Docker with the compose plugin (or Debian's docker-compose)")
        };
        Ok(Self {
            program,
            args: args.clone(),
        })
    }

    /// A compose command with the project, file and image set.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.program[0]);
        c.args(&self.program[1..])
            .arg("-p")
            .arg(&self.args.project)
            .arg("-f")
            .arg(&self.args.compose_file)
            .args(args)
            .env("AIFLOW_IMAGE", &self.args.image);
        c
    }

    pub(super) fn run(&self, args: &[&str], what: &str) -> anyhow::Result<String> {
        run_ok(&mut self.cmd(args), what)
    }

    pub(super) fn version(&self) -> String {
        let mut c = Command::new(&self.program[0]);
        c.args(&self.program[1..]).args(["version", "--short"]);
        let v = run_ok(&mut c, "compose version").unwrap_or_else(|_| "?".into());
        format!("{} {v}", self.program.join(" "))
    }

    /// The container id of a service.
    pub(super) fn container(&self, service: &str) -> anyhow::Result<String> {
        // -a: compose v2 lists only running containers otherwise (a killed edge must be found)
        let id = self.run(&["ps", "-a", "-q", service], "compose ps")?;
        let id = id.lines().next().unwrap_or("").trim().to_string();
        anyhow::ensure!(!id.is_empty(), "service {service} has no container");
        Ok(id)
    }

    /// The container ids of every service of the project, in one `docker ps` call (a compose
    /// v1 `ps` per service costs seconds on a loaded machine). Newest container first, so a
    /// service whose container was recreated maps to the current one; stopped containers are
    /// included (a killed edge must be found).
    pub(super) fn containers(&self) -> anyhow::Result<BTreeMap<String, String>> {
        let filter = format!(
            "label=com.docker.compose.project={}",
            compose_project_name(&self.args.project)
        );
        let out = docker(
            &[
                "ps",
                "-a",
                "--no-trunc",
                "--filter",
                &filter,
                "--format",
                "{{.Label \"com.docker.compose.service\"}}\t{{.ID}}",
            ],
            "docker ps",
        )?;
        Ok(parse_service_ids(&out))
    }

    pub(super) fn network(&self, net: &str) -> String {
        format!("{}_{net}", self.args.project)
    }

    /// Stop and remove everything, volumes included.
    pub fn down(&self) -> anyhow::Result<()> {
        self.run(
            &[
                "--profile",
                "load",
                "down",
                "-v",
                "--remove-orphans",
                "-t",
                "2",
            ],
            "compose down",
        )?;
        Ok(())
    }
}

/// The project name as compose stores it in its labels: lower case, only `[a-z0-9_-]`
/// (compose v1's and v2's normalisation).
fn compose_project_name(project: &str) -> String {
    project
        .to_lowercase()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '-')
        .collect()
}

/// `service<TAB>id` lines, newest first → service → id (the first line of a service wins).
fn parse_service_ids(out: &str) -> BTreeMap<String, String> {
    let mut ids = BTreeMap::new();
    for line in out.lines() {
        if let Some((service, id)) = line.trim().split_once('\t') {
            if !service.is_empty() && !id.is_empty() {
                ids.entry(service.to_string())
                    .or_insert_with(|| id.to_string());
            }
        }
    }
    ids
}

pub(super) fn health_of(id: &str) -> String {
    docker(
        &[
            "inspect",
            "-f",
            "{{.State.Status}}/{{if .State.Health}}{{.State.Health.Status}}{{end}}",
            id,
        ],
        "docker inspect",
    )
    .unwrap_or_else(|e| format!("unknown ({e})"))
}

/// The address of a service's container on one of the project's networks.
pub(super) fn address_on(compose: &Compose, service: &str, net: &str) -> anyhow::Result<String> {
    address_of(&compose.container(service)?, &compose.network(net))
}

/// The address of a container on a network.
pub(super) fn address_of(id: &str, network: &str) -> anyhow::Result<String> {
    docker(
        &[
            "inspect",
            "-f",
            &format!("{{{{(index .NetworkSettings.Networks \"{network}\").IPAddress}}}}"),
            id,
        ],
        "docker inspect (address)",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_lookup_reads_compose_labels() {
        assert_eq!(compose_project_name("AIFlow.Soak_30-m"), "aiflowsoak_30-m");
        // newest first: a recreated edge1 maps to its current container
        let ids = parse_service_ids("edge1\tnew1\ncloud\tc0\nedge1\told1\n\tnoservice\nbroken\n");
        assert_eq!(ids.len(), 2);
        assert_eq!(ids["edge1"], "new1");
        assert_eq!(ids["cloud"], "c0");
    }
}
