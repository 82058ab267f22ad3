"""The official `openai` Python client against a 3-tier aiflow cluster (device API).

Usage: python3 tests/openai_client.py HOST:PORT [DEEPEST_EXIT]
Run by .ci/run against `flow-node cluster` twice: on the toy family and on
SmolLM2-135M-Instruct (`--model smollm2-135m-instruct`, deepest exit 29).
"""
import sys

import openai

base = sys.argv[1]
client = openai.OpenAI(base_url=f"http://{base}/v1", api_key="unused", max_retries=0, timeout=60)
passed = failed = 0


def check(name, cond, detail=""):
    global passed, failed
    if cond:
        passed += 1
        print(f"ok   {name}")
    else:
        failed += 1
        print(f"FAIL {name} {detail}")


models = client.models.list()
check("models.list", len(models.data) == 1, models)
model = models.data[0].id
deepest = int(sys.argv[2]) if len(sys.argv) > 2 else (7 if "small" in model else 5)

# Streaming chat completion, escalating through the tiers.
stream = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "12+34="}],
    max_tokens=8,
    temperature=0,
    stream=True,
    extra_body={"aiflow": {"mode": "route", "exit": deepest}},
)
chunks = list(stream)
content = [c for c in chunks if c.choices and c.choices[0].delta.content]
check("chat stream yields content chunks", len(content) >= 1, chunks[:3])
check("chat stream ends with a finish reason",
      any(c.choices and c.choices[0].finish_reason in ("stop", "length") for c in chunks))
tiers = {getattr(c, "aiflow", None) and c.aiflow.get("tier") for c in content}
check("tokens came from the cloud tier", tiers == {"cloud"}, tiers)

# Same request without streaming: same text (greedy).
full = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "12+34="}],
    max_tokens=8,
    temperature=0,
    extra_body={"aiflow": {"mode": "route", "exit": deepest}},
)
streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
check("non-streamed text equals streamed text", full.choices[0].message.content == streamed,
      (full.choices[0].message.content, streamed))
check("usage reported", full.usage.completion_tokens >= 1 and full.usage.prompt_tokens > 0, full.usage)
ext = full.model_extra.get("aiflow", {})
check("aiflow extension reports bytes and hops", ext.get("bytes_up", 0) > 0 and ext.get("hops", 0) >= 1, ext)

# Plain completions in speculative mode.
comp = client.completions.create(model=model, prompt="7+5=", max_tokens=6, temperature=0,
                                 extra_body={"aiflow": {"mode": "speculate", "draft_len": 3}})
check("completions returns text", isinstance(comp.choices[0].text, str) and comp.usage.completion_tokens >= 1, comp)

# Bad input is a clear 400, not a hang.
try:
    client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}],
                                   extra_body={"aiflow": {"mode": "teleport"}})
    check("unknown mode is rejected", False)
except openai.BadRequestError as e:
    check("unknown mode is rejected", "teleport" in str(e), e)

# Health and Prometheus metrics on the same server.
import urllib.request

health = urllib.request.urlopen(f"http://{base}/healthz", timeout=10).read().decode()
check("healthz", health.strip() == "ok", health)
metrics = urllib.request.urlopen(f"http://{base}/metrics", timeout=10).read().decode()
for name in ("aiflow_requests_total", "aiflow_tokens_total{", "aiflow_request_seconds_bucket",
             "aiflow_link_bytes_up_total", "aiflow_engine_queue_depth"):
    check(f"metrics has {name}", name in metrics)

print(f"openai client: {passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
