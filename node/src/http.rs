//! OpenAI-compatible HTTP API on the entry node (axum): `/v1/models`, `/v1/completions`,
//! `/v1/chat/completions` (with SSE streaming), `/health` (and `/healthz`), `/metrics`.
//!
//! Every response carries an `aiflow` object: tokens per tier and exit, bytes shipped,
//! hops, degraded tokens, drafts. Requests may carry an `aiflow` object too, choosing the
//! inference mode per request: `{"mode": "escalate", "exit": 3, "threshold": 0.8,
//! "draft_len": 4}`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use flow_protocol::{ExitThreshold, InferMode, Policy, Sampling};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::agent::{Agent, GenEvent, GenStats, GenerateRequest};

/// The per-request `aiflow` extension.
#[derive(Debug, Default, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct AiflowOptions {
    /// `route`, `escalate`, `speculate` or `local`.
    pub mode: Option<String>,
    /// Exit that answers in `route` mode.
    pub exit: Option<u32>,
    /// Confidence threshold for every exit in `escalate` mode.
    pub threshold: Option<f32>,
    /// Draft length in `speculate` mode.
    pub draft_len: Option<u32>,
}

#[derive(Debug, Deserialize)]
struct CompletionRequest {
    #[serde(default)]
    model: Option<String>,
    prompt: Value,
    #[serde(default)]
    max_tokens: Option<usize>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stop: Option<Value>,
    #[serde(default)]
    aiflow: Option<AiflowOptions>,
}

#[derive(Debug, Deserialize)]
struct ChatMessage {
    role: String,
    content: Value,
}

#[derive(Debug, Deserialize)]
struct ChatRequest {
    #[serde(default)]
    model: Option<String>,
    messages: Vec<ChatMessage>,
    #[serde(default)]
    max_tokens: Option<usize>,
    #[serde(default)]
    max_completion_tokens: Option<usize>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stop: Option<Value>,
    #[serde(default)]
    aiflow: Option<AiflowOptions>,
}

/// Serve the API on `addr` until the task is dropped. Returns the bound address.
pub async fn serve(
    agent: Agent,
    addr: SocketAddr,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let app = router(agent);
    let h = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "HTTP server stopped");
        }
    });
    Ok((local, h))
}

/// The axum router of the API.
pub fn router(agent: Agent) -> Router {
    Router::new()
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat))
        .route("/health", get(|| async { "ok\n" }))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .with_state(agent)
}

fn model_name(agent: &Agent) -> String {
    let path = &agent.config().model_dir;
    // A pulled model lives at `<cache>/<name>/model.gguf`: its name is the directory's.
    let path = match (path.file_name(), path.parent()) {
        (Some(f), Some(parent)) if f == "model.gguf" => parent,
        _ => path.as_path(),
    };
    let name = if path.is_file() {
        path.file_stem()
    } else {
        path.file_name()
    };
    name.map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "aiflow".into())
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn error(status: StatusCode, msg: impl Into<String>, kind: &str) -> Response {
    (
        status,
        Json(json!({"error": {"message": msg.into(), "type": kind, "param": null, "code": null}})),
    )
        .into_response()
}

async fn models(State(agent): State<Agent>) -> Json<Value> {
    let cfg = agent.model_config();
    Json(json!({
        "object": "list",
        "data": [{
            "id": model_name(&agent),
            "object": "model",
            "created": 0,
            "owned_by": "aiflow",
            "aiflow": {"exits": cfg.exit_points(), "layout": cfg.layout.model_type(), "role": agent.config().role.as_str()}
        }]
    }))
}

/// MoE expert pruning metrics (name, help), in the order of `metrics`' values.
const MOE_METRICS: [(&str, &str); 7] = [
    (
        "aiflow_moe_resident_experts",
        "MoE experts resident (expert pruning).",
    ),
    (
        "aiflow_moe_resident_expert_bytes",
        "Bytes of the resident MoE experts.",
    ),
    (
        "aiflow_moe_all_expert_bytes",
        "Bytes of every hosted expert (unpruned).",
    ),
    (
        "aiflow_moe_expert_loads",
        "Experts paged in from the checkpoint.",
    ),
    (
        "aiflow_moe_expert_evictions",
        "Experts evicted under the expert budget.",
    ),
    (
        "aiflow_moe_retrievals",
        "Sessions given a task pattern by retrieval.",
    ),
    (
        "aiflow_moe_fallbacks",
        "Sessions given the last pattern (no prompt).",
    ),
];

async fn metrics(State(agent): State<Agent>) -> Response {
    let s = agent.engine_stats().await;
    let mut rows = vec![
        (
            "aiflow_engine_sessions",
            "Sessions holding KV on this node.",
            s.sessions as f64,
        ),
        (
            "aiflow_engine_kv_bytes",
            "KV cache bytes reserved on this node.",
            s.kv_bytes as f64,
        ),
        (
            "aiflow_engine_queue_depth",
            "Engine queue depth.",
            s.queue_depth as f64,
        ),
        (
            "aiflow_engine_evictions",
            "Sessions evicted under the KV budget.",
            s.evictions as f64,
        ),
    ];
    if let Some(m) = &s.moe {
        let values = [
            m.experts.resident as f64,
            m.experts.resident_bytes as f64,
            m.all_expert_bytes as f64,
            m.experts.loads as f64,
            m.experts.evictions as f64,
            m.retrievals as f64,
            m.fallbacks as f64,
        ];
        rows.extend(MOE_METRICS.iter().zip(values).map(|(&(n, h), v)| (n, h, v)));
    }
    let mut text = agent.metrics().render(&rows);
    text.push_str(&agent.planning_metrics());
    ([("content-type", "text/plain; version=0.0.4")], text).into_response()
}

fn policy_of(agent: &Agent, o: &Option<AiflowOptions>) -> Result<Option<Policy>, String> {
    let Some(o) = o else { return Ok(None) };
    let mut p = agent.config().default_policy.clone();
    if let Some(m) = &o.mode {
        p.mode = m.parse::<InferMode>().map_err(|e| e.to_string())?;
    }
    if let Some(e) = o.exit {
        p.answer_exit = Some(e);
        if o.mode.is_none() {
            p.mode = InferMode::Route;
        }
    }
    if let Some(t) = o.threshold {
        if !t.is_finite() {
            return Err("aiflow.threshold must be a finite number".into());
        }
        p.thresholds = agent
            .model_config()
            .exit_points()
            .into_iter()
            .map(|e| ExitThreshold {
                exit: e as u32,
                threshold: t,
            })
            .collect();
    }
    if let Some(d) = o.draft_len {
        p.draft_len = d;
    }
    Ok(Some(p))
}

fn stop_tokens(agent: &Agent, stop: &Option<Value>) -> Vec<u32> {
    let mut out = Vec::new();
    let strs: Vec<String> = match stop {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect(),
        _ => vec![],
    };
    for s in strs {
        if let Ok(ids) = agent.tokenizer().encode(&s) {
            if ids.len() == 1 {
                out.push(ids[0]);
            }
        }
    }
    out
}

struct Prepared {
    req: GenerateRequest,
    stream: bool,
}

#[allow(clippy::too_many_arguments)]
fn prepare(
    agent: &Agent,
    prompt: &str,
    max_tokens: Option<usize>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    seed: Option<u64>,
    stream: Option<bool>,
    stop: &Option<Value>,
    aiflow: &Option<AiflowOptions>,
) -> Result<Prepared, Box<Response>> {
    let prompt = agent.encode_prompt(prompt).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            e.to_string(),
            "invalid_request_error",
        )
    })?;
    let policy = policy_of(agent, aiflow)
        .map_err(|e| error(StatusCode::BAD_REQUEST, e, "invalid_request_error"))?;
    let temperature = temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(Box::new(error(
            StatusCode::BAD_REQUEST,
            "temperature must be in [0, 2]",
            "invalid_request_error",
        )));
    }
    Ok(Prepared {
        req: GenerateRequest {
            prompt,
            max_new_tokens: max_tokens.unwrap_or(16),
            sampling: Sampling {
                temperature,
                top_p: top_p.unwrap_or(1.0),
                top_k: 0,
                seed: seed.unwrap_or(0),
                max_new_tokens: max_tokens.unwrap_or(16) as u32,
                stop_tokens: vec![],
            },
            policy,
            stop_tokens: stop_tokens(agent, stop),
        },
        stream: stream.unwrap_or(false),
    })
}

fn aiflow_json(s: &GenStats) -> Value {
    serde_json::to_value(s).unwrap_or(Value::Null)
}

/// Incremental detokenisation that never splits a UTF-8 character.
struct TextStream {
    ids: Vec<u32>,
    sent: usize,
}

impl TextStream {
    fn push(&mut self, agent: &Agent, id: u32) -> String {
        self.ids.push(id);
        let text = agent.tokenizer().decode(&self.ids).unwrap_or_default();
        if text.ends_with('\u{FFFD}') || text.len() < self.sent {
            return String::new();
        }
        let out = text[self.sent..].to_string();
        self.sent = text.len();
        out
    }
}

async fn run(agent: &Agent, p: Prepared, chat: bool) -> Response {
    let id = format!(
        "{}-{}",
        if chat { "chatcmpl" } else { "cmpl" },
        rand::random::<u64>()
    );
    let model = model_name(agent);
    let prompt_tokens = p.req.prompt.len();
    let mut rx = match agent.generate(p.req).await {
        Ok(rx) => rx,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                e.to_string(),
                "invalid_request_error",
            )
        }
    };
    if p.stream {
        let (tx, srx) = mpsc::channel::<Result<Event, Infallible>>(64);
        let agent = agent.clone();
        tokio::spawn(async move {
            let created = now();
            let mut text = TextStream {
                ids: vec![],
                sent: 0,
            };
            if chat {
                let first = json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}]});
                let _ = tx.send(Ok(Event::default().data(first.to_string()))).await;
            }
            while let Some(ev) = rx.recv().await {
                let chunk = match ev {
                    GenEvent::Token { token, degraded } => {
                        let piece = text.push(&agent, token.id);
                        let ext = json!({"tier": token.tier.as_str(), "exit": token.exit, "degraded": degraded});
                        if chat {
                            json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                                "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": null}], "aiflow": ext})
                        } else {
                            json!({"id": id, "object": "text_completion", "created": created, "model": model,
                                "choices": [{"index": 0, "text": piece, "logprobs": null, "finish_reason": null}], "aiflow": ext})
                        }
                    }
                    GenEvent::Done(stats) => {
                        let usage = json!({"prompt_tokens": prompt_tokens, "completion_tokens": stats.completion_tokens,
                            "total_tokens": prompt_tokens + stats.completion_tokens});
                        let fin = json!(if stats.finish_reason == "stop" {
                            "stop"
                        } else {
                            "length"
                        });
                        if chat {
                            json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                                "choices": [{"index": 0, "delta": {}, "finish_reason": fin}], "usage": usage, "aiflow": aiflow_json(&stats)})
                        } else {
                            json!({"id": id, "object": "text_completion", "created": created, "model": model,
                                "choices": [{"index": 0, "text": "", "logprobs": null, "finish_reason": fin}], "usage": usage, "aiflow": aiflow_json(&stats)})
                        }
                    }
                    GenEvent::Error(e) => json!({"error": {"message": e, "type": "server_error"}}),
                };
                if tx
                    .send(Ok(Event::default().data(chunk.to_string())))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            let _ = tx.send(Ok(Event::default().data("[DONE]"))).await;
        });
        return Sse::new(ReceiverStream::new(srx))
            .keep_alive(KeepAlive::default())
            .into_response();
    }
    let mut ids = Vec::new();
    let mut stats = None;
    while let Some(ev) = rx.recv().await {
        match ev {
            GenEvent::Token { token, .. } => ids.push(token.id),
            GenEvent::Done(s) => {
                stats = Some(s);
                break;
            }
            GenEvent::Error(e) => return error(StatusCode::BAD_GATEWAY, e, "server_error"),
        }
    }
    let Some(stats) = stats else {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "generation ended early",
            "server_error",
        );
    };
    let text = agent.tokenizer().decode(&ids).unwrap_or_default();
    let usage = json!({"prompt_tokens": prompt_tokens, "completion_tokens": stats.completion_tokens,
        "total_tokens": prompt_tokens + stats.completion_tokens});
    let fin = if stats.finish_reason == "stop" {
        "stop"
    } else {
        "length"
    };
    let body = if chat {
        json!({"id": id, "object": "chat.completion", "created": now(), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": fin, "logprobs": null}],
            "usage": usage, "aiflow": aiflow_json(&stats)})
    } else {
        json!({"id": id, "object": "text_completion", "created": now(), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": fin}],
            "usage": usage, "aiflow": aiflow_json(&stats)})
    };
    Json(body).into_response()
}

async fn completions(State(agent): State<Agent>, body: axum::body::Bytes) -> Response {
    let r: CompletionRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("invalid request body: {e}"),
                "invalid_request_error",
            )
        }
    };
    let _ = &r.model;
    let prompt = match &r.prompt {
        Value::String(s) => s.clone(),
        Value::Array(a) if a.len() == 1 && a[0].is_string() => {
            a[0].as_str().unwrap_or_default().to_string()
        }
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "prompt must be a string (batches of prompts: send one request each)",
                "invalid_request_error",
            )
        }
    };
    match prepare(
        &agent,
        &prompt,
        r.max_tokens,
        r.temperature,
        r.top_p,
        r.seed,
        r.stream,
        &r.stop,
        &r.aiflow,
    ) {
        Ok(p) => run(&agent, p, false).await,
        Err(resp) => *resp,
    }
}

/// The chat template of the built-in byte-level families: `<|q|>user<|a|>assistant<|eos|>`.
pub fn chat_prompt(messages: &[(String, String)]) -> String {
    let mut s = String::new();
    for (role, content) in messages {
        match role.as_str() {
            "system" | "developer" => {
                s.push_str(content);
                s.push('\n');
            }
            "assistant" => {
                s.push_str("<|a|>");
                s.push_str(content);
                s.push_str("<|eos|>");
            }
            _ => {
                s.push_str("<|q|>");
                s.push_str(content);
            }
        }
    }
    s.push_str("<|a|>");
    s
}

async fn chat(State(agent): State<Agent>, body: axum::body::Bytes) -> Response {
    let r: ChatRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("invalid request body: {e}"),
                "invalid_request_error",
            )
        }
    };
    let _ = &r.model;
    if r.messages.is_empty() {
        return error(
            StatusCode::BAD_REQUEST,
            "messages must not be empty",
            "invalid_request_error",
        );
    }
    let mut msgs = Vec::new();
    for m in &r.messages {
        let content = match &m.content {
            Value::String(s) => s.clone(),
            Value::Array(parts) => parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join(""),
            _ => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "message content must be a string or text parts",
                    "invalid_request_error",
                )
            }
        };
        msgs.push((m.role.clone(), content));
    }
    let prompt = match agent.chat_template() {
        Some(t) => {
            let msgs: Vec<flow_familial::chat::ChatMessage> = msgs
                .into_iter()
                .map(|(role, content)| flow_familial::chat::ChatMessage { role, content })
                .collect();
            match t.render(&msgs, true) {
                Ok(p) => p,
                Err(e) => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        format!("the model's chat template rejected the messages: {e}"),
                        "invalid_request_error",
                    )
                }
            }
        }
        None => chat_prompt(&msgs),
    };
    match prepare(
        &agent,
        &prompt,
        r.max_completion_tokens.or(r.max_tokens),
        r.temperature,
        r.top_p,
        r.seed,
        r.stream,
        &r.stop,
        &r.aiflow,
    ) {
        Ok(p) => run(&agent, p, true).await,
        Err(resp) => *resp,
    }
}
