//! The node's endpoints: the server its children connect to, and one client endpoint per
//! parent (the primary dialled at start — or, when it does not answer, the first fall-back
//! that does — the others dialled when first needed).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use flow_protocol::transport::{Endpoint, EndpointConfig, ParentName};
use flow_protocol::{Hello, Role};

use super::AgentConfig;
use crate::error::{NodeError, Result};
use crate::parent::{ParentLink, Parents};

/// The roles a node of `role` accepts as its parent.
pub(super) fn parent_roles(role: Role) -> Vec<Role> {
    match role {
        Role::Device => vec![Role::Edge, Role::Cloud],
        Role::Edge => vec![Role::Cloud],
        Role::Cloud => vec![],
    }
}

/// The local address to dial `parent` from: any address of its family, loopback for a
/// loopback parent.
pub(super) fn bind_for(parent: &SocketAddr) -> SocketAddr {
    let ip = if parent.is_ipv6() {
        IpAddr::V6(Ipv6Addr::UNSPECIFIED)
    } else if parent.ip().is_loopback() {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    } else {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    };
    SocketAddr::new(ip, 0)
}

/// The endpoint children connect to, when the node listens.
pub(super) fn server(cfg: &AgentConfig, hello: &Hello) -> Result<Option<Endpoint>> {
    match cfg.listen {
        Some(addr) => {
            let ecfg = EndpointConfig::new(addr, cfg.security.clone(), hello.clone());
            Ok(Some(Endpoint::server(ecfg)?))
        }
        None => Ok(None),
    }
}

fn client(cfg: &AgentConfig, hello: &Hello, parent: &SocketAddr) -> Result<Endpoint> {
    let mut ecfg = EndpointConfig::new(bind_for(parent), cfg.security.clone(), hello.clone());
    // Parent links notice a dead parent in seconds, not at the default idle timeout.
    ecfg.keep_alive = cfg.probe.health.keep_alive;
    ecfg.idle_timeout = cfg.probe.health.idle_timeout;
    ecfg.parent_roles = parent_roles(cfg.role);
    Ok(Endpoint::client(ecfg)?)
}

/// Dial the primary parent and prepare the fallbacks (dialled when first needed). With
/// fallbacks, a primary that does not answer at start is not fatal: the first parent that
/// answers is used, the ones before it keep re-dialling in the background (a node restarted
/// while its preferred parent is down still starts). Only when no parent answers does the
/// start fail, with the first parent's error.
pub(super) async fn connect_parents(
    cfg: &AgentConfig,
    hello: &Hello,
) -> Result<Option<Arc<Parents>>> {
    let Some((addr, name)) = &cfg.parent else {
        if !cfg.fallback_parents.is_empty() {
            return Err(NodeError::Config(
                "fallback parents need a primary parent".into(),
            ));
        }
        return Ok(None);
    };
    let link = |addr: &SocketAddr, name: &ParentName| {
        ParentLink::lazy(
            client(cfg, hello, addr)?,
            *addr,
            name.clone(),
            cfg.parent_encoding,
            cfg.probe,
        )
    };
    if cfg.fallback_parents.is_empty() {
        let primary = ParentLink::connect(
            client(cfg, hello, addr)?,
            *addr,
            name.clone(),
            cfg.parent_encoding,
            cfg.probe,
        )
        .await?;
        if let Some(Some(host)) = cfg.parent_hosts.first() {
            primary.redial_by_name(host.clone());
        }
        return Ok(Some(Parents::new(vec![primary])?));
    }
    let mut links = vec![link(addr, name)?];
    for (addr, name) in &cfg.fallback_parents {
        links.push(link(addr, name)?);
    }
    for (link, host) in links.iter().zip(&cfg.parent_hosts) {
        if let Some(host) = host {
            link.redial_by_name(host.clone());
        }
    }
    let mut first_err = None;
    for (i, l) in links.iter().enumerate() {
        match l.dial_bounded().await {
            Ok(()) => {
                let parents = Parents::new(links.clone())?;
                parents.set_active(i);
                if i > 0 {
                    tracing::warn!(parent = %l.addr(), skipped = i, "the preferred parent did not answer at start; using a fall-back (the preferred one keeps being re-dialled)");
                }
                return Ok(Some(parents));
            }
            Err(e) => {
                tracing::warn!(parent = %l.addr(), error = %e, "parent did not answer at start; trying the next");
                first_err.get_or_insert(e);
            }
        }
    }
    Err(first_err.unwrap_or_else(|| NodeError::Config("no parent configured".into())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tier_accepts_only_higher_tiers_as_parents() {
        assert_eq!(parent_roles(Role::Device), vec![Role::Edge, Role::Cloud]);
        assert_eq!(parent_roles(Role::Edge), vec![Role::Cloud]);
        assert!(parent_roles(Role::Cloud).is_empty());
    }

    #[test]
    fn parents_are_dialled_from_an_address_of_their_family() {
        let bind = |a: &str| bind_for(&a.parse().unwrap()).to_string();
        assert_eq!(bind("127.0.0.1:7000"), "127.0.0.1:0");
        assert_eq!(bind("10.0.0.2:7000"), "0.0.0.0:0");
        assert_eq!(bind("[::1]:7000"), "[::]:0");
    }
}
