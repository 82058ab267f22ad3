//! The compose testbed's plumbing: which `compose` implementation is here (v2 plugin or v1),
//! a project bound to its file and image, container ids by compose labels (one `docker ps`
//! for every service), container health and addresses, the load generator container. Used by
//! `testbed up|down|run|soak`.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context};

use flow_testbed::loadgen::{RequestRecord, Schedule};
use flow_testbed::scenario::{Action, Scenario};

use super::testbed::DEFAULT_IMAGE;

/// Services of the compose files that are not nodes (`certs` runs once, `links` is the
/// shaper, `loadgen` the load generator).
const NOT_NODES: [&str; 3] = ["certs", "links", "loadgen"];

/// Where to find the testbed (shared by up, down and run).
#[derive(clap::Args, Debug, Clone)]
pub struct ComposeArgs {
    /// The compose file.
    #[arg(long, default_value = "testbed/docker-compose.yml")]
    pub compose_file: PathBuf,
    /// A compose file merged over it (`-f base -f override`), e.g.
    /// testbed/docker-compose.failover.yml (fall-back edges, a second cloud); repeatable.
    /// A scenario's `topology.compose_overrides` are added to these.
    #[arg(long = "compose-override", value_name = "FILE")]
    pub overrides: Vec<PathBuf>,
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
        for o in &args.overrides {
            anyhow::ensure!(
                o.is_file(),
                "{}: compose override not found (scenario overrides are relative to the folder of {})",
                o.display(),
                args.compose_file.display()
            );
        }
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
            .arg(&self.args.compose_file);
        for o in &self.args.overrides {
            c.arg("-f").arg(o);
        }
        c.args(args).env("AIFLOW_IMAGE", &self.args.image);
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

    /// The node services the merged compose files define, sorted.
    pub(super) fn node_services(&self) -> anyhow::Result<Vec<String>> {
        let out = self.run(&["config", "--services"], "compose config --services")?;
        let mut nodes: Vec<String> = out
            .lines()
            .map(|l| l.trim().to_string())
            .filter(|s| !s.is_empty() && !NOT_NODES.contains(&s.as_str()))
            .collect();
        nodes.sort();
        Ok(nodes)
    }

    /// Fail unless every node of `nodes` is a service of the merged compose files.
    pub(super) fn check_nodes(&self, nodes: &[String], scenario: &Path) -> anyhow::Result<()> {
        let services = self.node_services()?;
        for n in nodes {
            anyhow::ensure!(
                services.contains(n),
                "{}: node `{n}` is not a node service of {} (defined: {}); a node from an \
                 override needs it in `topology.compose_overrides`",
                scenario.display(),
                self.files(),
                services.join(", ")
            );
        }
        Ok(())
    }

    fn files(&self) -> String {
        std::iter::once(&self.args.compose_file)
            .chain(&self.args.overrides)
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(" + ")
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

impl ComposeArgs {
    /// These arguments with a scenario's `topology.compose_overrides` added (resolved
    /// against the base compose file's folder).
    pub(super) fn with_scenario(&self, overrides: &[String]) -> Self {
        let dir = self.compose_file.parent().unwrap_or(Path::new("."));
        let mut a = self.clone();
        for o in overrides {
            let p = dir.join(o);
            if !a.overrides.contains(&p) {
                a.overrides.push(p);
            }
        }
        a
    }
}

/// The load generator container (`compose run loadgen`), its schedule on stdin (written
/// from a thread: a long schedule fills the pipe until the container reads it, and the
/// caller's fault loop must not wait for that) and its records read from stdout.
pub(super) struct Loadgen {
    pub child: std::process::Child,
    writer: std::thread::JoinHandle<std::io::Result<()>>,
    reader: std::thread::JoinHandle<std::io::Result<String>>,
}

impl Loadgen {
    /// `testbed load --target T… ARGS…` with `schedule`.
    pub(super) fn start(
        compose: &Compose,
        targets: &[String],
        args: &[String],
        schedule: &Schedule,
    ) -> anyhow::Result<Self> {
        let mut argv: Vec<&str> = vec!["run", "--rm", "-T", "loadgen"];
        for t in targets {
            argv.extend(["--target", t]);
        }
        argv.extend(args.iter().map(String::as_str));
        let mut child = compose
            .cmd(&argv)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting the load generator")?;
        // dropping stdin after the write ends the schedule
        let mut stdin = child.stdin.take().context("loadgen stdin")?;
        let json = serde_json::to_string(schedule)?;
        let writer = std::thread::spawn(move || stdin.write_all(json.as_bytes()));
        let mut stdout = child.stdout.take().context("loadgen stdout")?;
        let reader = std::thread::spawn(move || {
            let mut s = String::new();
            stdout.read_to_string(&mut s).map(|_| s)
        });
        Ok(Self {
            child,
            writer,
            reader,
        })
    }

    /// The records, once the container exited with `status`.
    pub(super) fn records(
        self,
        status: std::process::ExitStatus,
    ) -> anyhow::Result<Vec<RequestRecord>> {
        self.writer
            .join()
            .map_err(|_| anyhow::anyhow!("loadgen writer thread panicked"))?
            .context("writing the schedule to the load generator")?;
        let stdout = self
            .reader
            .join()
            .map_err(|_| anyhow::anyhow!("loadgen reader thread panicked"))??;
        anyhow::ensure!(status.success(), "the load generator failed ({status})");
        serde_json::from_str(stdout.trim()).context("parsing the load generator's records")
    }
}

/// Nodes that are not running although the scenario's last event for them is not a kill.
pub(super) fn exited_nodes(compose: &Compose, scenario: &Scenario) -> anyhow::Result<Vec<String>> {
    let ids = compose.containers()?;
    let mut exited = Vec::new();
    for n in &scenario.topology.nodes {
        let killed_last = scenario
            .events
            .iter()
            .rev()
            .find(|e| &e.target == n)
            .is_some_and(|e| e.action == Action::Kill);
        let state = match ids.get(n) {
            Some(id) => health_of(id),
            None => "no container".to_string(),
        };
        if !killed_last && !state.starts_with("running") {
            exited.push(format!("{n} ({state})"));
        }
    }
    Ok(exited)
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

    #[test]
    fn scenario_overrides_resolve_beside_the_base_file() {
        let base = ComposeArgs {
            compose_file: "testbed/docker-compose.yml".into(),
            overrides: vec!["extra.yml".into()],
            project: "p".into(),
            image: "i".into(),
        };
        let a = base.with_scenario(&["docker-compose.failover.yml".into(), "extra.yml".into()]);
        assert_eq!(
            a.overrides,
            [
                PathBuf::from("extra.yml"),
                PathBuf::from("testbed/docker-compose.failover.yml"),
                PathBuf::from("testbed/extra.yml"),
            ]
        );
    }
}
