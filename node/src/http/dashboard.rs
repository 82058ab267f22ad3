//! The live dashboard served by the entry node: `GET /` is a plain HTML page (with its
//! script and style under `/dashboard/`, all committed in `node/assets/dashboard/` and
//! compiled in; no framework, nothing fetched from elsewhere) that shows the tiers, the
//! links, tokens per tier and exit, escalation and degradation rates and the admission
//! queue, and streams chat answers from `/v1/chat/completions` with each token coloured by
//! the tier and exit that produced it.
//!
//! The page polls `GET /aiflow/status` ([`status::Status`]) every second. The page and its
//! assets are open; `/aiflow/status` needs the `--api-key` like `/v1/*` (it names the
//! node's parents and their addresses), so the page asks for the key when it gets a 401 and
//! sends it as a bearer token.

mod status;
mod topology;

use axum::extract::State;
use axum::http::header::{CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};

use super::Api;

const INDEX_HTML: &str = include_str!("../../assets/dashboard/index.html");
const APP_JS: &str = include_str!("../../assets/dashboard/app.js");
const STYLE_CSS: &str = include_str!("../../assets/dashboard/style.css");

/// Only this origin: the page works offline and cannot be framed or fed other scripts.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
                   connect-src 'self'; img-src 'self' data:; base-uri 'none'; \
                   form-action 'none'; frame-ancestors 'none'";

/// The page, its assets and the status endpoint.
pub(super) fn routes() -> Router<Api> {
    Router::new()
        .route("/", get(page))
        .route(
            "/dashboard/app.js",
            get(|| asset(APP_JS, "text/javascript")),
        )
        .route("/dashboard/style.css", get(|| asset(STYLE_CSS, "text/css")))
        .route("/aiflow/status", get(status))
}

async fn asset(body: &'static str, kind: &'static str) -> Response {
    (
        [
            (CONTENT_TYPE, format!("{kind}; charset=utf-8")),
            (CACHE_CONTROL, "no-cache".to_string()),
            (
                axum::http::header::X_CONTENT_TYPE_OPTIONS,
                "nosniff".to_string(),
            ),
        ],
        body,
    )
        .into_response()
}

async fn page() -> Response {
    let mut r = asset(INDEX_HTML, "text/html").await;
    r.headers_mut().insert(
        CONTENT_SECURITY_POLICY,
        axum::http::HeaderValue::from_static(CSP),
    );
    r
}

async fn status(State(api): State<Api>) -> Response {
    match status::snapshot(&api).await {
        Ok(s) => ([(CACHE_CONTROL, "no-store")], Json(s)).into_response(),
        Err(e) => e.into_response(),
    }
}
