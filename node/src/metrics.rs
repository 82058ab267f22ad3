//! Prometheus metrics in the text exposition format, with no registry dependency: a few
//! atomic counters, fixed-bucket histograms and labelled counters.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// A monotonically increasing counter.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A histogram with fixed upper bounds.
#[derive(Debug)]
pub struct Histogram {
    bounds: Vec<f64>,
    counts: Vec<AtomicU64>,
    sum_micros: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &[f64]) -> Self {
        Self {
            bounds: bounds.to_vec(),
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, v: f64) {
        let i = self
            .bounds
            .iter()
            .position(|b| v <= *b)
            .unwrap_or(self.bounds.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add((v.max(0.0) * 1e6) as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        self.render_labeled(out, name, help, "");
    }

    /// Render with a label set (`model_name="x"`) on every series.
    pub fn render_labeled(&self, out: &mut String, name: &str, help: &str, labels: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let (sep, set) = if labels.is_empty() {
            ("", String::new())
        } else {
            (",", format!("{{{labels}}}"))
        };
        let mut acc = 0;
        for (i, b) in self.bounds.iter().enumerate() {
            acc += self.counts[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {acc}");
        }
        acc += self.counts[self.bounds.len()].load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {acc}");
        let _ = writeln!(
            out,
            "{name}_sum{set} {}",
            self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(
            out,
            "{name}_count{set} {}",
            self.count.load(Ordering::Relaxed)
        );
    }
}

/// Counters keyed by a label set.
#[derive(Debug, Default)]
pub struct Labeled(Mutex<BTreeMap<String, u64>>);

impl Labeled {
    /// `labels` is the rendered label set, e.g. `tier="edge",exit="3"`.
    pub fn add(&self, labels: String, n: u64) {
        if let Ok(mut m) = self.0.lock() {
            *m.entry(labels).or_default() += n;
        }
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        self.render_labeled(out, name, help, "");
    }

    /// Render with `labels` prepended to every series' own labels.
    pub fn render_labeled(&self, out: &mut String, name: &str, help: &str, labels: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        let sep = if labels.is_empty() { "" } else { "," };
        if let Ok(m) = self.0.lock() {
            for (l, v) in m.iter() {
                let _ = writeln!(out, "{name}{{{labels}{sep}{l}}} {v}");
            }
        }
    }

    /// Current value of one label set.
    pub fn get(&self, labels: &str) -> u64 {
        self.0
            .lock()
            .ok()
            .and_then(|m| m.get(labels).copied())
            .unwrap_or(0)
    }

    /// Every label set with its value, in label order (a copy; empty if the lock is
    /// poisoned).
    pub fn snapshot(&self) -> Vec<(String, u64)> {
        self.0
            .lock()
            .map(|m| m.iter().map(|(l, v)| (l.clone(), *v)).collect())
            .unwrap_or_default()
    }
}

/// Everything a node exports on `/metrics`.
#[derive(Debug)]
pub struct Metrics {
    pub requests: Counter,
    pub request_errors: Counter,
    pub tokens: Labeled,
    pub escalations: Counter,
    pub degraded: Counter,
    /// Escalations whose reply missed its deadline.
    pub parent_timeouts: Counter,
    /// Reply deadlines passed with the parent still heard from (the wait went on).
    pub parent_slow_replies: Counter,
    pub bytes_up: Counter,
    /// Part of `bytes_up` that re-sent earlier positions' states (owed KV after a local
    /// answer, or a whole session moved to another parent).
    pub backfill_bytes: Counter,
    pub sessions_served: Counter,
    pub request_latency: Histogram,
    pub ttft: Histogram,
    pub batch_size: Histogram,
    pub drafts_accepted: Counter,
    pub drafts_proposed: Counter,
    /// Request-level series of the HTTP API under vLLM's names.
    pub serving: Serving,
}

/// vLLM's request-level metrics, observed by the HTTP API where the client's view of time
/// is (names and buckets as vLLM's `vllm/v1/metrics/loggers.py`, so existing Grafana boards
/// work); rendered by [`Serving::render`] with a `model_name` label.
#[derive(Debug)]
pub struct Serving {
    pub ttft: Histogram,
    pub itl: Histogram,
    pub e2e: Histogram,
    pub queue: Histogram,
    pub request_prompt_tokens: Histogram,
    pub request_generation_tokens: Histogram,
    pub prompt_tokens: Counter,
    pub generation_tokens: Counter,
    /// Finished requests by `finished_reason` (`stop`, `length`).
    pub success: Labeled,
    /// Requests that ended in an error after admission.
    pub failed: Counter,
}

/// vLLM's TTFT buckets (seconds).
const TTFT_BUCKETS: [f64; 22] = [
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];
/// vLLM's inter-token latency buckets (seconds).
const ITL_BUCKETS: [f64; 19] = [
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
];
/// vLLM's request latency buckets (seconds): e2e and queue time.
const REQUEST_BUCKETS: [f64; 21] = [
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
];

/// vLLM's 1-2-5 token-count buckets up to `max` (the model's context).
fn buckets_1_2_5(max: usize) -> Vec<f64> {
    let mut out = Vec::new();
    let mut exp = 1usize;
    loop {
        for m in [1, 2, 5] {
            let v = m * exp;
            if v > max {
                return out;
            }
            out.push(v as f64);
        }
        exp = exp.saturating_mul(10);
    }
}

impl Serving {
    fn new(max_model_len: usize) -> Self {
        let tokens = buckets_1_2_5(max_model_len);
        Serving {
            ttft: Histogram::new(&TTFT_BUCKETS),
            itl: Histogram::new(&ITL_BUCKETS),
            e2e: Histogram::new(&REQUEST_BUCKETS),
            queue: Histogram::new(&REQUEST_BUCKETS),
            request_prompt_tokens: Histogram::new(&tokens),
            request_generation_tokens: Histogram::new(&tokens),
            prompt_tokens: Counter::default(),
            generation_tokens: Counter::default(),
            success: Labeled::default(),
            failed: Counter::default(),
        }
    }

    /// The `vllm:` series, each labelled `model_name="<model>"`, with the gauges the API
    /// knows at render time: running and waiting requests, KV cache usage (0..1).
    pub fn render(&self, model: &str, running: usize, waiting: usize, kv_usage: f64) -> String {
        let mut o = String::new();
        let l = format!("model_name=\"{}\"", model.replace(['\\', '"', '\n'], "_"));
        let gauge = |o: &mut String, name: &str, help: &str, v: f64| {
            let _ = writeln!(
                o,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name}{{{l}}} {v}"
            );
        };
        let counter = |o: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(
                o,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name}{{{l}}} {v}"
            );
        };
        gauge(
            &mut o,
            "vllm:num_requests_running",
            "Number of requests in model execution batches.",
            running as f64,
        );
        gauge(
            &mut o,
            "vllm:num_requests_waiting",
            "Number of requests waiting to be processed.",
            waiting as f64,
        );
        gauge(
            &mut o,
            "vllm:kv_cache_usage_perc",
            "KV-cache usage. 1 means 100 percent usage.",
            kv_usage,
        );
        // the name vLLM used before v0.10 (V0 engine), which older Grafana boards still read
        gauge(
            &mut o,
            "vllm:gpu_cache_usage_perc",
            "KV-cache usage (vLLM V0 name, same value as vllm:kv_cache_usage_perc).",
            kv_usage,
        );
        counter(
            &mut o,
            "vllm:prompt_tokens_total",
            "Number of prefill tokens processed.",
            self.prompt_tokens.get(),
        );
        counter(
            &mut o,
            "vllm:generation_tokens_total",
            "Number of generation tokens processed.",
            self.generation_tokens.get(),
        );
        self.success.render_labeled(
            &mut o,
            "vllm:request_success_total",
            "Count of successfully processed requests.",
            &l,
        );
        counter(
            &mut o,
            "aiflow_api_request_failures_total",
            "Admitted API requests that ended in an error.",
            self.failed.get(),
        );
        self.ttft.render_labeled(
            &mut o,
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            &l,
        );
        self.itl.render_labeled(
            &mut o,
            "vllm:inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            &l,
        );
        self.e2e.render_labeled(
            &mut o,
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            &l,
        );
        self.queue.render_labeled(
            &mut o,
            "vllm:request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.",
            &l,
        );
        self.request_prompt_tokens.render_labeled(
            &mut o,
            "vllm:request_prompt_tokens",
            "Number of prefill tokens processed.",
            &l,
        );
        self.request_generation_tokens.render_labeled(
            &mut o,
            "vllm:request_generation_tokens",
            "Number of generation tokens processed.",
            &l,
        );
        o
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new(8192)
    }
}

impl Metrics {
    /// Metrics of a node serving a model with `max_model_len` positions (token-count
    /// histogram buckets go up to it, as vLLM's do).
    pub fn new(max_model_len: usize) -> Self {
        let lat = [
            0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        ];
        Self {
            requests: Counter::default(),
            request_errors: Counter::default(),
            tokens: Labeled::default(),
            escalations: Counter::default(),
            degraded: Counter::default(),
            parent_timeouts: Counter::default(),
            parent_slow_replies: Counter::default(),
            bytes_up: Counter::default(),
            backfill_bytes: Counter::default(),
            sessions_served: Counter::default(),
            request_latency: Histogram::new(&lat),
            ttft: Histogram::new(&lat),
            batch_size: Histogram::new(&[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0]),
            drafts_accepted: Counter::default(),
            drafts_proposed: Counter::default(),
            serving: Serving::new(max_model_len),
        }
    }

    /// Render in the Prometheus text format. `extra` lines (gauges) are appended.
    pub fn render(&self, extra: &[(&str, &str, f64)]) -> String {
        let mut o = String::new();
        let counter = |o: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        };
        counter(
            &mut o,
            "aiflow_requests_total",
            "Requests received at this entry node.",
            self.requests.get(),
        );
        counter(
            &mut o,
            "aiflow_request_errors_total",
            "Requests that ended in an error.",
            self.request_errors.get(),
        );
        counter(
            &mut o,
            "aiflow_escalations_total",
            "Steps this node escalated to its parent.",
            self.escalations.get(),
        );
        counter(
            &mut o,
            "aiflow_degraded_tokens_total",
            "Tokens answered locally because the parent failed.",
            self.degraded.get(),
        );
        counter(
            &mut o,
            "aiflow_parent_reply_timeouts_total",
            "Escalations whose reply missed its deadline.",
            self.parent_timeouts.get(),
        );
        counter(
            &mut o,
            "aiflow_parent_slow_replies_total",
            "Reply deadlines passed with the parent still alive (heard from): the wait went on.",
            self.parent_slow_replies.get(),
        );
        counter(
            &mut o,
            "aiflow_link_bytes_up_total",
            "Tensor bytes shipped to the parent.",
            self.bytes_up.get(),
        );
        counter(
            &mut o,
            "aiflow_link_backfill_bytes_total",
            "Tensor bytes that re-sent earlier positions' states to the parent (backfill).",
            self.backfill_bytes.get(),
        );
        counter(
            &mut o,
            "aiflow_child_sessions_total",
            "Sessions served for child nodes.",
            self.sessions_served.get(),
        );
        counter(
            &mut o,
            "aiflow_drafts_proposed_total",
            "Speculative draft tokens proposed.",
            self.drafts_proposed.get(),
        );
        counter(
            &mut o,
            "aiflow_drafts_accepted_total",
            "Speculative draft tokens accepted.",
            self.drafts_accepted.get(),
        );
        self.tokens.render(
            &mut o,
            "aiflow_tokens_total",
            "Generated tokens by the tier and exit that produced them.",
        );
        self.request_latency.render(
            &mut o,
            "aiflow_request_seconds",
            "End-to-end request latency.",
        );
        self.ttft
            .render(&mut o, "aiflow_ttft_seconds", "Time to first token.");
        self.batch_size.render(
            &mut o,
            "aiflow_engine_batch_sessions",
            "Sessions per engine batch.",
        );
        for (name, help, v) in extra {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        }
        o
    }
}

/// A Prometheus label value: backslash, double quote and newline escaped (node ids come
/// from peers).
fn label_value(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Sessions of each connected child against the per-peer limit: what an operator reads to
/// see a child hitting `max_sessions_per_peer` (its extra sessions are refused).
pub fn render_child_sessions(rows: &[crate::fleet::ChildSessions]) -> String {
    let mut o = String::new();
    if rows.is_empty() {
        return o;
    }
    let labels: Vec<String> = rows
        .iter()
        .map(|r| {
            format!(
                "child=\"{}\",role=\"{}\"",
                label_value(&r.child),
                label_value(&r.role)
            )
        })
        .collect();
    let _ = writeln!(
        o,
        "# HELP aiflow_child_sessions Sessions a connected child has open on this node.\n# TYPE aiflow_child_sessions gauge"
    );
    for (l, r) in labels.iter().zip(rows) {
        let _ = writeln!(o, "aiflow_child_sessions{{{l}}} {}", r.active);
    }
    let _ = writeln!(
        o,
        "# HELP aiflow_child_sessions_refused_total Sessions refused for going over the per-peer limit (per connection).\n# TYPE aiflow_child_sessions_refused_total counter"
    );
    for (l, r) in labels.iter().zip(rows) {
        let _ = writeln!(
            o,
            "aiflow_child_sessions_refused_total{{{l}}} {}",
            r.refused
        );
    }
    let _ = writeln!(
        o,
        "# HELP aiflow_child_sessions_limit Sessions one child may have open at once.\n# TYPE aiflow_child_sessions_limit gauge\naiflow_child_sessions_limit {}",
        rows[0].limit
    );
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn child_sessions_escape_peer_controlled_names() {
        let rows = [crate::fleet::ChildSessions {
            child: "dev\"1\n".into(),
            role: "device".into(),
            active: 3,
            refused: 2,
            limit: 64,
        }];
        let t = render_child_sessions(&rows);
        assert!(
            t.contains("aiflow_child_sessions{child=\"dev\\\"1\\n\",role=\"device\"} 3"),
            "{t}"
        );
        assert!(t.contains(
            "aiflow_child_sessions_refused_total{child=\"dev\\\"1\\n\",role=\"device\"} 2"
        ));
        assert!(t.contains("aiflow_child_sessions_limit 64"));
        assert!(render_child_sessions(&[]).is_empty());
    }

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        m.requests.inc();
        m.tokens.add("tier=\"edge\",exit=\"3\"".into(), 5);
        m.request_latency.observe(0.02);
        let t = m.render(&[("aiflow_queue_depth", "Engine queue depth.", 2.0)]);
        assert!(t.contains("aiflow_requests_total 1"));
        assert!(t.contains("aiflow_tokens_total{tier=\"edge\",exit=\"3\"} 5"));
        assert!(t.contains("aiflow_request_seconds_bucket{le=\"0.025\"} 1"));
        assert!(t.contains("aiflow_request_seconds_count 1"));
        assert!(t.contains("aiflow_queue_depth 2"));
    }

    #[test]
    fn renders_vllm_series_with_the_model_label() {
        let m = Metrics::new(8192);
        m.serving.ttft.observe(0.03);
        m.serving.generation_tokens.add(7);
        m.serving.success.add("finished_reason=\"stop\"".into(), 1);
        let t = m.serving.render("smol", 2, 1, 0.25);
        assert!(t.contains("vllm:num_requests_running{model_name=\"smol\"} 2"));
        assert!(t.contains("vllm:num_requests_waiting{model_name=\"smol\"} 1"));
        assert!(t.contains("vllm:kv_cache_usage_perc{model_name=\"smol\"} 0.25"));
        assert!(t.contains("vllm:gpu_cache_usage_perc{model_name=\"smol\"} 0.25"));
        assert!(t.contains("vllm:generation_tokens_total{model_name=\"smol\"} 7"));
        assert!(t.contains(
            "vllm:request_success_total{model_name=\"smol\",finished_reason=\"stop\"} 1"
        ));
        assert!(t.contains(
            "vllm:time_to_first_token_seconds_bucket{model_name=\"smol\",le=\"0.04\"} 1"
        ));
        assert!(t.contains("vllm:time_to_first_token_seconds_count{model_name=\"smol\"} 1"));
        assert!(t.contains("vllm:request_prompt_tokens_bucket{model_name=\"smol\",le=\"5000\"} 0"));
        assert!(
            !t.contains("le=\"10000\""),
            "token buckets stop at the context"
        );
    }
}
