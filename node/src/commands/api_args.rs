//! Flags of the HTTP API, shared by `flow-node --role …` and `flow-node cluster`.

use clap::Args;
use flow_node::http::ApiOptions;

/// How the OpenAI-compatible API serves.
#[derive(Debug, Clone, Args)]
pub struct ApiArgs {
    /// Require `Authorization: Bearer KEY` on /v1/*, /tokenize and /detokenize (401
    /// otherwise). Prefer the environment variable to keep the key out of `ps`.
    #[arg(long, env = "AIFLOW_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Also require the key on /health and /metrics (probes and Prometheus must send it).
    #[arg(long, requires = "api_key")]
    pub api_key_probes: bool,
    /// Name clients send as `model` (repeat for aliases; default: the model's directory or
    /// file name). Other names get 404 listing these.
    #[arg(long = "served-model-name")]
    pub served_model_name: Vec<String>,
    /// Choices generating at once on this entry node; more requests queue.
    #[arg(long, default_value_t = 64)]
    pub max_running: usize,
    /// Requests allowed to queue for admission; beyond it the API answers 429 with
    /// Retry-After.
    #[arg(long, default_value_t = 256)]
    pub max_waiting: usize,
    /// Largest request body, in bytes (413 beyond).
    #[arg(long, default_value_t = 4 << 20)]
    pub max_body_bytes: usize,
}

impl ApiArgs {
    /// The API options these flags ask for.
    pub fn options(&self) -> ApiOptions {
        ApiOptions {
            api_key: self.api_key.clone().filter(|k| !k.is_empty()),
            protect_probes: self.api_key_probes,
            served_model_names: self.served_model_name.clone(),
            max_body_bytes: self.max_body_bytes,
            max_running: self.max_running,
            max_waiting: self.max_waiting,
        }
    }
}

impl Default for ApiArgs {
    fn default() -> Self {
        let o = ApiOptions::default();
        ApiArgs {
            api_key: None,
            api_key_probes: false,
            served_model_name: Vec::new(),
            max_running: o.max_running,
            max_waiting: o.max_waiting,
            max_body_bytes: o.max_body_bytes,
        }
    }
}
