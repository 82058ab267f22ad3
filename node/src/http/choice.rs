//! One choice of a request, driven to its end: tokens from the agent become UTF-8-safe
//! text, stop sequences are cut across token boundaries, and each token keeps the tier,
//! exit and log-probabilities of the node that produced it. Both the JSON and the SSE
//! responses are built from the [`Out`] events of every choice.

use flow_familial::tokenizer::DecodeStream;
use flow_protocol::{Role, TopLogprob};
use tokio::sync::mpsc;

use super::error::ApiError;
use super::stop::StopMatcher;
use crate::agent::{Agent, GenEvent, GenStats};

/// One started choice.
pub struct ChoiceSpec {
    /// Index in the response's `choices`.
    pub index: u32,
    /// The agent's event stream of this choice (from [`Agent::generate`]).
    pub events: mpsc::Receiver<GenEvent>,
    pub stops: Vec<String>,
}

/// A generated token as the response reports it.
#[derive(Debug, Clone)]
pub struct TokenInfo {
    pub id: u32,
    pub tier: Role,
    pub exit: u32,
    pub degraded: bool,
    pub logprob: f32,
    pub top: Vec<TopLogprob>,
}

/// Events of one choice, in order: `Token`*, then `Finish` or `Error`.
#[derive(Debug)]
pub enum Out {
    /// One token and the text it released (possibly empty: held back).
    Token {
        index: u32,
        text: String,
        token: TokenInfo,
    },
    /// The choice ended; `text` is what was still held back.
    Finish {
        index: u32,
        text: String,
        reason: &'static str,
        /// The agent's statistics; `None` when a stop sequence ended the choice early.
        stats: Option<GenStats>,
        completion_tokens: usize,
    },
    Error(ApiError),
}

/// Drive one choice, sending its events on `tx`. Returns when the choice ends or the
/// receiver is gone (the client left); dropping the agent's stream cancels generation.
pub async fn drive(agent: Agent, spec: ChoiceSpec, tx: mpsc::Sender<Out>) {
    let index = spec.index;
    let mut rx = spec.events;
    let mut decode = DecodeStream::new();
    let mut stop = StopMatcher::new(spec.stops);
    let mut produced = 0usize;
    while let Some(ev) = rx.recv().await {
        match ev {
            GenEvent::Token { token, degraded } => {
                produced += 1;
                let piece = match decode.step(agent.tokenizer(), token.id) {
                    Ok(p) => p.unwrap_or_default(),
                    Err(e) => {
                        let _ = tx
                            .send(Out::Error(ApiError::internal(format!("detokenizing: {e}"))))
                            .await;
                        return;
                    }
                };
                let released = stop.push(&piece);
                let info = TokenInfo {
                    id: token.id,
                    tier: token.tier,
                    exit: token.exit,
                    degraded,
                    logprob: token.logprob,
                    top: token.top_logprobs,
                };
                let out = Out::Token {
                    index,
                    text: released.text,
                    token: info,
                };
                if tx.send(out).await.is_err() {
                    return;
                }
                if released.stop.is_some() {
                    let _ = tx
                        .send(Out::Finish {
                            index,
                            text: String::new(),
                            reason: "stop",
                            stats: None,
                            completion_tokens: produced,
                        })
                        .await;
                    return;
                }
            }
            GenEvent::Done(stats) => {
                let mut text = stop.push(
                    &decode
                        .finish(agent.tokenizer())
                        .ok()
                        .flatten()
                        .unwrap_or_default(),
                );
                let reason = if text.stop.is_some() || stats.finish_reason == "stop" {
                    "stop"
                } else {
                    "length"
                };
                if text.stop.is_none() {
                    text.text.push_str(&stop.finish());
                }
                let _ = tx
                    .send(Out::Finish {
                        index,
                        text: text.text,
                        reason,
                        completion_tokens: produced,
                        stats: Some(stats),
                    })
                    .await;
                return;
            }
            GenEvent::Error(e) => {
                let _ = tx.send(Out::Error(ApiError::upstream(e))).await;
                return;
            }
        }
    }
    let _ = tx
        .send(Out::Error(ApiError::internal(
            "generation ended without a result",
        )))
        .await;
}

/// Run every choice concurrently; their events arrive interleaved on the returned channel.
pub fn spawn_all(agent: &Agent, specs: Vec<ChoiceSpec>) -> mpsc::Receiver<Out> {
    let (tx, rx) = mpsc::channel(64);
    for spec in specs {
        tokio::spawn(drive(agent.clone(), spec, tx.clone()));
    }
    rx
}
