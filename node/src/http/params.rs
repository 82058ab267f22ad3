//! Request bodies of `/v1/completions` and `/v1/chat/completions`, checked the way OpenAI
//! checks them: every key is either implemented, accepted only at its neutral value (and
//! refused otherwise), or refused by name — nothing is silently ignored. Wrong types name
//! the parameter's path (`messages[2].content`).

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::error::{ApiError, ApiResult};

/// The per-request `aiflow` extension: `{"mode": "escalate", "exit": 3, "threshold": 0.8,
/// "draft_len": 4}`.
#[derive(Debug, Default, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct AiflowOptions {
    /// `route`, `escalate`, `speculate` or `local`.
    pub mode: Option<String>,
    /// Exit that answers in `route` mode.
    pub exit: Option<u32>,
    /// Confidence threshold for every exit in `escalate` mode.
    pub threshold: Option<f32>,
    /// Draft length (the cap of the adaptive length) in `speculate` mode.
    pub draft_len: Option<u32>,
}

/// `stop`: one string or a list.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StreamOptions {
    include_usage: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ResponseFormat {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    json_schema: Option<Value>,
}

/// Keys both endpoints share.
#[derive(Debug, Deserialize)]
struct Shared {
    model: Option<String>,
    max_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i64>,
    seed: Option<i64>,
    n: Option<u32>,
    stop: Option<Stop>,
    stop_token_ids: Option<Vec<u32>>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    user: Option<String>,
    aiflow: Option<AiflowOptions>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    repetition_penalty: Option<f32>,
    logit_bias: Option<Map<String, Value>>,
    best_of: Option<u32>,
}

/// One chat message.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMessage {
    role: String,
    #[serde(default)]
    content: Option<Value>,
    name: Option<String>,
    tool_calls: Option<Value>,
}

/// Keys only `/v1/chat/completions` has.
#[derive(Debug, Deserialize)]
struct ChatOnly {
    messages: Vec<RawMessage>,
    max_completion_tokens: Option<u32>,
    logprobs: Option<bool>,
    top_logprobs: Option<u32>,
    response_format: Option<ResponseFormat>,
    tools: Option<Vec<Value>>,
    tool_choice: Option<Value>,
    parallel_tool_calls: Option<bool>,
}

/// Keys only `/v1/completions` has.
#[derive(Debug, Deserialize)]
struct CompletionOnly {
    prompt: Value,
    logprobs: Option<u32>,
    echo: Option<bool>,
    suffix: Option<String>,
}

const SHARED_KEYS: &[&str] = &[
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "n",
    "stop",
    "stop_token_ids",
    "stream",
    "stream_options",
    "user",
    "aiflow",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "logit_bias",
    "best_of",
];
const CHAT_KEYS: &[&str] = &[
    "messages",
    "max_completion_tokens",
    "logprobs",
    "top_logprobs",
    "response_format",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
];
const COMPLETION_KEYS: &[&str] = &["prompt", "logprobs", "echo", "suffix"];

/// OpenAI (or vLLM) parameters aiflow knows and does not implement, with the reason.
const REFUSED: &[(&str, &str)] = &[
    ("functions", "function calling is not implemented"),
    ("function_call", "function calling is not implemented"),
    ("audio", "audio output is not implemented"),
    ("modalities", "only text output is implemented"),
    ("prediction", "predicted outputs are not implemented"),
    (
        "reasoning_effort",
        "the served models have no reasoning mode",
    ),
    ("web_search_options", "web search is not implemented"),
    ("service_tier", "there is one service tier"),
    ("store", "completions are not stored"),
    (
        "metadata",
        "completions are not stored, so there is nothing to tag",
    ),
    ("guided_json", "constrained decoding is not implemented"),
    ("guided_regex", "constrained decoding is not implemented"),
    ("guided_choice", "constrained decoding is not implemented"),
    ("min_tokens", "a minimum length is not implemented"),
    (
        "ignore_eos",
        "generation always stops at the model's end-of-sequence tokens",
    ),
    ("response_format", "constrained decoding is not implemented"),
];

/// A chat message as the template sees it.
#[derive(Debug, Clone)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// What to feed the model: text (tokenized with the model's BOS rule) or token ids.
#[derive(Debug, Clone)]
pub enum PromptInput {
    Text(String),
    Ids(Vec<u32>),
}

/// Everything a generation request asks for, validated.
#[derive(Debug, Clone)]
pub struct GenParams {
    /// The `model` the client named (checked against the served names by the caller).
    pub model: Option<String>,
    pub max_tokens: Option<u32>,
    pub temperature: f32,
    pub top_p: f32,
    /// 0 = off.
    pub top_k: u32,
    pub seed: Option<u64>,
    pub n: u32,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    pub stream: bool,
    pub include_usage: bool,
    /// `Some(k)`: report each token's log-probability and `k` alternatives.
    pub logprobs: Option<u32>,
    /// Completions: return the prompt before the completion.
    pub echo: bool,
    pub user: Option<String>,
    pub aiflow: Option<AiflowOptions>,
}

/// A parsed chat request.
#[derive(Debug)]
pub struct ChatRequest {
    pub messages: Vec<Message>,
    pub params: GenParams,
}

/// A parsed completions request (one or more prompts).
#[derive(Debug)]
pub struct CompletionRequest {
    pub prompts: Vec<PromptInput>,
    pub params: GenParams,
}

/// Most stop strings per request.
pub const MAX_STOPS: usize = 16;
/// Most choices (prompts × n) per request.
pub const MAX_CHOICES: usize = 64;

/// The body as a JSON object with `null` members dropped (OpenAI treats `null` as absent).
pub fn object(body: &[u8]) -> ApiResult<Map<String, Value>> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("request body is not valid JSON: {e}")))?;
    match v {
        Value::Object(mut m) => {
            m.retain(|_, v| !v.is_null());
            Ok(m)
        }
        other => Err(ApiError::bad_request(format!(
            "request body must be a JSON object, got {}",
            kind_of(&other)
        ))),
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Refuse every key that is not in `known`, naming it (and why, when it is a known OpenAI
/// parameter aiflow does not implement).
fn check_keys(m: &Map<String, Value>, known: &[&[&str]]) -> ApiResult<()> {
    for k in m.keys() {
        if known.iter().any(|set| set.contains(&k.as_str())) {
            continue;
        }
        if let Some((_, why)) = REFUSED.iter().find(|(r, _)| r == k) {
            return Err(ApiError::unsupported(k, why));
        }
        return Err(ApiError::param(
            k.as_str(),
            format!("Unrecognized request argument supplied: `{k}`"),
        ));
    }
    Ok(())
}

/// Typed view of the object; a type error names the parameter path.
fn typed<T: DeserializeOwned>(m: &Map<String, Value>) -> ApiResult<T> {
    let v = Value::Object(m.clone());
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." {
            ApiError::bad_request(format!("invalid request: {inner}"))
        } else {
            ApiError::param(path.clone(), format!("invalid `{path}`: {inner}"))
        }
    })
}

fn shared(s: Shared) -> ApiResult<GenParams> {
    if let Some(t) = s.temperature {
        if !(0.0..=2.0).contains(&t) {
            return Err(ApiError::param(
                "temperature",
                format!("temperature must be in [0, 2], got {t}"),
            ));
        }
    }
    if let Some(p) = s.top_p {
        if !(p > 0.0 && p <= 1.0) {
            return Err(ApiError::param(
                "top_p",
                format!("top_p must be in (0, 1], got {p}"),
            ));
        }
    }
    let top_k = match s.top_k {
        None | Some(-1) | Some(0) => 0,
        Some(k) if k > 0 => u32::try_from(k).unwrap_or(u32::MAX),
        Some(k) => {
            return Err(ApiError::param(
                "top_k",
                format!("top_k must be -1 (off) or positive, got {k}"),
            ))
        }
    };
    if s.max_tokens == Some(0) {
        return Err(ApiError::param(
            "max_tokens",
            "max_tokens must be at least 1",
        ));
    }
    let n = s.n.unwrap_or(1);
    if n == 0 || n as usize > MAX_CHOICES {
        return Err(ApiError::param(
            "n",
            format!("n must be between 1 and {MAX_CHOICES}, got {n}"),
        ));
    }
    if let Some(b) = s.best_of {
        if b != n {
            return Err(ApiError::unsupported(
                "best_of",
                "choices are not ranked server-side (best_of must equal n)",
            ));
        }
    }
    for (name, v) in [
        ("presence_penalty", s.presence_penalty),
        ("frequency_penalty", s.frequency_penalty),
    ] {
        if v.is_some_and(|v| v != 0.0) {
            return Err(ApiError::unsupported(
                name,
                "sampling penalties are not implemented (0 is accepted)",
            ));
        }
    }
    if s.repetition_penalty.is_some_and(|v| v != 1.0) {
        return Err(ApiError::unsupported(
            "repetition_penalty",
            "sampling penalties are not implemented (1 is accepted)",
        ));
    }
    if s.logit_bias.as_ref().is_some_and(|m| !m.is_empty()) {
        return Err(ApiError::unsupported(
            "logit_bias",
            "logit biases are not implemented",
        ));
    }
    let stop = match s.stop {
        None => vec![],
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    if stop.len() > MAX_STOPS {
        return Err(ApiError::param(
            "stop",
            format!("at most {MAX_STOPS} stop sequences, got {}", stop.len()),
        ));
    }
    if stop.iter().any(String::is_empty) {
        return Err(ApiError::param("stop", "stop sequences must not be empty"));
    }
    let stream = s.stream.unwrap_or(false);
    let include_usage = match s.stream_options {
        Some(_) if !stream => {
            return Err(ApiError::param(
                "stream_options",
                "stream_options is only allowed when stream is true",
            ))
        }
        Some(o) => o.include_usage.unwrap_or(false),
        None => false,
    };
    if let Some(a) = &s.aiflow {
        if a.threshold.is_some_and(|t| !t.is_finite()) {
            return Err(ApiError::param(
                "aiflow.threshold",
                "aiflow.threshold must be a finite number",
            ));
        }
    }
    Ok(GenParams {
        model: s.model,
        max_tokens: s.max_tokens,
        temperature: s.temperature.unwrap_or(1.0),
        top_p: s.top_p.unwrap_or(1.0),
        top_k,
        seed: s.seed.map(|v| v as u64),
        n,
        stop,
        stop_token_ids: s.stop_token_ids.unwrap_or_default(),
        stream,
        include_usage,
        logprobs: None,
        echo: false,
        user: s.user,
        aiflow: s.aiflow,
    })
}

fn text_content(i: usize, v: Option<Value>) -> ApiResult<String> {
    let param = format!("messages[{i}].content");
    match v {
        None => Ok(String::new()),
        Some(Value::String(s)) => Ok(s),
        Some(Value::Array(parts)) => {
            let mut out = String::new();
            for (j, p) in parts.iter().enumerate() {
                let kind = p.get("type").and_then(Value::as_str).unwrap_or("");
                match (kind, p.get("text").and_then(Value::as_str)) {
                    ("text", Some(t)) => out.push_str(t),
                    ("text", None) => {
                        return Err(ApiError::param(
                            format!("{param}[{j}].text"),
                            "a text part needs a string `text`",
                        ))
                    }
                    _ => {
                        return Err(ApiError::unsupported(
                            &format!("{param}[{j}]"),
                            &format!("only text content parts are implemented (got type `{kind}`)"),
                        ))
                    }
                }
            }
            Ok(out)
        }
        Some(other) => Err(ApiError::param(
            param,
            format!(
                "content must be a string or a list of text parts, got {}",
                kind_of(&other)
            ),
        )),
    }
}

/// Parse and check a chat request body.
pub fn chat(body: &[u8]) -> ApiResult<ChatRequest> {
    let m = object(body)?;
    check_keys(&m, &[SHARED_KEYS, CHAT_KEYS])?;
    let (s, c): (Shared, ChatOnly) = (typed(&m)?, typed(&m)?);
    let mut params = shared(s)?;
    if let Some(t) = c.max_completion_tokens {
        if t == 0 {
            return Err(ApiError::param(
                "max_completion_tokens",
                "max_completion_tokens must be at least 1",
            ));
        }
        params.max_tokens = Some(t);
    }
    if c.messages.is_empty() {
        return Err(ApiError::param("messages", "messages must not be empty"));
    }
    if let Some(f) = c.response_format {
        if f.kind != "text" || f.json_schema.is_some() {
            return Err(ApiError::unsupported(
                "response_format",
                &format!(
                    "`{}` needs constrained decoding, which aiflow does not implement \
                     (only {{\"type\": \"text\"}} is accepted)",
                    f.kind
                ),
            ));
        }
    }
    if c.tools.as_ref().is_some_and(|t| !t.is_empty()) {
        return Err(ApiError::unsupported(
            "tools",
            "tool calling is not implemented",
        ));
    }
    if c.tool_choice.as_ref().is_some_and(|t| t != "none") {
        return Err(ApiError::unsupported(
            "tool_choice",
            "tool calling is not implemented (only \"none\" is accepted)",
        ));
    }
    let _ = c.parallel_tool_calls;
    params.logprobs = match (c.logprobs, c.top_logprobs) {
        (Some(true), k) => Some(k.unwrap_or(0)),
        (_, Some(k)) if k > 0 => {
            return Err(ApiError::param(
                "top_logprobs",
                "top_logprobs requires logprobs: true",
            ))
        }
        _ => None,
    };
    check_top(params.logprobs, "top_logprobs")?;
    let mut messages = Vec::with_capacity(c.messages.len());
    for (i, raw) in c.messages.into_iter().enumerate() {
        if raw.name.is_some() {
            return Err(ApiError::unsupported(
                &format!("messages[{i}].name"),
                "participant names are not passed to the chat template",
            ));
        }
        if raw.tool_calls.is_some() {
            return Err(ApiError::unsupported(
                &format!("messages[{i}].tool_calls"),
                "tool calling is not implemented",
            ));
        }
        match raw.role.as_str() {
            "system" | "developer" | "user" | "assistant" => {}
            "tool" | "function" => {
                return Err(ApiError::unsupported(
                    &format!("messages[{i}].role"),
                    "tool calling is not implemented",
                ))
            }
            other => {
                return Err(ApiError::param(
                    format!("messages[{i}].role"),
                    format!("unknown role `{other}` (system, developer, user or assistant)"),
                ))
            }
        }
        messages.push(Message {
            role: raw.role,
            content: text_content(i, raw.content)?,
        });
    }
    Ok(ChatRequest { messages, params })
}

fn check_top(logprobs: Option<u32>, param: &str) -> ApiResult<()> {
    let max = flow_protocol::MAX_TOP_LOGPROBS;
    match logprobs {
        Some(k) if k > max => Err(ApiError::param(
            param,
            format!("{param} must be at most {max}, got {k}"),
        )),
        _ => Ok(()),
    }
}

fn prompts(v: Value) -> ApiResult<Vec<PromptInput>> {
    let bad = || {
        ApiError::param(
            "prompt",
            "prompt must be a string, a list of strings, a list of token ids or a list of \
             lists of token ids",
        )
    };
    let ids = |v: &Vec<Value>| -> Option<Vec<u32>> {
        v.iter()
            .map(|x| x.as_u64().and_then(|i| u32::try_from(i).ok()))
            .collect()
    };
    let out = match v {
        Value::String(s) => vec![PromptInput::Text(s)],
        Value::Array(a) if a.is_empty() => return Err(bad()),
        Value::Array(a) if a.iter().all(Value::is_string) => a
            .into_iter()
            .map(|s| PromptInput::Text(s.as_str().unwrap_or_default().to_string()))
            .collect(),
        Value::Array(a) if a.iter().all(Value::is_number) => {
            vec![PromptInput::Ids(ids(&a).ok_or_else(bad)?)]
        }
        Value::Array(a) => a
            .iter()
            .map(|x| match x {
                Value::Array(inner) if !inner.is_empty() => {
                    ids(inner).map(PromptInput::Ids).ok_or_else(bad)
                }
                _ => Err(bad()),
            })
            .collect::<ApiResult<_>>()?,
        _ => return Err(bad()),
    };
    Ok(out)
}

/// Parse and check a completions request body.
pub fn completion(body: &[u8]) -> ApiResult<CompletionRequest> {
    let m = object(body)?;
    check_keys(&m, &[SHARED_KEYS, COMPLETION_KEYS])?;
    let (s, c): (Shared, CompletionOnly) = (typed(&m)?, typed(&m)?);
    let mut params = shared(s)?;
    if c.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::unsupported(
            "suffix",
            "insertion (fill-in-the-middle) is not implemented",
        ));
    }
    params.echo = c.echo.unwrap_or(false);
    params.logprobs = c.logprobs;
    check_top(params.logprobs, "logprobs")?;
    if params.echo && params.logprobs.is_some() {
        return Err(ApiError::unsupported(
            "echo",
            "echo together with logprobs needs prompt log-probabilities, which are not \
             computed (use echo or logprobs)",
        ));
    }
    let prompts = prompts(c.prompt)?;
    if prompts.len() * params.n as usize > MAX_CHOICES {
        return Err(ApiError::param(
            "n",
            format!(
                "{} prompts × n = {} exceeds the limit of {MAX_CHOICES} choices per request",
                prompts.len(),
                prompts.len() * params.n as usize
            ),
        ));
    }
    Ok(CompletionRequest { prompts, params })
}

#[cfg(test)]
mod tests;
