//! The faults of a testbed scenario, applied to the running compose project: kill/restart
//! (`docker kill -s SIGKILL` / `restart` / `start` by container id), partition/heal
//! (`docker network disconnect/connect` of the lower node, same address on reconnect),
//! degrade_link (the shaper's control port via `docker exec`).

use std::collections::BTreeMap;
use std::process::Command;

use anyhow::Context;
use flow_testbed::scenario::{Action, ScenarioEvent};

use super::testbed_compose::{address_of, docker, health_of, run_ok, Compose};

/// A fault as it was applied.
#[derive(Debug, serde::Serialize)]
pub(super) struct AppliedEvent {
    pub at_s: f64,
    pub applied_at_s: f64,
    pub action: String,
    pub target: String,
    pub ok: bool,
    pub detail: String,
}

/// The lower node of a link and the network towards its parent.
fn partition_side(link: &str) -> anyhow::Result<(&str, &'static str)> {
    let (a, b) = link
        .split_once(':')
        .with_context(|| format!("link `{link}` is not a:b"))?;
    // device < edge < cloud (cloud2 is a cloud): the lower node is cut from the network
    // towards its parent
    let tier = |n: &str| {
        ["device", "edge", "cloud"]
            .iter()
            .position(|t| n.starts_with(t))
    };
    let lower = if tier(a) <= tier(b) { a } else { b };
    let net = if lower.starts_with("device") {
        "dev_edge"
    } else {
        "edge_cloud"
    };
    Ok((lower, net))
}

pub(super) struct Faults<'a> {
    pub compose: &'a Compose,
    /// (container, network) → its address before a partition, for the reconnect.
    pub addresses: BTreeMap<(String, String), String>,
    /// service → container id. Faults talk to docker directly with these: a compose v1
    /// call costs seconds on a loaded machine, and a soak's faults must keep their times.
    pub ids: BTreeMap<String, String>,
}

impl Faults<'_> {
    fn id(&mut self, service: &str) -> anyhow::Result<String> {
        if let Some(id) = self.ids.get(service) {
            return Ok(id.clone());
        }
        let id = self.compose.container(service)?;
        self.ids.insert(service.to_string(), id.clone());
        Ok(id)
    }

    pub(super) fn apply(&mut self, ev: &ScenarioEvent) -> anyhow::Result<String> {
        let c = self.compose;
        match &ev.action {
            Action::Kill => {
                let id = self.id(&ev.target)?;
                docker(&["kill", "-s", "SIGKILL", &id], "docker kill")?;
                Ok("SIGKILL".into())
            }
            Action::Restart => {
                let id = self.id(&ev.target)?;
                if health_of(&id).starts_with("running") {
                    docker(&["restart", "-t", "2", &id], "docker restart")?;
                    Ok("restarted".into())
                } else {
                    docker(&["start", &id], "docker start")?;
                    Ok("started".into())
                }
            }
            Action::Partition => {
                let (node, net) = partition_side(&ev.target)?;
                let id = self.id(node)?;
                let network = c.network(net);
                let ip = address_of(&id, &network)?;
                docker(
                    &["network", "disconnect", "-f", &network, &id],
                    "docker network disconnect",
                )?;
                let detail = format!("{node} disconnected from {network} (was {ip})");
                self.addresses.insert((id, network), ip);
                Ok(detail)
            }
            Action::Heal => {
                let (node, net) = partition_side(&ev.target)?;
                let id = self.id(node)?;
                let network = c.network(net);
                let ip = self
                    .addresses
                    .remove(&(id.clone(), network.clone()))
                    .with_context(|| format!("heal {}: it was not partitioned", ev.target))?;
                docker(
                    &["network", "connect", "--ip", &ip, &network, &id],
                    "docker network connect",
                )?;
                Ok(format!("{node} reconnected to {network} at {ip}"))
            }
            Action::DegradeLink(change) => {
                let id = self.id("links")?;
                let mut args: Vec<String> = [
                    "exec",
                    &id,
                    "/flow-node",
                    "testbed",
                    "link-ctl",
                    "apply",
                    &ev.target,
                ]
                .iter()
                .map(|s| s.to_string())
                .collect();
                for (flag, v) in [
                    ("--delay-ms", change.delay_ms),
                    ("--jitter-ms", change.jitter_ms),
                    ("--rate-mbit", change.rate_mbit),
                    ("--loss", change.loss),
                ] {
                    if let Some(v) = v {
                        args.push(flag.into());
                        args.push(v.to_string());
                    }
                }
                run_ok(Command::new("docker").args(&args), "link-ctl apply")
            }
        }
    }
}

/// The action's name as scenario files write it.
pub(super) fn action_label(a: &Action) -> &'static str {
    match a {
        Action::Kill => "kill",
        Action::Restart => "restart",
        Action::Partition => "partition",
        Action::Heal => "heal",
        Action::DegradeLink(_) => "degrade_link",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_cut_the_lower_node_towards_its_parent() {
        for (link, node, net) in [
            ("device2:edge1", "device2", "dev_edge"),
            ("edge1:device2", "device2", "dev_edge"),
            ("edge1:cloud", "edge1", "edge_cloud"),
            ("cloud2:edge1", "edge1", "edge_cloud"),
            ("edge1:cloud2", "edge1", "edge_cloud"),
            ("cloud:edge2", "edge2", "edge_cloud"),
        ] {
            assert_eq!(partition_side(link).unwrap(), (node, net), "{link}");
        }
        assert!(partition_side("edge1").is_err());
    }
}
