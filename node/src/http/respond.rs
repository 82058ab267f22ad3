//! Responses in OpenAI's shapes, built from the choices' [`Out`] events: one JSON body, or
//! an SSE stream of chunks (`data: {...}` … `data: [DONE]`) with, when asked, a final
//! usage chunk (`choices: []`). Every token carries its tier and exit in the `aiflow`
//! extension; the serving metrics (TTFT, inter-token latency, e2e) are observed here, where
//! the client's view of time is.

use std::convert::Infallible;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;

use super::choice::{Out, TokenInfo};
use super::error::ApiError;
use crate::agent::{Agent, GenStats};

/// Which endpoint answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Chat,
    Completion,
}

/// Everything the response needs besides the events.
pub struct Plan {
    pub kind: Kind,
    pub model: String,
    pub choices: u32,
    /// Prompt tokens of the request (each prompt counted once, whatever `n`).
    pub prompt_tokens: usize,
    /// `Some(k)`: log-probabilities with `k` alternatives.
    pub logprobs: Option<u32>,
    pub include_usage: bool,
    /// Completions with `echo`: the prompt text of each choice, sent before it.
    pub echo: Vec<Option<String>>,
    /// When the request arrived (before admission) and how long it queued.
    pub arrival: Instant,
    pub queued: std::time::Duration,
    /// Admission slots; released when the response is complete.
    pub permit: OwnedSemaphorePermit,
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Per-request timing, observed into the node's serving metrics.
struct Clock {
    arrival: Instant,
    first: Option<Instant>,
    last: Vec<Option<Instant>>,
}

impl Clock {
    fn token(&mut self, agent: &Agent, index: u32) {
        let now = Instant::now();
        let s = &agent.metrics().serving;
        if self.first.is_none() {
            self.first = Some(now);
            s.ttft.observe((now - self.arrival).as_secs_f64());
        }
        if let Some(slot) = self.last.get_mut(index as usize) {
            if let Some(prev) = *slot {
                s.itl.observe((now - prev).as_secs_f64());
            }
            *slot = Some(now);
        }
    }
}

/// One finished (or in-progress) choice of a non-streamed response.
#[derive(Default)]
struct Acc {
    text: String,
    tokens: Vec<TokenInfo>,
    reason: Option<&'static str>,
    stats: Option<GenStats>,
    completion_tokens: usize,
}

fn token_str(agent: &Agent, id: u32) -> (String, Vec<u8>) {
    let b = agent.tokenizer().token_bytes(id);
    (String::from_utf8_lossy(&b).into_owned(), b)
}

/// Chat's `logprobs` object for `tokens`.
fn chat_logprobs(agent: &Agent, tokens: &[TokenInfo]) -> Value {
    let content: Vec<Value> = tokens
        .iter()
        .map(|t| {
            let (s, b) = token_str(agent, t.id);
            let top: Vec<Value> = t
                .top
                .iter()
                .map(|a| {
                    let (s, b) = token_str(agent, a.id);
                    json!({"token": s, "logprob": a.logprob, "bytes": b})
                })
                .collect();
            json!({"token": s, "logprob": t.logprob, "bytes": b, "top_logprobs": top})
        })
        .collect();
    json!({ "content": content })
}

/// Completions' `logprobs` object for `tokens`, offsets counted from `offset` (bytes).
fn completion_logprobs(agent: &Agent, tokens: &[TokenInfo], mut offset: usize) -> Value {
    let (mut strs, mut lps, mut tops, mut offs) = (vec![], vec![], vec![], vec![]);
    for t in tokens {
        let (s, _) = token_str(agent, t.id);
        offs.push(offset);
        offset += s.len();
        strs.push(s);
        lps.push(t.logprob);
        let top: serde_json::Map<String, Value> = t
            .top
            .iter()
            .map(|a| (token_str(agent, a.id).0, json!(a.logprob)))
            .collect();
        tops.push(Value::Object(top));
    }
    json!({"tokens": strs, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offs})
}

/// `aiflow` statistics of a choice ended by a stop sequence (the agent's were not awaited).
fn stats_from(tokens: &[TokenInfo], prompt_tokens: usize) -> GenStats {
    let mut s = GenStats {
        prompt_tokens,
        completion_tokens: tokens.len(),
        finish_reason: "stop".into(),
        ..GenStats::default()
    };
    for t in tokens {
        *s.tokens_per_exit
            .entry(format!("{}:{}", t.tier, t.exit))
            .or_default() += 1;
        s.degraded_tokens += usize::from(t.degraded);
    }
    s
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

fn record_end(agent: &Agent, plan: &Plan, completion: usize, reasons: &[&'static str]) {
    let s = &agent.metrics().serving;
    s.e2e.observe(plan.arrival.elapsed().as_secs_f64());
    s.queue.observe(plan.queued.as_secs_f64());
    s.prompt_tokens.add(plan.prompt_tokens as u64);
    s.generation_tokens.add(completion as u64);
    s.request_prompt_tokens.observe(plan.prompt_tokens as f64);
    s.request_generation_tokens.observe(completion as f64);
    for r in reasons {
        s.success.add(format!("finished_reason=\"{r}\""), 1);
    }
}

/// Wait for every choice and answer with one JSON body.
pub async fn json(agent: &Agent, plan: Plan, mut rx: mpsc::Receiver<Out>) -> Response {
    let mut acc: Vec<Acc> = (0..plan.choices).map(|_| Acc::default()).collect();
    let mut clock = Clock {
        arrival: plan.arrival,
        first: None,
        last: vec![None; plan.choices as usize],
    };
    let mut open = plan.choices;
    while open > 0 {
        let Some(ev) = rx.recv().await else {
            return ApiError::internal("a choice ended without a result").into_response();
        };
        match ev {
            Out::Token { index, text, token } => {
                clock.token(agent, index);
                if let Some(a) = acc.get_mut(index as usize) {
                    a.text.push_str(&text);
                    a.tokens.push(token);
                }
            }
            Out::Finish {
                index,
                text,
                reason,
                stats,
                completion_tokens,
            } => {
                open -= 1;
                if let Some(a) = acc.get_mut(index as usize) {
                    a.text.push_str(&text);
                    a.reason = Some(reason);
                    a.stats = stats;
                    a.completion_tokens = completion_tokens;
                }
            }
            Out::Error(e) => {
                agent.metrics().serving.failed.inc();
                return e.into_response();
            }
        }
    }
    let completion: usize = acc.iter().map(|a| a.completion_tokens).sum();
    let reasons: Vec<&'static str> = acc.iter().map(|a| a.reason.unwrap_or("length")).collect();
    record_end(agent, &plan, completion, &reasons);
    let mut first_stats = None;
    let choices: Vec<Value> = acc
        .into_iter()
        .enumerate()
        .map(|(i, a)| {
            let stats = a
                .stats
                .unwrap_or_else(|| stats_from(&a.tokens, plan.prompt_tokens));
            let ext = serde_json::to_value(&stats).unwrap_or(Value::Null);
            first_stats.get_or_insert_with(|| ext.clone());
            let reason = a.reason.unwrap_or("length");
            match plan.kind {
                Kind::Chat => {
                    let lp = plan.logprobs.map(|_| chat_logprobs(agent, &a.tokens));
                    json!({"index": i, "message": {"role": "assistant", "content": a.text},
                        "finish_reason": reason, "logprobs": lp, "aiflow": ext})
                }
                Kind::Completion => {
                    let echo = plan.echo.get(i).cloned().flatten().unwrap_or_default();
                    let lp = plan
                        .logprobs
                        .map(|_| completion_logprobs(agent, &a.tokens, echo.len()));
                    json!({"index": i, "text": format!("{echo}{}", a.text),
                        "finish_reason": reason, "logprobs": lp, "aiflow": ext})
                }
            }
        })
        .collect();
    let (id, object) = ids(plan.kind);
    Json(json!({
        "id": id, "object": object, "created": now_unix(), "model": plan.model,
        "choices": choices, "usage": usage(plan.prompt_tokens, completion),
        "aiflow": first_stats.unwrap_or(Value::Null),
    }))
    .into_response()
}

fn ids(kind: Kind) -> (String, &'static str) {
    match kind {
        Kind::Chat => (
            format!("chatcmpl-{:016x}", rand::random::<u64>()),
            "chat.completion",
        ),
        Kind::Completion => (
            format!("cmpl-{:016x}", rand::random::<u64>()),
            "text_completion",
        ),
    }
}

/// Answer with an SSE stream of chunks as the choices produce tokens.
pub fn sse(agent: &Agent, plan: Plan, rx: mpsc::Receiver<Out>) -> Response {
    let (tx, srx) = mpsc::channel::<Result<Event, Infallible>>(64);
    tokio::spawn(stream(agent.clone(), plan, rx, tx));
    Sse::new(ReceiverStream::new(srx))
        .keep_alive(KeepAlive::default())
        .into_response()
}

async fn stream(
    agent: Agent,
    plan: Plan,
    mut rx: mpsc::Receiver<Out>,
    tx: mpsc::Sender<Result<Event, Infallible>>,
) {
    let (id, _) = ids(plan.kind);
    let object = match plan.kind {
        Kind::Chat => "chat.completion.chunk",
        Kind::Completion => "text_completion",
    };
    let created = now_unix();
    let chunk = |choices: Value, extra: Option<(&str, Value)>| {
        let mut c = json!({"id": id, "object": object, "created": created, "model": plan.model,
            "choices": choices});
        if plan.include_usage {
            c["usage"] = Value::Null;
        }
        if let Some((k, v)) = extra {
            c[k] = v;
        }
        c.to_string()
    };
    // The per-token chunk without log-probabilities, the hot path, written directly.
    let js = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into());
    let head = format!(
        "{{\"id\":{},\"object\":\"{object}\",\"created\":{created},\"model\":{}",
        js(&id),
        js(&plan.model)
    );
    let usage_null = if plan.include_usage {
        ",\"usage\":null"
    } else {
        ""
    };
    let field = match plan.kind {
        Kind::Chat => "\"delta\":{\"content\":",
        Kind::Completion => "\"text\":",
    };
    let close = match plan.kind {
        Kind::Chat => "}",
        Kind::Completion => "",
    };
    let send = |v: String| {
        let tx = tx.clone();
        async move { tx.send(Ok(Event::default().data(v))).await.is_ok() }
    };
    // Opening chunks: the assistant role (chat) or the echoed prompt (completions).
    let mut offsets = vec![0usize; plan.choices as usize];
    for i in 0..plan.choices {
        let opening = match plan.kind {
            Kind::Chat => Some(
                json!([{"index": i, "delta": {"role": "assistant", "content": ""},
                "logprobs": null, "finish_reason": null}]),
            ),
            Kind::Completion => plan.echo.get(i as usize).cloned().flatten().map(|e| {
                offsets[i as usize] = e.len();
                json!([{"index": i, "text": e, "logprobs": null, "finish_reason": null}])
            }),
        };
        if let Some(c) = opening {
            if !send(chunk(c, None)).await {
                return;
            }
        }
    }
    let mut clock = Clock {
        arrival: plan.arrival,
        first: None,
        last: vec![None; plan.choices as usize],
    };
    let (mut open, mut completion) = (plan.choices, 0usize);
    let mut reasons = Vec::new();
    while open > 0 {
        let Some(ev) = rx.recv().await else { break };
        let c = match ev {
            Out::Token { index, text, token } => {
                clock.token(&agent, index);
                if plan.logprobs.is_none() {
                    let c = format!(
                        "{head},\"choices\":[{{\"index\":{index},{field}{}{close},\"logprobs\":null,\"finish_reason\":null}}]{usage_null},\"aiflow\":{{\"tier\":\"{}\",\"exit\":{},\"degraded\":{}}}}}",
                        js(&text),
                        token.tier.as_str(),
                        token.exit,
                        token.degraded
                    );
                    if !send(c).await {
                        return;
                    }
                    continue;
                }
                let ext = json!({"tier": token.tier.as_str(), "exit": token.exit, "degraded": token.degraded});
                let one = std::slice::from_ref(&token);
                let choice = match plan.kind {
                    Kind::Chat => {
                        let lp = plan.logprobs.map(|_| chat_logprobs(&agent, one));
                        json!([{"index": index, "delta": {"content": text}, "logprobs": lp, "finish_reason": null}])
                    }
                    Kind::Completion => {
                        let off = offsets.get(index as usize).copied().unwrap_or(0);
                        let lp = plan.logprobs.map(|_| completion_logprobs(&agent, one, off));
                        if let Some(o) = offsets.get_mut(index as usize) {
                            *o += token_str(&agent, token.id).0.len();
                        }
                        json!([{"index": index, "text": text, "logprobs": lp, "finish_reason": null}])
                    }
                };
                chunk(choice, Some(("aiflow", ext)))
            }
            Out::Finish {
                index,
                text,
                reason,
                stats,
                completion_tokens,
            } => {
                open -= 1;
                completion += completion_tokens;
                reasons.push(reason);
                let ext = stats
                    .map(|s| serde_json::to_value(&s).unwrap_or(Value::Null))
                    .unwrap_or(Value::Null);
                let choice = match plan.kind {
                    Kind::Chat => {
                        let delta = if text.is_empty() {
                            json!({})
                        } else {
                            json!({ "content": text })
                        };
                        json!([{"index": index, "delta": delta, "logprobs": null, "finish_reason": reason}])
                    }
                    Kind::Completion => {
                        json!([{"index": index, "text": text, "logprobs": null, "finish_reason": reason}])
                    }
                };
                chunk(choice, Some(("aiflow", ext)))
            }
            Out::Error(e) => {
                agent.metrics().serving.failed.inc();
                let _ = send(e.body().to_string()).await;
                let _ = tx.send(Ok(Event::default().data("[DONE]"))).await;
                return;
            }
        };
        if !send(c).await {
            return;
        }
    }
    record_end(&agent, &plan, completion, &reasons);
    if plan.include_usage {
        let mut u = json!({"id": id, "object": object, "created": created, "model": plan.model,
            "choices": []});
        u["usage"] = usage(plan.prompt_tokens, completion);
        if !send(u.to_string()).await {
            return;
        }
    }
    let _ = tx.send(Ok(Event::default().data("[DONE]"))).await;
    drop(plan.permit);
}
