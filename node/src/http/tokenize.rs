//! `/tokenize` and `/detokenize`, as vLLM serves them: the same tokenization the
//! generation endpoints use (the model's own BOS rule; chat messages through the model's
//! chat template), so a client can count tokens before it sends a request.

use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;

use super::error::{ApiError, ApiResult};
use super::params::{self, Message};
use super::Api;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenizeBody {
    model: Option<String>,
    prompt: Option<String>,
    messages: Option<Vec<TokenizeMessage>>,
    /// Prompt form: prepend the model's BOS when it asks for one (default true).
    add_special_tokens: Option<bool>,
    /// Messages form: end with the assistant's turn opening (default true).
    add_generation_prompt: Option<bool>,
    /// Also return each token's text.
    return_token_strs: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenizeMessage {
    role: String,
    content: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DetokenizeBody {
    model: Option<String>,
    tokens: Vec<u32>,
}

fn typed<T: serde::de::DeserializeOwned>(body: &[u8]) -> ApiResult<T> {
    let m = params::object(body)?;
    serde_path_to_error::deserialize(serde_json::Value::Object(m)).map_err(|e| {
        let path = e.path().to_string();
        ApiError::param(
            path.clone(),
            format!("invalid `{path}`: {}", e.into_inner()),
        )
    })
}

pub(super) async fn tokenize(
    State(api): State<Api>,
    body: Result<axum::body::Bytes, BytesRejection>,
) -> Response {
    let run = || -> ApiResult<Response> {
        let body = super::body_of(&api, body)?;
        let agent = api.agent()?;
        let b: TokenizeBody = typed(&body)?;
        api.check_model(&agent, b.model.as_deref())?;
        let ids = match (b.prompt, b.messages) {
            (Some(p), None) => {
                if b.add_special_tokens.unwrap_or(true) {
                    agent.encode_prompt(&p)?
                } else {
                    agent
                        .tokenizer()
                        .encode(&p)
                        .map_err(|e| ApiError::bad_request(format!("tokenizing: {e}")))?
                }
            }
            (None, Some(msgs)) => {
                let msgs: Vec<Message> = msgs
                    .into_iter()
                    .map(|m| Message {
                        role: m.role,
                        content: m.content,
                    })
                    .collect();
                let text =
                    super::render_chat(&agent, &msgs, b.add_generation_prompt.unwrap_or(true))?;
                agent.encode_prompt(&text)?
            }
            _ => {
                return Err(ApiError::bad_request(
                    "send exactly one of `prompt` (text) or `messages` (chat)",
                ))
            }
        };
        let strs = b.return_token_strs.unwrap_or(false).then(|| {
            ids.iter()
                .map(|&i| String::from_utf8_lossy(&agent.tokenizer().token_bytes(i)).into_owned())
                .collect::<Vec<_>>()
        });
        Ok(Json(json!({
            "count": ids.len(),
            "max_model_len": agent.model_config().max_position_embeddings,
            "tokens": ids,
            "token_strs": strs,
        }))
        .into_response())
    };
    run().unwrap_or_else(IntoResponse::into_response)
}

pub(super) async fn detokenize(
    State(api): State<Api>,
    body: Result<axum::body::Bytes, BytesRejection>,
) -> Response {
    let run = || -> ApiResult<Response> {
        let body = super::body_of(&api, body)?;
        let agent = api.agent()?;
        let b: DetokenizeBody = typed(&body)?;
        api.check_model(&agent, b.model.as_deref())?;
        let vocab = agent.model_config().vocab_size;
        if let Some((i, t)) = b
            .tokens
            .iter()
            .enumerate()
            .find(|(_, &t)| t as usize >= vocab)
        {
            return Err(ApiError::param(
                format!("tokens[{i}]"),
                format!("token id {t} is outside the vocabulary of {vocab} tokens"),
            ));
        }
        let text = agent
            .tokenizer()
            .decode(&b.tokens)
            .map_err(|e| ApiError::bad_request(format!("detokenizing: {e}")))?;
        Ok(Json(json!({ "prompt": text })).into_response())
    };
    run().unwrap_or_else(IntoResponse::into_response)
}
