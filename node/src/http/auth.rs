//! Bearer-token authentication of the API (`--api-key` / `AIFLOW_API_KEY`), as vLLM and
//! llama-server do it: `Authorization: Bearer <key>` on `/v1/*`, the tokenizer routes and
//! the dashboard's data (`/aiflow/*`); health and metrics stay open unless
//! `--api-key-probes` protects them too. The dashboard page (`/` and `/dashboard/*`) is
//! always open: a browser loads it without headers, and it asks for the key itself. Keys are compared through their SHA-256 digests in constant time, so neither the
//! content nor the length of the configured key leaks through response timing.

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use super::error::ApiError;
use super::Api;

/// SHA-256 of a key, what the server keeps.
pub fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// Constant-time equality of two digests.
fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether `path` needs the key.
fn protected(path: &str, probes: bool) -> bool {
    let api = path.starts_with("/v1/")
        || path.starts_with("/aiflow/")
        || path == "/tokenize"
        || path == "/detokenize";
    let page = path == "/" || path.starts_with("/dashboard/");
    api || (probes && !page)
}

/// Middleware: refuse requests without the right bearer token with 401.
pub async fn require_key(State(api): State<Api>, req: Request, next: Next) -> Response {
    let Some(want) = api.opts.api_key else {
        return next.run(req).await;
    };
    if !protected(req.uri().path(), api.opts.protect_probes) {
        return next.run(req).await;
    }
    let given = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|k| digest(k.trim()));
    match given {
        Some(g) if same(&g, &want) => next.run(req).await,
        _ => ApiError::unauthorized().into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_compare_equal_only_for_the_same_key() {
        assert!(same(&digest("k1"), &digest("k1")));
        assert!(!same(&digest("k1"), &digest("k2")));
        assert!(!same(&digest("k1"), &digest("k1 ")));
    }

    #[test]
    fn which_paths_need_the_key() {
        for p in [
            "/v1/models",
            "/v1/chat/completions",
            "/tokenize",
            "/detokenize",
            "/aiflow/status",
        ] {
            assert!(protected(p, false), "{p}");
        }
        for p in ["/health", "/metrics", "/", "/dashboard/app.js"] {
            assert!(!protected(p, false), "{p}");
        }
        assert!(protected("/metrics", true) && protected("/health", true));
        for p in ["/", "/dashboard/app.js", "/dashboard/style.css"] {
            assert!(!protected(p, true), "the page itself asks for the key: {p}");
        }
    }
}
