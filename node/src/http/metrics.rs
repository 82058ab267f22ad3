//! `/metrics` in the Prometheus text format.

use axum::extract::State;
use axum::response::{IntoResponse, Response};

use super::Api;

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

/// `/metrics`: vLLM's request-level series (labelled with the served model name), then
/// aiflow's own per-tier, per-exit and per-link series, engine and planning gauges.
pub(super) async fn metrics(State(api): State<Api>) -> Response {
    let agent = match api.agent() {
        Ok(a) => a,
        Err(e) => return e.into_response(),
    };
    let s = agent.engine_stats().await;
    let kv_usage = if s.kv_budget_bytes == 0 {
        0.0
    } else {
        s.kv_bytes as f64 / s.kv_budget_bytes as f64
    };
    let model = api
        .served_names(&agent)
        .into_iter()
        .next()
        .unwrap_or_default();
    let mut text = agent.metrics().serving.render(
        &model,
        api.admission.running(),
        api.admission.waiting(),
        kv_usage,
    );
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
    text.push_str(&agent.metrics().render(&rows));
    text.push_str(&agent.planning_metrics());
    text.push_str(&crate::metrics::render_child_sessions(
        &agent.fleet().child_sessions(),
    ));
    ([("content-type", "text/plain; version=0.0.4")], text).into_response()
}
