//! `GET /aiflow/status`: one JSON snapshot of what the entry node knows, for the dashboard
//! page (which polls it every second and computes rates from counter deltas). Counters are
//! totals since the node started; gauges are current values.

use std::sync::Arc;

use serde::Serialize;

use super::topology::{self, Node, ParentView};
use crate::agent::Agent;
use crate::http::error::ApiResult;
use crate::http::Api;

/// The whole snapshot.
#[derive(Debug, Serialize)]
pub struct Status {
    pub model: Model,
    /// The tiers from the entry node up (see [`topology`]).
    pub nodes: Vec<Node>,
    /// The entry node's links to its parents, then the links beyond as the parent in use
    /// reported them (`reported`).
    pub links: Vec<Link>,
    /// Generated tokens by the tier and exit that produced them.
    pub tokens: Vec<TierTokens>,
    pub counters: Counters,
    pub requests: Requests,
    pub engine: Engine,
}

/// The served model.
#[derive(Debug, Serialize)]
pub struct Model {
    /// The name clients send as `model`.
    pub name: String,
    pub layers: usize,
    /// The family's exit points.
    pub exits: Vec<usize>,
}

/// A link from a node to one of its parents: the entry node's own, or one the parent in
/// use reported (protocol 3).
#[derive(Debug, Serialize)]
pub struct Link {
    pub from: String,
    /// Reported by the parent in use rather than seen by the entry node itself.
    pub reported: bool,
    /// The parent's id (`None` until it is reached).
    pub to: Option<String>,
    pub addr: String,
    pub active: bool,
    /// `up`, `failing`, `down` or `idle` ([`crate::parent::ParentLink::state`]).
    pub health: &'static str,
    /// Smoothed RTT from the probes (ms); the prior until a probe completes.
    pub rtt_ms: f64,
    /// Smoothed goodput from the probes (bit/s).
    pub goodput_bps: f64,
    /// Confidence of the estimate, 0 (prior) to 1.
    pub confidence: f64,
    pub probes: u64,
    /// Live QUIC statistics while connected.
    pub quic: Option<Quic>,
}

/// QUIC's view of a connection.
#[derive(Debug, Serialize)]
pub struct Quic {
    pub rtt_ms: f64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub lost_packets: u64,
}

impl Link {
    /// A link the parent in use reported.
    fn reported(l: &flow_protocol::UpstreamLink) -> Self {
        Link {
            from: l.from.clone(),
            reported: true,
            to: l.to.as_ref().map(|p| p.node_id.clone()),
            addr: l.addr.clone(),
            active: l.active,
            health: l.state.as_str(),
            rtt_ms: f64::from(l.rtt_ms),
            goodput_bps: f64::from(l.goodput_bps),
            confidence: f64::from(l.confidence),
            probes: l.probes,
            quic: l.quic.map(|q| Quic {
                rtt_ms: f64::from(q.rtt_ms),
                bytes_sent: q.bytes_sent,
                bytes_received: q.bytes_received,
                lost_packets: q.lost_packets,
            }),
        }
    }
}

/// Tokens one exit of one tier produced.
#[derive(Debug, PartialEq, Serialize)]
pub struct TierTokens {
    pub tier: String,
    pub exit: u32,
    pub count: u64,
}

/// Totals since the node started.
#[derive(Debug, Serialize)]
pub struct Counters {
    pub requests: u64,
    pub request_errors: u64,
    /// Every generated token (the sum of [`Status::tokens`]).
    pub tokens: u64,
    /// Steps this node escalated to its parent.
    pub escalations: u64,
    /// Tokens answered locally because the parent failed.
    pub degraded: u64,
    pub parent_timeouts: u64,
    /// Hidden-state bytes shipped to the parent.
    pub tensor_bytes_up: u64,
    pub failovers: u64,
    pub prompt_tokens: u64,
    pub drafts_proposed: u64,
    pub drafts_accepted: u64,
}

/// The admission queue now.
#[derive(Debug, Serialize)]
pub struct Requests {
    pub running: usize,
    pub waiting: usize,
}

/// The entry node's engine now.
#[derive(Debug, Serialize)]
pub struct Engine {
    pub sessions: usize,
    pub queue_depth: usize,
    pub kv_bytes: usize,
    pub kv_budget_bytes: usize,
}

/// `tier="edge",exit="3"` (how [`crate::metrics::Metrics::tokens`] is keyed) as its parts.
fn parse_token_labels(labels: &str, count: u64) -> Option<TierTokens> {
    let (mut tier, mut exit) = (None, None);
    for kv in labels.split(',') {
        let (k, v) = kv.split_once('=')?;
        let v = v.trim_matches('"');
        match k {
            "tier" => tier = Some(v.to_string()),
            "exit" => exit = v.parse().ok(),
            _ => {}
        }
    }
    Some(TierTokens {
        tier: tier?,
        exit: exit?,
        count,
    })
}

/// The snapshot now (503 while the model loads).
pub async fn snapshot(api: &Api) -> ApiResult<Status> {
    let agent = api.agent()?;
    let cfg = agent.config();
    let exits = agent.model_config().exit_points();
    let me = Node {
        id: Some(cfg.node_id.clone()),
        role: Some(cfg.role.as_str()),
        seen: "self",
        health: "serving",
        layers: Some([cfg.stage.a, cfg.stage.b]),
        exits: if cfg.stage.exit {
            vec![cfg.stage.b]
        } else {
            Vec::new()
        },
        active: true,
    };
    let (views, mut links) = parent_links(&agent).await;
    let reported = agent
        .parents()
        .and_then(|ps| ps.active().upstream())
        .map(|u| u.links)
        .unwrap_or_default();
    links.extend(reported.iter().map(Link::reported));
    let m = agent.metrics();
    let tokens: Vec<TierTokens> = m
        .tokens
        .snapshot()
        .into_iter()
        .filter_map(|(l, n)| parse_token_labels(&l, n))
        .collect();
    let e = agent.engine_stats().await;
    Ok(Status {
        model: Model {
            name: api
                .served_names(&agent)
                .into_iter()
                .next()
                .unwrap_or_default(),
            layers: agent.model_config().num_layers,
            exits: exits.clone(),
        },
        nodes: topology::nodes(me, &views, &reported, &exits),
        links,
        counters: Counters {
            requests: m.requests.get(),
            request_errors: m.request_errors.get(),
            tokens: tokens.iter().map(|t| t.count).sum(),
            escalations: m.escalations.get(),
            degraded: m.degraded.get(),
            parent_timeouts: m.parent_timeouts.get(),
            tensor_bytes_up: m.bytes_up.get(),
            failovers: agent.parents().map_or(0, |p| p.failovers()),
            prompt_tokens: m.serving.prompt_tokens.get(),
            drafts_proposed: m.drafts_proposed.get(),
            drafts_accepted: m.drafts_accepted.get(),
        },
        tokens,
        requests: Requests {
            running: api.admission.running(),
            waiting: api.admission.waiting(),
        },
        engine: Engine {
            sessions: e.sessions,
            queue_depth: e.queue_depth,
            kv_bytes: e.kv_bytes,
            kv_budget_bytes: e.kv_budget_bytes,
        },
    })
}

/// What each parent's link tells: its `Hello`, health and live estimates.
async fn parent_links(agent: &Agent) -> (Vec<ParentView>, Vec<Link>) {
    let Some(ps) = agent.parents() else {
        return (Vec::new(), Vec::new());
    };
    let active = ps.active();
    let (mut views, mut links) = (Vec::new(), Vec::new());
    for l in ps.all() {
        let hello = l.hello().await;
        let is_active = Arc::ptr_eq(l, &active);
        let health = l.state().as_str();
        let est = l.estimate();
        let quic = l.stats().await.map(|s| Quic {
            rtt_ms: s.rtt.as_secs_f64() * 1e3,
            bytes_sent: s.bytes_sent,
            bytes_received: s.bytes_received,
            lost_packets: s.lost_packets,
        });
        links.push(Link {
            from: agent.config().node_id.clone(),
            reported: false,
            to: hello.as_ref().map(|h| h.node_id.clone()),
            addr: l.addr().to_string(),
            active: is_active,
            health,
            rtt_ms: est.rtt_ms,
            goodput_bps: est.goodput_bps,
            confidence: est.confidence,
            probes: l.probe_rounds(),
            quic,
        });
        views.push(ParentView {
            hello: hello.map(|h| (h.node_id, h.role, h.hosted)),
            health,
            active: is_active,
        });
    }
    (views, links)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_labels_parse_into_tier_and_exit() {
        assert_eq!(
            parse_token_labels("tier=\"edge\",exit=\"20\"", 7),
            Some(TierTokens {
                tier: "edge".into(),
                exit: 20,
                count: 7
            })
        );
        assert_eq!(parse_token_labels("tier=\"edge\"", 1), None);
        assert_eq!(parse_token_labels("tier=\"edge\",exit=\"x\"", 1), None);
        assert_eq!(parse_token_labels("garbage", 1), None);
    }
}
