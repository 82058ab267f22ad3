//! The entry path: client requests at the entry node ([`Agent::generate`] and the calls
//! built on it), each run as an entry session on its own task.

use std::sync::atomic::{AtomicU64, Ordering};

use flow_familial::ModelConfig;
use flow_protocol::{InferMode, Policy, Sampling, TokenOut};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::Agent;
use crate::engine::Stage;
use crate::error::{NodeError, Result};
use crate::session::{EntryRequest, Event, Session};

/// An OpenAI-style generation request at the entry node.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt: Vec<u32>,
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    /// `None` = the node's default policy.
    pub policy: Option<Policy>,
    pub stop_tokens: Vec<u32>,
}

/// What a generation stream yields.
#[derive(Debug, Clone)]
pub enum GenEvent {
    Token { token: TokenOut, degraded: bool },
    Done(GenStats),
    Error(String),
}

/// Per-request statistics (the `aiflow` extension of API responses).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct GenStats {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// `tier:exit` → tokens.
    pub tokens_per_exit: std::collections::BTreeMap<String, usize>,
    pub bytes_up: u64,
    pub hops: u32,
    pub degraded_tokens: usize,
    /// Times the request moved to another parent after losing one.
    pub failovers: u32,
    /// Layer where the entry node's part of this request ended (the cut it ran with).
    pub cut: usize,
    pub drafts_proposed: usize,
    pub drafts_accepted: usize,
    pub ttft_ms: f64,
    pub total_ms: f64,
    pub finish_reason: String,
}

impl Agent {
    /// Start generating; events stream on the returned bounded channel. The request runs on
    /// its own task; dropping the receiver cancels it.
    pub async fn generate(&self, req: GenerateRequest) -> Result<mpsc::Receiver<GenEvent>> {
        if self.inner.cfg.stage.a != 0 {
            return Err(NodeError::BadRequest(format!(
                "this node starts at layer {}; send requests to the entry (device) node",
                self.inner.cfg.stage.a
            )));
        }
        if req.prompt.is_empty() {
            return Err(NodeError::BadRequest("the prompt is empty".into()));
        }
        let max_pos = self.inner.model_cfg.max_position_embeddings;
        if req.prompt.len() + req.max_new_tokens > max_pos {
            return Err(NodeError::BadRequest(format!(
                "prompt ({}) + max_tokens ({}) exceeds the model's context of {max_pos} positions",
                req.prompt.len(),
                req.max_new_tokens
            )));
        }
        // A request without a policy takes the plan in force when it starts, and keeps it;
        // every request runs at the plan's cut in force when it starts (its KV here and
        // above holds exactly those layers).
        let applied = self.applied_plan();
        let stage = self
            .session_stage(applied.as_ref().and_then(|a| a.cut))
            .unwrap_or(self.inner.cfg.stage);
        let policy = match req.policy.clone() {
            Some(p) => p,
            None => applied
                .map(|a| a.policy)
                .unwrap_or_else(|| self.inner.cfg.default_policy.clone()),
        };
        check_policy(&self.inner.model_cfg, &policy)?;
        let guard = self.enter()?;
        let (tx, rx) = mpsc::channel(64);
        let me = self.clone();
        self.inner.metrics.requests.inc();
        tokio::spawn(async move {
            let _guard = guard;
            let t0 = Instant::now();
            let res = me.run_request(req, policy, stage, &tx, t0).await;
            match res {
                Ok(stats) => {
                    me.inner
                        .metrics
                        .request_latency
                        .observe(t0.elapsed().as_secs_f64());
                    let _ = tx.send(GenEvent::Done(stats)).await;
                }
                Err(e) => {
                    me.inner.metrics.request_errors.inc();
                    let _ = tx.send(GenEvent::Error(e.to_string())).await;
                }
            }
        });
        Ok(rx)
    }

    /// Classification / scoring: one forward pass through the same tiers (no generation).
    /// Returns the predicted next token with the tier, exit and confidence that produced it.
    pub async fn classify(&self, prompt: Vec<u32>, policy: Option<Policy>) -> Result<TokenOut> {
        let (toks, _) = self
            .generate_collect(GenerateRequest {
                prompt,
                max_new_tokens: 1,
                sampling: Sampling::default(),
                policy,
                stop_tokens: vec![],
            })
            .await?;
        toks.into_iter()
            .next()
            .ok_or_else(|| NodeError::Internal("classification produced no token".into()))
    }

    /// Generate and collect everything (tests, the demo, the embedded API).
    pub async fn generate_collect(
        &self,
        req: GenerateRequest,
    ) -> Result<(Vec<TokenOut>, GenStats)> {
        let mut rx = self.generate(req).await?;
        let mut toks = Vec::new();
        while let Some(ev) = rx.recv().await {
            match ev {
                GenEvent::Token { token, .. } => toks.push(token),
                GenEvent::Done(s) => return Ok((toks, s)),
                GenEvent::Error(e) => return Err(NodeError::Unavailable(e)),
            }
        }
        Err(NodeError::Internal(
            "generation ended without a result".into(),
        ))
    }

    fn record(&self, stats: &mut GenStats, t: &TokenOut, degraded: bool, t0: Instant) {
        if stats.completion_tokens == 0 {
            stats.ttft_ms = t0.elapsed().as_secs_f64() * 1e3;
            self.inner.metrics.ttft.observe(stats.ttft_ms / 1e3);
        }
        stats.completion_tokens += 1;
        *stats
            .tokens_per_exit
            .entry(format!("{}:{}", t.tier, t.exit))
            .or_default() += 1;
        if degraded {
            stats.degraded_tokens += 1;
        }
        self.inner
            .metrics
            .tokens
            .add(format!("tier=\"{}\",exit=\"{}\"", t.tier, t.exit), 1);
    }

    /// One client request at this (entry) node, stepwise or speculative.
    async fn run_request(
        &self,
        req: GenerateRequest,
        policy: Policy,
        stage: Stage,
        tx: &mpsc::Sender<GenEvent>,
        t0: Instant,
    ) -> Result<GenStats> {
        let mut stats = GenStats {
            prompt_tokens: req.prompt.len(),
            finish_reason: "length".into(),
            cut: stage.b,
            ..GenStats::default()
        };
        let mut stop = req.stop_tokens.clone();
        stop.extend(self.inner.model_cfg.eos_token_ids.iter().copied());
        let cfg = self.session_config(tier_request_id(), policy, req.sampling.clone(), stage);
        let entry = EntryRequest {
            prompt: req.prompt,
            max_new_tokens: req.max_new_tokens,
            stop,
        };
        let mut d = self.driver(Session::entry(cfg, entry, t0));
        let result = async {
            loop {
                match d.next().await? {
                    Event::Token { token, degraded } => {
                        self.record(&mut stats, &token, degraded, t0);
                        if tx.send(GenEvent::Token { token, degraded }).await.is_err() {
                            stats.finish_reason = "cancelled".into();
                            return Ok(());
                        }
                    }
                    Event::Done(reason) => {
                        stats.finish_reason = reason.into();
                        return Ok(());
                    }
                    Event::Reply(m) => {
                        return Err(NodeError::Internal(format!(
                            "an entry session answered a child ({})",
                            m.name()
                        )))
                    }
                }
            }
        }
        .await;
        let s = d.session().stats();
        stats.bytes_up = s.bytes_up;
        stats.hops = s.hops;
        stats.failovers = s.failovers;
        stats.drafts_proposed = s.drafts_proposed;
        stats.drafts_accepted = s.drafts_accepted;
        let m = &self.inner.metrics;
        m.drafts_proposed.add(s.drafts_proposed as u64);
        m.drafts_accepted.add(s.drafts_accepted as u64);
        stats.total_ms = t0.elapsed().as_secs_f64() * 1e3;
        d.close().await;
        result.map(|_| stats)
    }
}

/// Refuse a policy this family cannot serve: an unknown answer exit, a draft length out of
/// range.
fn check_policy(mc: &ModelConfig, p: &Policy) -> Result<()> {
    if let Some(e) = p.answer_exit {
        if mc.exit_index(e as usize).is_err() {
            return Err(NodeError::BadRequest(format!(
                "exit {e} is not an exit of this family (exits: {:?})",
                mc.exit_points()
            )));
        }
    }
    if p.mode == InferMode::Speculate && !(1..=16).contains(&p.draft_len) {
        return Err(NodeError::BadRequest(format!(
            "draft_len {} must be in 1..=16",
            p.draft_len
        )));
    }
    Ok(())
}

fn tier_request_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

impl GenerateRequest {
    /// Greedy generation of up to `max_new_tokens` with the node's default policy.
    pub fn greedy(prompt: Vec<u32>, max_new_tokens: usize) -> Self {
        Self {
            prompt,
            max_new_tokens,
            sampling: Sampling::default(),
            policy: None,
            stop_tokens: vec![],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::load::tests::family;

    #[test]
    fn policies_name_exits_of_the_family_and_sane_draft_lengths() {
        let mc = family();
        let last = *mc.exit_points().last().unwrap();
        let ok = Policy {
            answer_exit: Some(last as u32),
            ..Policy::default()
        };
        check_policy(&mc, &ok).unwrap();
        let unknown = Policy {
            answer_exit: Some(last as u32 + 7),
            ..Policy::default()
        };
        let e = check_policy(&mc, &unknown).unwrap_err().to_string();
        assert!(e.contains("not an exit of this family"), "{e}");
        for (len, good) in [(0, false), (1, true), (16, true), (17, false)] {
            let p = Policy {
                mode: InferMode::Speculate,
                draft_len: len,
                ..Policy::default()
            };
            assert_eq!(check_policy(&mc, &p).is_ok(), good, "draft_len {len}");
        }
    }

    #[test]
    fn greedy_requests_take_the_node_defaults() {
        let r = GenerateRequest::greedy(vec![1, 2, 3], 4);
        assert_eq!((r.prompt.len(), r.max_new_tokens), (3, 4));
        assert!(r.policy.is_none() && r.stop_tokens.is_empty());
    }
}
