"""Admission under overload: twice the capacity, nothing accepted is lost.

Usage: python3 tests/overload.py HOST:PORT
Run by .ci/run against `flow-node cluster --max-running 2 --max-waiting 2` (capacity: 2
generating + 2 queued). Fires 8 concurrent requests (2x capacity), three waves: every
request is either answered completely (200, finish_reason set, usage counted) or refused
at once with 429 and Retry-After in OpenAI's error shape; never a 5xx, a hang or a
truncated answer. The queue never exceeds its bound (vllm:num_requests_waiting).
"""
import json
import sys
import threading
import urllib.error
import urllib.request

base = sys.argv[1]
entry = json.load(urllib.request.urlopen(f"http://{base}/v1/models", timeout=30))["data"][0]
model, deepest = entry["id"], max(entry["aiflow"]["exits"])
results, lock = [], threading.Lock()


def one(i):
    body = json.dumps({"model": model, "prompt": f"{i}+{i}=", "max_tokens": 48,
                       "temperature": 0,
                       "aiflow": {"mode": "route", "exit": deepest}}).encode()
    req = urllib.request.Request(f"http://{base}/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            out = (r.status, json.loads(r.read()), {k.lower(): v for k, v in r.headers.items()})
    except urllib.error.HTTPError as e:
        out = (e.code, json.loads(e.read() or b"{}"), {k.lower(): v for k, v in e.headers.items()})
    with lock:
        results.append(out)


max_waiting = 0
for wave in range(3):
    threads = [threading.Thread(target=one, args=(wave * 8 + i,)) for i in range(8)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        text = urllib.request.urlopen(f"http://{base}/metrics", timeout=30).read().decode()
        for line in text.splitlines():
            if line.startswith("vllm:num_requests_waiting{"):
                max_waiting = max(max_waiting, float(line.rsplit(" ", 1)[1]))
    for t in threads:
        t.join()

ok = [r for r in results if r[0] == 200]
refused = [r for r in results if r[0] == 429]
other = [r for r in results if r[0] not in (200, 429)]
failed = []
if other:
    failed.append(f"unexpected statuses: {[(r[0], r[1]) for r in other]}")
if len(ok) + len(refused) != 24:
    failed.append(f"{len(results)} answers for 24 requests")
if not refused:
    failed.append("2x capacity produced no 429")
if len(ok) < 4:
    failed.append(f"only {len(ok)} requests served")
for status, body, _ in ok:
    c = body["choices"][0]
    if c["finish_reason"] not in ("stop", "length") or body["usage"]["completion_tokens"] < 1:
        failed.append(f"incomplete answer: {body}")
    if c["finish_reason"] == "length" and body["usage"]["completion_tokens"] != 48:
        failed.append(f"truncated answer: {body['usage']}")
for status, body, headers in refused:
    if "retry-after" not in headers or body.get("error", {}).get("type") != "rate_limit_error":
        failed.append(f"429 without Retry-After or OpenAI's shape: {headers} {body}")
if max_waiting > 2:
    failed.append(f"queue grew to {max_waiting} (bound 2)")
print(f"overload: {len(ok)} served, {len(refused)} refused with 429, max waiting {max_waiting:.0f}")
for f in failed:
    print("FAIL", f)
sys.exit(1 if failed else 0)
