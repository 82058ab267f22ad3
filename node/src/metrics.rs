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
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut acc = 0;
        for (i, b) in self.bounds.iter().enumerate() {
            acc += self.counts[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {acc}");
        }
        acc += self.counts[self.bounds.len()].load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {acc}");
        let _ = writeln!(
            out,
            "{name}_sum {}",
            self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count {}", self.count.load(Ordering::Relaxed));
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
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        if let Ok(m) = self.0.lock() {
            for (l, v) in m.iter() {
                let _ = writeln!(out, "{name}{{{l}}} {v}");
            }
        }
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
    pub bytes_up: Counter,
    pub sessions_served: Counter,
    pub request_latency: Histogram,
    pub ttft: Histogram,
    pub batch_size: Histogram,
    pub drafts_accepted: Counter,
    pub drafts_proposed: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
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
            bytes_up: Counter::default(),
            sessions_served: Counter::default(),
            request_latency: Histogram::new(&lat),
            ttft: Histogram::new(&lat),
            batch_size: Histogram::new(&[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0]),
            drafts_accepted: Counter::default(),
            drafts_proposed: Counter::default(),
        }
    }
}

impl Metrics {
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
            "aiflow_link_bytes_up_total",
            "Tensor bytes shipped to the parent.",
            self.bytes_up.get(),
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
