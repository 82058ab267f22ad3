//! Errors in OpenAI's shape (`{"error": {"message", "type", "param", "code"}}`) with the
//! status codes vLLM uses: 400 bad request, 401 no or wrong API key, 404 unknown model or
//! route, 413 body too large, 429 queue full (with `Retry-After`), 503 not ready or no
//! parent, 502 a tier failed mid-request.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

/// One API error; converts into the JSON response clients parse.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// The request parameter at fault, when there is one.
    pub param: Option<String>,
    /// OpenAI's machine-readable code (`model_not_found`, `invalid_api_key`, ...).
    pub code: Option<&'static str>,
    /// Seconds a client should wait before retrying (429, 503).
    pub retry_after: Option<u32>,
}

/// What handlers return.
pub type ApiResult<T> = std::result::Result<T, ApiError>;

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            param: None,
            code: None,
            retry_after: None,
        }
    }

    /// 400 about request parameter `param`.
    pub fn param(param: impl Into<String>, message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::BAD_REQUEST, message);
        e.param = Some(param.into());
        e
    }

    /// 400 about the request as a whole.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    /// 400: a parameter OpenAI defines that aiflow does not implement.
    pub fn unsupported(param: &str, why: &str) -> Self {
        let mut e = Self::param(
            param,
            format!("`{param}` is not supported by aiflow: {why}; remove it from the request"),
        );
        e.code = Some("unsupported_parameter");
        e
    }

    /// 404: the request named a model this server does not serve.
    pub fn unknown_model(asked: &str, served: &[String]) -> Self {
        let mut e = Self::new(
            StatusCode::NOT_FOUND,
            format!(
                "The model `{asked}` does not exist. This server serves: {}",
                served.join(", ")
            ),
        );
        e.param = Some("model".into());
        e.code = Some("model_not_found");
        e
    }

    /// 401: missing or wrong bearer token.
    pub fn unauthorized() -> Self {
        let mut e = Self::new(
            StatusCode::UNAUTHORIZED,
            "Missing or invalid API key: send `Authorization: Bearer <key>` with the key the \
             server was started with (--api-key or AIFLOW_API_KEY)",
        );
        e.code = Some("invalid_api_key");
        e
    }

    /// 413: the body exceeds the server's limit.
    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body is larger than this server's limit of {limit} bytes"),
        )
    }

    /// 429: the admission queue is full.
    pub fn overloaded(waiting: usize) -> Self {
        let mut e = Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "the server is at capacity ({waiting} requests already waiting); retry after \
                 the delay in Retry-After"
            ),
        );
        e.retry_after = Some(1);
        e
    }

    /// 503: the model is still loading (or the node cannot serve requests yet).
    pub fn unavailable(message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::SERVICE_UNAVAILABLE, message);
        e.retry_after = Some(1);
        e
    }

    /// 502: a tier failed while answering.
    pub fn upstream(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_GATEWAY, message)
    }

    /// 500: a bug or an invariant broken on this node.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }

    /// OpenAI's `type` for this status.
    pub fn kind(&self) -> &'static str {
        match self.status.as_u16() {
            400 | 404 | 413 => "invalid_request_error",
            401 => "authentication_error",
            429 => "rate_limit_error",
            503 => "service_unavailable",
            _ => "server_error",
        }
    }

    /// The error object (also sent inside an SSE stream that fails after it started).
    pub fn body(&self) -> serde_json::Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind(),
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl From<crate::error::NodeError> for ApiError {
    fn from(e: crate::error::NodeError) -> Self {
        use crate::error::NodeError as N;
        match e {
            N::BadRequest(m) => ApiError::bad_request(m),
            N::Unavailable(m) => ApiError::unavailable(m),
            other => ApiError::upstream(other.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        r
    }
}
