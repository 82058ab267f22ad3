"""A real Prometheus (Debian package `prometheus`) scrapes a running aiflow entry node.

Usage: python3 tests/prometheus_scrape.py HOST:PORT
Run by .ci/run against `flow-node cluster --model smollm2-135m-instruct`. Checks the shipped
scrape config with promtool, starts Prometheus scraping HOST:PORT every second, sends a few
requests, then through Prometheus' HTTP API: the target is up, `vllm:generation_tokens_total`
with the served `model_name` reached what the requests generated, and every query of the
shipped Grafana dashboard (deploy/grafana/aiflow.json) evaluates, the core ones non-empty.
"""
import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

root = Path(__file__).resolve().parent.parent
target = sys.argv[1]
passed = failed = 0


def check(name, cond, detail=""):
    global passed, failed
    if cond:
        passed += 1
        print(f"ok   {name}")
    else:
        failed += 1
        print(f"FAIL {name} {detail}")


def get(url, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read().decode())


subprocess.run(["promtool", "check", "config", str(root / "deploy/prometheus/prometheus.yml")],
               check=True, stdout=subprocess.DEVNULL)
check("shipped scrape config passes promtool", True)

model = get(f"http://{target}/v1/models")["data"][0]["id"]
generated = 0
for i in range(3):
    r = get(f"http://{target}/v1/completions",
            {"model": model, "prompt": f"Count to {i + 3}:", "max_tokens": 4, "temperature": 0})
    generated += r["usage"]["completion_tokens"]

with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
tmp = tempfile.mkdtemp(prefix="aiflow-prom-")
# YAML is a superset of JSON: the same job as the shipped file, aimed at this node.
config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
          "scrape_configs": [{"job_name": "aiflow", "metrics_path": "/metrics",
                              "static_configs": [{"targets": [target], "labels": {"tier": "device"}}]}]}
Path(tmp, "prometheus.yml").write_text(json.dumps(config))
prom = subprocess.Popen(["prometheus", f"--config.file={tmp}/prometheus.yml",
                         f"--storage.tsdb.path={tmp}/data", f"--web.listen-address=127.0.0.1:{port}"],
                        stdout=subprocess.DEVNULL, stderr=open(f"{tmp}/prometheus.log", "w"))
api = f"http://127.0.0.1:{port}/api/v1"


def query(expr):
    return get(f"{api}/query?" + urllib.parse.urlencode({"query": expr}))


try:
    up = False
    for _ in range(120):
        try:
            targets = get(f"{api}/targets")["data"]["activeTargets"]
            if targets and targets[0]["health"] == "up":
                up = True
                break
        except OSError:
            pass
        time.sleep(0.5)
    check("Prometheus scrapes the node (target up)", up)
    value = 0.0
    series = f'vllm:generation_tokens_total{{model_name="{model}"}}'
    for _ in range(60):
        res = query(series)["data"]["result"]
        if res and float(res[0]["value"][1]) >= generated:
            value = float(res[0]["value"][1])
            break
        time.sleep(0.5)
    check(f"{series} through Prometheus >= {generated}", value >= generated, value)
    time.sleep(3)  # a few scrapes, so rate() has two samples
    must_have_data = ("vllm:num_requests_running", "aiflow_tokens_total", "vllm:kv_cache_usage_perc",
                      "aiflow_link_rtt_ms", "rate(vllm:generation_tokens_total")
    board = json.loads((root / "deploy/grafana/aiflow.json").read_text())
    for panel in board["panels"]:
        for t in panel["targets"]:
            expr = t["expr"].replace("$__rate_interval", "1m")
            r = query(expr)
            ok = r.get("status") == "success"
            if ok and any(m in expr for m in must_have_data):
                ok = len(r["data"]["result"]) > 0
            check(f"dashboard query evaluates: {panel['title']} [{t['refId']}]", ok, (expr, r))
finally:
    prom.terminate()
    prom.wait(timeout=30)

print(f"prometheus: {passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
