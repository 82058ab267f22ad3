//! What a node looks like at one instant: resident memory from `/proc`, and the gauges of
//! its own `/metrics` page. Parsing only; the reading happens in `flow-node testbed probe`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// `/metrics` gauge: sessions holding KV on the node.
pub const SESSIONS: &str = "aiflow_engine_sessions";
/// `/metrics` gauge: KV cache bytes reserved on the node.
pub const KV_BYTES: &str = "aiflow_engine_kv_bytes";
/// `/metrics` gauge: API requests in model execution.
pub const RUNNING: &str = "vllm:num_requests_running";
/// `/metrics` gauge: API requests waiting for admission.
pub const WAITING: &str = "vllm:num_requests_waiting";
/// The gauges a soak reads, in report order. All must be back to zero at the end.
pub const GAUGES: [&str; 4] = [SESSIONS, KV_BYTES, RUNNING, WAITING];

/// One reading taken inside a node's container (the output of `flow-node testbed probe`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Probe {
    /// `VmRSS` of the node process, KiB.
    pub rss_kb: Option<u64>,
    /// Start time of the node process (`/proc/PID/stat` field 22, clock ticks since boot):
    /// a different value means the node was restarted between two readings.
    pub start_ticks: Option<u64>,
    /// The [`GAUGES`] found on `/metrics` (a series with labels is summed over them).
    pub gauges: BTreeMap<String, f64>,
    /// What could not be read, if anything (`/metrics` unreachable, ...).
    pub error: Option<String>,
}

impl Probe {
    /// A probe from the texts of `/proc/PID/status`, `/proc/PID/stat` and `/metrics`
    /// (`None` when that part could not be read).
    pub fn from_texts(status: Option<&str>, stat: Option<&str>, metrics: Option<&str>) -> Self {
        Self {
            rss_kb: status.and_then(vm_rss_kb),
            start_ticks: stat.and_then(start_ticks),
            gauges: metrics.map(|m| gauges(m, &GAUGES)).unwrap_or_default(),
            error: None,
        }
    }
}

/// One node at one instant, as a soak records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeSample {
    /// Seconds since the load started (negative before).
    pub t_s: f64,
    /// Node (compose service) name.
    pub node: String,
    /// The reading; `error` says why parts are missing (a killed node has no reading).
    pub probe: Probe,
}

impl NodeSample {
    /// A gauge's value, when it was read.
    pub fn gauge(&self, name: &str) -> Option<f64> {
        self.probe.gauges.get(name).copied()
    }
}

/// `VmRSS` in KiB from the text of `/proc/PID/status`.
pub fn vm_rss_kb(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let mut it = line["VmRSS:".len()..].split_whitespace();
    let n: u64 = it.next()?.parse().ok()?;
    match it.next() {
        Some("kB") | None => Some(n),
        Some(_) => None,
    }
}

/// Field 22 (`starttime`) of `/proc/PID/stat`. The command name (field 2) is in
/// parentheses and may contain spaces, so fields are counted after the last `)`.
pub fn start_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // after ")" come field 3 (state) onwards: starttime is the 20th of them
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// The values of the named series in Prometheus text, each summed over its label sets.
/// Names not present are absent from the result; unparsable values are skipped.
pub fn gauges(text: &str, names: &[&str]) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let name = series.split('{').next().unwrap_or(series).trim();
        if !names.contains(&name) {
            continue;
        }
        if let Ok(v) = value.trim().parse::<f64>() {
            if v.is_finite() {
                *out.entry(name.to_string()).or_insert(0.0) += v;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rss_and_start_time_come_from_proc() {
        let status = "Name:\tflow-node\nVmPeak:\t  900 kB\nVmRSS:\t   51234 kB\nThreads:\t9\n";
        assert_eq!(vm_rss_kb(status), Some(51234));
        assert_eq!(vm_rss_kb("Name:\tx\n"), None);
        assert_eq!(vm_rss_kb("VmRSS:\tlots kB\n"), None);
        let stat = "1 (flow node) S 0 1 1 0 -1 4194560 5 0 0 0 3 1 0 0 20 0 9 0 123456 \
                    1000 200 18446744073709551615";
        assert_eq!(start_ticks(stat), Some(123456));
        assert_eq!(start_ticks("1 (x) S 0"), None);
        assert_eq!(start_ticks("garbage"), None);
    }

    #[test]
    fn gauges_are_summed_over_labels() {
        let text = "# HELP vllm:num_requests_running x\n# TYPE vllm:num_requests_running gauge\n\
                    vllm:num_requests_running{model_name=\"a\"} 2\n\
                    vllm:num_requests_running{model_name=\"b\"} 1\n\
                    aiflow_engine_sessions 3\n\
                    aiflow_engine_sessions_total 99\n\
                    aiflow_engine_kv_bytes NaN\n\
                    aiflow_engine_kv_bytes_x 5\n";
        let g = gauges(text, &GAUGES);
        assert_eq!(g.get(RUNNING), Some(&3.0));
        assert_eq!(g.get(SESSIONS), Some(&3.0));
        assert_eq!(g.get(KV_BYTES), None);
        assert_eq!(g.get(WAITING), None);
        let p = Probe::from_texts(Some("VmRSS: 10 kB\n"), None, Some(text));
        assert_eq!((p.rss_kb, p.start_ticks), (Some(10), None));
        assert_eq!(p.gauges.len(), 2);
    }
}
