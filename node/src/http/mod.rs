//! OpenAI-compatible HTTP API of the entry node (axum), what users of vLLM and llama-server
//! expect: `/v1/models`, `/v1/completions`, `/v1/chat/completions` (JSON or SSE), `/tokenize`,
//! `/detokenize`, `/health` (503 while the model loads, then 200; `/healthz` too) and
//! `/metrics` (vLLM's `vllm:` series beside aiflow's own), and a live dashboard page at
//! `/` fed by `/aiflow/status`.
//!
//! - [`serve`] / [`router`]: an API over a started [`Agent`]; [`serve_loading`] binds first
//!   and answers 503 until [`Ready::set`] hands it the agent.
//! - Requests are checked by [`params`]: every parameter is implemented, accepted only at its
//!   neutral value, or refused with a 400 naming it. Errors have OpenAI's shape ([`error`]).
//! - `admission` bounds concurrent choices (429 with `Retry-After` beyond the queue);
//!   `auth` checks `--api-key` bearer tokens in constant time.
//! - Every token carries the tier and exit that produced it (`aiflow` in each chunk), and
//!   every response an `aiflow` summary: tokens per tier and exit, bytes shipped, hops,
//!   degraded tokens, drafts. Requests may carry an `aiflow` object choosing the inference
//!   mode: `{"mode": "escalate", "exit": 3, "threshold": 0.8, "draft_len": 4}`.

mod admission;
mod auth;
mod choice;
mod dashboard;
pub mod error;
mod metrics;
pub mod params;
mod respond;
mod stop;
mod tokenize;

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use flow_protocol::{ExitThreshold, InferMode, Policy, Sampling};
use serde_json::{json, Value};
use tokio::time::Instant;

use crate::agent::{Agent, GenerateRequest};
pub use admission::Admission;
use error::{ApiError, ApiResult};
pub use params::AiflowOptions;
use params::{GenParams, Message, PromptInput};
use respond::{Kind, Plan};

/// How the API serves (flags of `flow-node --http`).
#[derive(Debug, Clone)]
pub struct ApiOptions {
    /// Bearer token required on `/v1/*` and the tokenizer routes (`None`: open).
    pub api_key: Option<String>,
    /// Require the key on `/health` and `/metrics` too.
    pub protect_probes: bool,
    /// Names clients may send as `model` (vLLM's `--served-model-name`); empty: the
    /// model's directory or file name.
    pub served_model_names: Vec<String>,
    /// Largest request body accepted (413 beyond).
    pub max_body_bytes: usize,
    /// Choices generating at once; more queue.
    pub max_running: usize,
    /// Requests queued for admission; more get 429.
    pub max_waiting: usize,
}

impl Default for ApiOptions {
    fn default() -> Self {
        ApiOptions {
            api_key: None,
            protect_probes: false,
            served_model_names: Vec::new(),
            max_body_bytes: 4 << 20,
            max_running: 64,
            max_waiting: 256,
        }
    }
}

/// Checked options as the handlers use them.
#[derive(Debug)]
struct Opts {
    api_key: Option<[u8; 32]>,
    protect_probes: bool,
    served_model_names: Vec<String>,
    max_body_bytes: usize,
}

/// State shared by the handlers.
#[derive(Clone)]
pub struct Api {
    ready: Arc<OnceLock<Agent>>,
    opts: Arc<Opts>,
    admission: Arc<Admission>,
}

/// Hands the started agent to an API bound by [`serve_loading`].
#[derive(Clone)]
pub struct Ready(Arc<OnceLock<Agent>>);

impl Ready {
    /// The model is loaded: serve requests from now on.
    pub fn set(&self, agent: Agent) {
        let _ = self.0.set(agent);
    }
}

impl Api {
    fn new(opts: &ApiOptions) -> Self {
        Api {
            ready: Arc::new(OnceLock::new()),
            opts: Arc::new(Opts {
                api_key: opts.api_key.as_deref().map(auth::digest),
                protect_probes: opts.protect_probes,
                served_model_names: opts.served_model_names.clone(),
                max_body_bytes: opts.max_body_bytes,
            }),
            admission: Arc::new(Admission::new(opts.max_running, opts.max_waiting)),
        }
    }

    /// The agent, or 503 while it is still loading.
    fn agent(&self) -> ApiResult<Agent> {
        self.ready
            .get()
            .cloned()
            .ok_or_else(|| ApiError::unavailable("the model is still loading; retry shortly"))
    }

    /// The names `model` may take.
    fn served_names(&self, agent: &Agent) -> Vec<String> {
        if self.opts.served_model_names.is_empty() {
            vec![model_name(agent)]
        } else {
            self.opts.served_model_names.clone()
        }
    }

    /// 404 unless `model` (when given) is one of the served names.
    fn check_model(&self, agent: &Agent, model: Option<&str>) -> ApiResult<()> {
        let Some(m) = model else { return Ok(()) };
        let served = self.served_names(agent);
        if served.iter().any(|s| s == m) {
            Ok(())
        } else {
            Err(ApiError::unknown_model(m, &served))
        }
    }
}

/// Serve the API over `agent` on `addr` until the task is dropped. Returns the bound address.
pub async fn serve(
    agent: Agent,
    addr: SocketAddr,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let (local, h, ready) = serve_loading(addr, &ApiOptions::default()).await?;
    ready.set(agent);
    Ok((local, h))
}

/// Bind `addr` now and answer `/health` with 503 (and requests with 503) until the agent is
/// handed over with [`Ready::set`].
pub async fn serve_loading(
    addr: SocketAddr,
    opts: &ApiOptions,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>, Ready)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let api = Api::new(opts);
    let ready = Ready(api.ready.clone());
    let app = router_with(api);
    let h = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "HTTP server stopped");
        }
    });
    Ok((local, h, ready))
}

/// The router of the API over a started agent, default options.
pub fn router(agent: Agent) -> Router {
    let api = Api::new(&ApiOptions::default());
    let _ = api.ready.set(agent);
    router_with(api)
}

/// The router over `api`.
pub fn router_with(api: Api) -> Router {
    let limit = api.opts.max_body_bytes;
    Router::new()
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat))
        .route("/tokenize", post(tokenize::tokenize))
        .route("/detokenize", post(tokenize::detokenize))
        .route("/health", get(health))
        .route("/healthz", get(health))
        .route("/metrics", get(metrics::metrics))
        .merge(dashboard::routes())
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(
            api.clone(),
            auth::require_key,
        ))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(api)
}

async fn not_found(uri: axum::http::Uri) -> Response {
    let mut e = ApiError::bad_request(format!(
        "no route {uri}: this server has /v1/models, /v1/completions, /v1/chat/completions, \
         /tokenize, /detokenize, /health, /metrics, the dashboard at / and /aiflow/status"
    ));
    e.status = StatusCode::NOT_FOUND;
    e.into_response()
}

async fn health(State(api): State<Api>) -> Response {
    match api.agent() {
        Ok(a) if a.is_draining() => (
            StatusCode::SERVICE_UNAVAILABLE,
            "draining: this node is shutting down\n",
        )
            .into_response(),
        Ok(_) => "ok\n".into_response(),
        Err(e) => e.into_response(),
    }
}

/// The model's name: its directory (or a pulled model's cache entry) or file stem.
pub fn model_name(agent: &Agent) -> String {
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

async fn models(State(api): State<Api>) -> Response {
    let agent = match api.agent() {
        Ok(a) => a,
        Err(e) => return e.into_response(),
    };
    let cfg = agent.model_config();
    let c = agent.config();
    let data: Vec<Value> = api
        .served_names(&agent)
        .into_iter()
        .map(|id| {
            json!({
                "id": id,
                "object": "model",
                "created": 0,
                "owned_by": "aiflow",
                "root": model_name(&agent),
                "max_model_len": cfg.max_position_embeddings,
                "context_length": cfg.max_position_embeddings,
                "aiflow": {
                    "exits": cfg.exit_points(),
                    "layers": cfg.num_layers,
                    "layout": cfg.layout.model_type(),
                    "role": c.role.as_str(),
                    "hosted_layers": [c.stage.a, c.stage.b],
                    "default_mode": c.default_policy.mode.as_str(),
                }
            })
        })
        .collect();
    Json(json!({"object": "list", "data": data})).into_response()
}

/// The request body, with axum's rejections (413 over the limit) in OpenAI's shape.
fn body_of(
    api: &Api,
    body: Result<axum::body::Bytes, BytesRejection>,
) -> ApiResult<axum::body::Bytes> {
    body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::too_large(api.opts.max_body_bytes)
        } else {
            ApiError::bad_request(format!("could not read the request body: {r}"))
        }
    })
}

fn policy_of(agent: &Agent, o: &Option<AiflowOptions>) -> ApiResult<Option<Policy>> {
    let Some(o) = o else { return Ok(None) };
    let mut p = agent.config().default_policy.clone();
    if let Some(m) = &o.mode {
        p.mode = m
            .parse::<InferMode>()
            .map_err(|e| ApiError::param("aiflow.mode", e.to_string()))?;
    }
    if let Some(e) = o.exit {
        p.answer_exit = Some(e);
        if o.mode.is_none() {
            p.mode = InferMode::Route;
        }
    }
    if let Some(t) = o.threshold {
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

/// Start every choice of a request and answer (JSON or SSE).
async fn generate(
    api: &Api,
    agent: &Agent,
    kind: Kind,
    prompts: Vec<(Vec<u32>, Option<String>)>,
    p: GenParams,
    arrival: Instant,
) -> ApiResult<Response> {
    api.check_model(agent, p.model.as_deref())?;
    let policy = policy_of(agent, &p.aiflow)?;
    let mode = policy
        .as_ref()
        .map_or(agent.config().default_policy.mode, |p| p.mode);
    if p.logprobs.is_some() && mode == InferMode::Speculate {
        return Err(ApiError::unsupported(
            "logprobs",
            "tokens accepted from a speculative draft carry no verified log-probability; \
             use aiflow.mode escalate, route or local",
        ));
    }
    let cfg = agent.model_config();
    let (ctx, vocab) = (cfg.max_position_embeddings, cfg.vocab_size);
    if let Some(t) = p.stop_token_ids.iter().find(|&&t| t as usize >= vocab) {
        return Err(ApiError::param(
            "stop_token_ids",
            format!("token id {t} is outside the vocabulary of {vocab} tokens"),
        ));
    }
    let mut budgets = Vec::with_capacity(prompts.len());
    for (ids, _) in &prompts {
        if ids.is_empty() {
            return Err(ApiError::param("prompt", "the prompt is empty"));
        }
        if let Some(t) = ids.iter().find(|&&t| t as usize >= vocab) {
            return Err(ApiError::param(
                "prompt",
                format!("token id {t} is outside the vocabulary of {vocab} tokens"),
            ));
        }
        let room = ctx.saturating_sub(ids.len());
        let max_new = match (p.max_tokens, kind) {
            (Some(m), _) => m as usize,
            (None, Kind::Completion) => 16.min(room),
            (None, Kind::Chat) => room,
        };
        if room == 0 || ids.len() + max_new > ctx {
            let mut e = ApiError::param(
                if p.max_tokens.is_some() {
                    "max_tokens"
                } else {
                    "messages"
                },
                format!(
                    "This model's maximum context length is {ctx} tokens. However, you \
                     requested {} tokens ({} in the prompt, {max_new} for the completion). \
                     Please reduce the prompt or max_tokens.",
                    ids.len() + max_new,
                    ids.len()
                ),
            );
            e.code = Some("context_length_exceeded");
            return Err(e);
        }
        budgets.push(max_new);
    }
    let n = p.n as usize;
    let (permit, queued) = api.admission.admit(prompts.len() * n).await?;
    let mut specs = Vec::with_capacity(prompts.len() * n);
    for (pi, (ids, _)) in prompts.iter().enumerate() {
        for j in 0..n {
            let index = (pi * n + j) as u32;
            let seed = p
                .seed
                .map_or_else(rand::random, |s| s.wrapping_add(u64::from(index)));
            let req = GenerateRequest {
                prompt: ids.clone(),
                max_new_tokens: budgets[pi],
                sampling: Sampling {
                    temperature: p.temperature,
                    top_p: p.top_p,
                    top_k: p.top_k,
                    seed,
                    max_new_tokens: budgets[pi] as u32,
                    stop_tokens: p.stop_token_ids.clone(),
                    top_logprobs: p.logprobs.unwrap_or(0),
                },
                policy: policy.clone(),
                stop_tokens: p.stop_token_ids.clone(),
            };
            // Started one by one so a refusal is a status code, not a broken stream;
            // the streams already started are cancelled when this returns early.
            let events = agent.generate(req).await?;
            specs.push(choice::ChoiceSpec {
                index,
                events,
                stops: p.stop.clone(),
            });
        }
    }
    if let Some(user) = &p.user {
        tracing::info!(user = %user, choices = specs.len(), "request admitted");
    }
    let plan = Plan {
        kind,
        model: p.model.clone().unwrap_or_else(|| {
            api.served_names(agent)
                .into_iter()
                .next()
                .unwrap_or_default()
        }),
        choices: specs.len() as u32,
        prompt_tokens: prompts.iter().map(|(ids, _)| ids.len()).sum(),
        logprobs: p.logprobs,
        include_usage: p.include_usage,
        echo: prompts
            .iter()
            .flat_map(|(_, echo)| std::iter::repeat_n(echo.clone(), n))
            .collect(),
        arrival,
        queued,
        permit,
    };
    let rx = choice::spawn_all(agent, specs);
    Ok(if p.stream {
        respond::sse(agent, plan, rx)
    } else {
        respond::json(agent, plan, rx).await
    })
}

async fn completions(
    State(api): State<Api>,
    body: Result<axum::body::Bytes, BytesRejection>,
) -> Response {
    let arrival = Instant::now();
    let run = async {
        let agent = api.agent()?;
        let body = body_of(&api, body)?;
        let r = params::completion(&body)?;
        let mut prompts = Vec::with_capacity(r.prompts.len());
        for p in r.prompts {
            prompts.push(match p {
                PromptInput::Text(t) => {
                    let ids = agent.encode_prompt(&t)?;
                    (ids, r.params.echo.then_some(t))
                }
                PromptInput::Ids(ids) => {
                    let echo = if r.params.echo {
                        Some(agent.tokenizer().decode(&ids).map_err(|e| {
                            ApiError::param("prompt", format!("decoding the prompt ids: {e}"))
                        })?)
                    } else {
                        None
                    };
                    (ids, echo)
                }
            });
        }
        generate(&api, &agent, Kind::Completion, prompts, r.params, arrival).await
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

/// Render chat messages with the model's chat template (minijinja, as HF and vLLM do), or
/// the built-in template of the byte-level families.
pub(crate) fn render_chat(
    agent: &Agent,
    msgs: &[Message],
    add_generation_prompt: bool,
) -> ApiResult<String> {
    match agent.chat_template() {
        Some(t) => {
            let msgs: Vec<flow_familial::chat::ChatMessage> = msgs
                .iter()
                .map(|m| flow_familial::chat::ChatMessage {
                    role: m.role.clone(),
                    content: m.content.clone(),
                })
                .collect();
            t.render(&msgs, add_generation_prompt).map_err(|e| {
                ApiError::param(
                    "messages",
                    format!("the model's chat template rejected the messages: {e}"),
                )
            })
        }
        None => Ok(chat_prompt(
            &msgs
                .iter()
                .map(|m| (m.role.clone(), m.content.clone()))
                .collect::<Vec<_>>(),
        )),
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

async fn chat(State(api): State<Api>, body: Result<axum::body::Bytes, BytesRejection>) -> Response {
    let arrival = Instant::now();
    let run = async {
        let agent = api.agent()?;
        let body = body_of(&api, body)?;
        let r = params::chat(&body)?;
        let prompt = render_chat(&agent, &r.messages, true)?;
        let ids = agent.encode_prompt(&prompt)?;
        generate(
            &api,
            &agent,
            Kind::Chat,
            vec![(ids, None)],
            r.params,
            arrival,
        )
        .await
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}
