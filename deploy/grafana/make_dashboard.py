"""Writes deploy/grafana/aiflow.json, the Grafana dashboard of an aiflow cluster.

Usage: python3 deploy/grafana/make_dashboard.py
Panels use vLLM's series names (so they sit beside existing vLLM boards) and aiflow's
per-tier, per-exit and per-link series. tests/prometheus_scrape.py evaluates every panel's
query against a real Prometheus scraping a running cluster.
"""
import json
from pathlib import Path

DS = {"type": "prometheus", "uid": "${datasource}"}


def q(expr, legend):
    return {"expr": expr, "legendFormat": legend, "datasource": DS}


def hq(metric, quantile, by="model_name"):
    return (f"histogram_quantile({quantile}, sum by (le, {by}) "
            f"(rate({metric}_bucket[$__rate_interval])))")


PANELS = [
    ("Time to first token (p50 / p99)", "s", [
        q(hq("vllm:time_to_first_token_seconds", 0.5), "p50 {{model_name}}"),
        q(hq("vllm:time_to_first_token_seconds", 0.99), "p99 {{model_name}}")]),
    ("Inter-token latency (p50 / p99)", "s", [
        q(hq("vllm:inter_token_latency_seconds", 0.5), "p50 {{model_name}}"),
        q(hq("vllm:inter_token_latency_seconds", 0.99), "p99 {{model_name}}")]),
    ("End-to-end latency (p50 / p95)", "s", [
        q(hq("vllm:e2e_request_latency_seconds", 0.5), "p50 {{model_name}}"),
        q(hq("vllm:e2e_request_latency_seconds", 0.95), "p95 {{model_name}}")]),
    ("Queue time (mean)", "s", [
        q("rate(vllm:request_queue_time_seconds_sum[$__rate_interval]) / "
          "rate(vllm:request_queue_time_seconds_count[$__rate_interval])", "{{model_name}}")]),
    ("Requests running / waiting", "short", [
        q("vllm:num_requests_running", "running {{instance}}"),
        q("vllm:num_requests_waiting", "waiting {{instance}}")]),
    ("Token throughput", "short", [
        q("rate(vllm:prompt_tokens_total[$__rate_interval])", "prompt tok/s"),
        q("rate(vllm:generation_tokens_total[$__rate_interval])", "generated tok/s")]),
    ("KV cache usage", "percentunit", [
        q("vllm:kv_cache_usage_perc", "{{instance}}")]),
    ("Finished requests by reason", "reqps", [
        q("sum by (finished_reason) (rate(vllm:request_success_total[$__rate_interval]))",
          "{{finished_reason}}")]),
    ("Tokens by tier and exit (who answered)", "short", [
        q("sum by (tier, exit) (rate(aiflow_tokens_total[$__rate_interval]))",
          "{{tier}} exit {{exit}}")]),
    ("Escalations and degraded tokens", "short", [
        q("sum by (instance) (rate(aiflow_escalations_total[$__rate_interval]))",
          "escalations/s {{instance}}"),
        q("sum by (instance) (rate(aiflow_degraded_tokens_total[$__rate_interval]))",
          "degraded tok/s {{instance}}")]),
    ("Link RTT", "ms", [
        q("aiflow_link_rtt_ms", "{{instance}} → {{parent}}")]),
    ("Link goodput", "bps", [
        q("aiflow_link_goodput_bps", "{{instance}} → {{parent}}")]),
    ("Bytes to parents (all / backfill)", "Bps", [
        q("sum by (instance) (rate(aiflow_link_bytes_up_total[$__rate_interval]))",
          "all {{instance}}"),
        q("sum by (instance) (rate(aiflow_link_backfill_bytes_total[$__rate_interval]))",
          "backfill {{instance}}")]),
    ("Speculative drafts accepted", "percentunit", [
        q("rate(aiflow_drafts_accepted_total[$__rate_interval]) / "
          "rate(aiflow_drafts_proposed_total[$__rate_interval])", "{{instance}}")]),
]


def dashboard():
    panels = []
    for i, (title, unit, targets) in enumerate(PANELS):
        panels.append({
            "id": i + 1,
            "type": "timeseries",
            "title": title,
            "datasource": DS,
            "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
            "targets": [dict(t, refId=chr(65 + j)) for j, t in enumerate(targets)],
        })
    return {
        "title": "aiflow",
        "uid": "aiflow-overview",
        "tags": ["aiflow", "vllm", "llm"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-30m", "to": "now"},
        "templating": {"list": [{
            "name": "datasource", "type": "datasource", "query": "prometheus",
            "label": "Prometheus", "current": {}}]},
        "panels": panels,
    }


if __name__ == "__main__":
    out = Path(__file__).with_name("aiflow.json")
    out.write_text(json.dumps(dashboard(), indent=2) + "\n")
    print(f"wrote {out} ({len(PANELS)} panels)")
