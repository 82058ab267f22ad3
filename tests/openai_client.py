"""The official `openai` Python client against a 3-tier aiflow cluster (device API).

Usage: [AIFLOW_API_KEY=KEY [AIFLOW_API_KEY_PROBES=1]] [AIFLOW_CLI=flow-node AIFLOW_CLI_MODEL=MODEL]
       python3 tests/openai_client.py HOST:PORT [DEEPEST_EXIT]
Run by .ci/run against `flow-node cluster` twice: on the toy family (started with
--api-key, so the key checks run) and on SmolLM2-135M-Instruct
(`--model smollm2-135m-instruct`, deepest exit 29). Covers OpenAI parity: unknown
model, n, logprobs, seed, stop strings across tokens, max_completion_tokens,
stream_options.include_usage, refused parameters, /health, /tokenize, /detokenize,
vLLM metrics, and bad input over raw HTTP (413, invalid UTF-8, wrong types); over raw SSE:
streamed completions with n=2, stop strings and usage, streamed chat logprobs; logprobs
from the exit that produced the token; /v1/models fields; with AIFLOW_CLI, the CLI and
the API tokenize and continue a prompt alike (one BOS rule).
"""
import json
import os
import sys
import urllib.error
import urllib.request

import openai

base = sys.argv[1]
key = os.environ.get("AIFLOW_API_KEY")
client = openai.OpenAI(base_url=f"http://{base}/v1", api_key=key or "unused", max_retries=0, timeout=60)
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


def raw(path, body=None, headers=None, auth=True):
    """(status, parsed JSON or text) of a raw HTTP request."""
    h = {"Content-Type": "application/json", **(headers or {})}
    if key and auth:
        h["Authorization"] = f"Bearer {key}"
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    req = urllib.request.Request(f"http://{base}{path}", data=data, headers=h)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            status, text = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode()
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


route = {"aiflow": {"mode": "route", "exit": deepest}}
chat_msgs = [{"role": "user", "content": "Name three colours."}]

# Unknown model: 404 naming what is served.
try:
    client.chat.completions.create(model="gpt-4", messages=chat_msgs, max_tokens=2)
    check("unknown model is 404", False)
except openai.NotFoundError as e:
    check("unknown model is 404 naming the served model", model in str(e), e)

# n choices; greedy choices agree.
r = client.chat.completions.create(model=model, messages=chat_msgs, max_tokens=6, temperature=0, n=2,
                                   extra_body=route)
check("n=2 gives two choices", [c.index for c in r.choices] == [0, 1], r.choices)
check("greedy choices agree", r.choices[0].message.content == r.choices[1].message.content, r.choices)
check("usage counts both choices", r.usage.completion_tokens == sum(
    c.model_extra["aiflow"]["completion_tokens"] for c in r.choices), r.usage)

# logprobs / top_logprobs from the tier that produced each token.
r = client.chat.completions.create(model=model, messages=chat_msgs, max_tokens=5, temperature=0,
                                   logprobs=True, top_logprobs=3, extra_body=route)
lp = r.choices[0].logprobs.content
check("one logprob entry per token", len(lp) == r.usage.completion_tokens, lp)
check("three alternatives each", all(len(t.top_logprobs) == 3 for t in lp), lp)
check("greedy token is the most likely alternative",
      all(abs(t.logprob - t.top_logprobs[0].logprob) < 1e-6 and t.logprob <= 0 for t in lp), lp)
check("token bytes match token text", all(bytes(t.bytes).decode("utf-8", "replace") == t.token for t in lp), lp)
comp = client.completions.create(model=model, prompt="The sky is", max_tokens=4, temperature=0, logprobs=2,
                                 extra_body=route)
clp = comp.choices[0].logprobs
check("completions logprobs", len(clp.tokens) == len(clp.token_logprobs) == len(clp.top_logprobs)
      == comp.usage.completion_tokens and all(len(t) <= 2 for t in clp.top_logprobs), clp)
echo = client.completions.create(model=model, prompt="The sky is", max_tokens=3, temperature=0, echo=True,
                                 extra_body=route)
check("echo returns the prompt first", echo.choices[0].text.startswith("The sky is"), echo.choices[0].text)

# seed: the same seed samples the same text.
a, b = (client.completions.create(model=model, prompt="Once upon a time", max_tokens=8, temperature=1.0,
                                  seed=7, extra_body=route).choices[0].text for _ in range(2))
check("same seed, same sample", a == b, (a, b))

# stop strings, matched across token boundaries and not returned.
count_prompt = "1, 2, 3, 4," if deepest > 10 else "123+456="
full = client.completions.create(model=model, prompt=count_prompt, max_tokens=12, temperature=0,
                                 extra_body=route).choices[0].text
mid = len(full) // 2
stop = full[mid:mid + 3] if len(full) >= 2 else None
if stop:
    cut = client.completions.create(model=model, prompt=count_prompt, max_tokens=12, temperature=0,
                                    stop=[stop], extra_body=route)
    check("stop string cuts before it", cut.choices[0].text == full[:full.index(stop)]
          and cut.choices[0].finish_reason == "stop", (full, stop, cut.choices[0].text))
else:
    check("greedy text long enough for the stop test", False, full)

# max_completion_tokens.
r = client.chat.completions.create(model=model, messages=chat_msgs, max_completion_tokens=3, temperature=0,
                                   extra_body=route)
check("max_completion_tokens bounds the answer", r.usage.completion_tokens <= 3, r.usage)

# stream_options.include_usage: a final chunk with usage and no choices.
chunks = list(client.chat.completions.create(model=model, messages=chat_msgs, max_tokens=4, temperature=0,
                                             stream=True, stream_options={"include_usage": True},
                                             extra_body=route))
check("usage chunk last, choices empty", chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1,
      chunks[-1])
check("other chunks carry usage null", all(c.usage is None for c in chunks[:-1]))

# Parameters we do not implement are refused by name, never ignored.
for name, kwargs in [("response_format", {"response_format": {"type": "json_object"}}),
                     ("logit_bias", {"logit_bias": {"42": 3}}),
                     ("frobnicate", {"extra_body": {"frobnicate": 1}})]:
    try:
        client.chat.completions.create(model=model, messages=chat_msgs, max_tokens=2, **kwargs)
        check(f"{name} refused", False)
    except openai.BadRequestError as e:
        check(f"{name} refused with a 400 naming it", name in str(e), e)

# /tokenize and /detokenize agree with the generation endpoints.
st, tok = raw("/tokenize", {"prompt": "Hello world"})
check("tokenize", st == 200 and tok["count"] == len(tok["tokens"]) > 0, tok)
st, de = raw("/detokenize", {"tokens": tok["tokens"]})
check("detokenize round-trips", st == 200 and de["prompt"].endswith("Hello world"), de)

# Bad input over raw HTTP: a clear 4xx each, and the server keeps serving.
st, body = raw("/v1/completions", b"x" * (5 << 20))
check("oversize body is 413", st == 413 and "limit" in body["error"]["message"], (st, body))
st, body = raw("/v1/completions", b'{"prompt": "' + bytes([0xFF]) + b'"}')
check("invalid UTF-8 is 400", st == 400, (st, body))
st, body = raw("/v1/completions", {"prompt": "x", "max_tokens": "many"})
check("wrong type names the parameter", st == 400 and body["error"]["param"] == "max_tokens", body)
st, body = raw("/v1/completions", {"prompt": "x", "max_tokens": 10 ** 9})
check("huge max_tokens is a context error", st == 400 and "context" in body["error"]["message"], body)
st, body = raw("/v1/completions", {"prompt": "x", "temperature": -1})
check("negative temperature is 400", st == 400 and body["error"]["param"] == "temperature", body)
if key:
    st, body = raw("/v1/models", auth=False)
    check("no API key is 401", st == 401 and body["error"]["code"] == "invalid_api_key", (st, body))
    st, body = raw("/v1/models", headers={"Authorization": "Bearer wrong"}, auth=False)
    check("wrong API key is 401", st == 401, (st, body))
    if os.environ.get("AIFLOW_API_KEY_PROBES") != "1":
        st, _ = raw("/health", auth=False)
        check("health stays open without the key", st == 200)
check("still serving after bad input",
      client.completions.create(model=model, prompt="ok", max_tokens=1, extra_body=route).usage.completion_tokens == 1)


def sse(path, body):
    """The `data:` payloads of a raw SSE response, parsed (the final `[DONE]` kept as is)."""
    h = {"Content-Type": "application/json", "Accept": "text/event-stream"}
    if key:
        h["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(f"http://{base}{path}", data=json.dumps({**body, "stream": True}).encode(),
                                 headers=h)
    with urllib.request.urlopen(req, timeout=120) as r:
        ctype = r.headers.get("Content-Type", "")
        events = [line[len("data:"):].strip() for line in r.read().decode().splitlines()
                  if line.startswith("data:")]
    check(f"{path} streams text/event-stream", ctype.startswith("text/event-stream"), ctype)
    check(f"{path} stream ends with [DONE]", events and events[-1] == "[DONE]", events[-2:])
    return [json.loads(e) for e in events[:-1]]


def streamed_text(chunks, index=0, chat=False):
    out = ""
    for c in chunks:
        for ch in c["choices"]:
            if ch["index"] == index:
                out += (ch["delta"].get("content") or "") if chat else (ch.get("text") or "")
    return out


def finishes(chunks):
    return {ch["index"]: ch["finish_reason"] for c in chunks for ch in c["choices"] if ch["finish_reason"]}


# Streaming over raw SSE: completions, n > 1, stop strings, logprobs and usage while streaming.
greedy_r = client.completions.create(model=model, prompt=count_prompt, max_tokens=8, temperature=0,
                                     extra_body=route)
greedy = greedy_r.choices[0]
chunks = sse("/v1/completions", {"model": model, "prompt": count_prompt, "max_tokens": 8, "temperature": 0,
                                 "n": 2, "stream_options": {"include_usage": True}, **route})
check("streamed completions, n=2: each choice equals the non-streamed text",
      [streamed_text(chunks, i) for i in (0, 1)] == [greedy.text] * 2, (greedy.text, chunks[:4]))
check("streamed completions, n=2: both choices finish", set(finishes(chunks)) == {0, 1}, finishes(chunks))
check("streamed completions: usage chunk last with choices empty, both choices counted",
      chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"]
      == 2 * greedy_r.usage.completion_tokens, chunks[-1])
check("streamed completions: token chunks name their tier and exit",
      all(c["aiflow"]["tier"] == "cloud" and c["aiflow"]["exit"] == deepest for c in chunks
          if c["choices"] and c["choices"][0].get("text") and c["choices"][0]["finish_reason"] is None), chunks[:3])
if stop:
    chunks = sse("/v1/completions", {"model": model, "prompt": count_prompt, "max_tokens": 12, "temperature": 0,
                                     "stop": [stop], **route})
    check("streamed stop string: the same cut as without streaming",
          streamed_text(chunks) == full[:full.index(stop)] and finishes(chunks) == {0: "stop"},
          (full, stop, streamed_text(chunks)))
chunks = sse("/v1/chat/completions", {"model": model, "messages": chat_msgs, "max_tokens": 4, "temperature": 0,
                                      "logprobs": True, "top_logprobs": 2,
                                      "stream_options": {"include_usage": True}, **route})
lp = [t for c in chunks for ch in c["choices"] if ch.get("logprobs") for t in ch["logprobs"]["content"]]
text = streamed_text(chunks, chat=True)
# one entry per generated token, the end-of-turn token included (it has no text)
check("streamed chat logprobs: one entry per token, two alternatives each, tokens spell the text",
      len(lp) == chunks[-1]["usage"]["completion_tokens"] and all(len(t["top_logprobs"]) == 2 for t in lp)
      and "".join(t["token"] for t in lp).startswith(text), (text, lp))

# Each token's logprob comes from the exit that produced it: with threshold 0 every token is
# answered at the first exit that sees it; its first token's logprob equals that exit's own.
esc = list(client.chat.completions.create(model=model, messages=chat_msgs, max_tokens=3, temperature=0,
                                          stream=True, logprobs=True,
                                          extra_body={"aiflow": {"mode": "escalate", "threshold": 0.0}}))
first = next(c for c in esc if c.choices and c.choices[0].logprobs and c.choices[0].logprobs.content)
exit_, tier = first.aiflow["exit"], first.aiflow["tier"]
check("escalate at threshold 0 answers below the deepest exit", exit_ < deepest and tier != "cloud", first.aiflow)
one = client.chat.completions.create(model=model, messages=chat_msgs, max_tokens=1, temperature=0, logprobs=True,
                                     extra_body={"aiflow": {"mode": "route", "exit": exit_}})
a, b = first.choices[0].logprobs.content[0], one.choices[0].logprobs.content[0]
check("an early token's logprob is its own exit's", a.token == b.token and abs(a.logprob - b.logprob) < 1e-4,
      (exit_, a, b))

# /v1/models: context length and the family's exits.
st, ms = raw("/v1/models")
m0 = ms["data"][0] if st == 200 else {}
check("/v1/models gives the context length and the exits",
      m0.get("context_length", 0) > 0 and m0.get("max_model_len") == m0.get("context_length")
      and m0.get("aiflow", {}).get("exits", [])[-1:] == [deepest], m0)

# One BOS rule everywhere: `flow-node model run` and the API read the same prompt tokens and
# continue it the same way (set AIFLOW_CLI to the binary and AIFLOW_CLI_MODEL to the model).
cli, cli_model = os.environ.get("AIFLOW_CLI"), os.environ.get("AIFLOW_CLI_MODEL")
if cli and cli_model:
    import subprocess
    for chat in (False, True):
        prompt = "Name three colours." if chat else count_prompt
        out = subprocess.run([cli, "model", "run", cli_model, "--prompt", prompt, "--max-tokens", "6", "--json"]
                             + (["--chat"] if chat else []), capture_output=True, text=True, timeout=600)
        rep = json.loads(out.stdout) if out.returncode == 0 else {}
        body = {"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt}
        st, tok = raw("/tokenize", body)
        if chat:
            api = client.chat.completions.create(model=model, messages=body["messages"], max_tokens=6,
                                                 temperature=0, extra_body=route).choices[0].message.content
        else:
            api = client.completions.create(model=model, prompt=prompt, max_tokens=6, temperature=0,
                                             extra_body=route).choices[0].text
        what = "chat" if chat else "completion"
        check(f"CLI and /tokenize count the same prompt tokens ({what})",
              rep.get("prompt_tokens") == tok.get("count"), (out.stderr[-500:], rep, tok))
        check(f"CLI and API continue the prompt the same way ({what})", rep.get("text") == api, (rep, api))

# Health and Prometheus metrics on the same server (behind the key with --api-key-probes).
probes_locked = os.environ.get("AIFLOW_API_KEY_PROBES") == "1"
st, health = raw("/health", auth=False)
if probes_locked:
    check("/health without the key is 401 under --api-key-probes", st == 401, (st, health))
    st, mt = raw("/metrics", auth=False)
    check("/metrics without the key is 401 under --api-key-probes", st == 401, (st, mt))
    st, health = raw("/health")
check("/health is 200 when ready", st == 200, (st, health))
probe_h = {"Authorization": f"Bearer {key}"} if probes_locked else {}
health = urllib.request.urlopen(urllib.request.Request(f"http://{base}/healthz", headers=probe_h),
                                timeout=10).read().decode()
check("healthz", health.strip() == "ok", health)
metrics = urllib.request.urlopen(urllib.request.Request(f"http://{base}/metrics", headers=probe_h),
                                 timeout=10).read().decode()
for name in ("aiflow_requests_total", "aiflow_tokens_total{", "aiflow_request_seconds_bucket",
             "aiflow_link_bytes_up_total", "aiflow_engine_queue_depth",
             f'vllm:generation_tokens_total{{model_name="{model}"}}',
             "vllm:time_to_first_token_seconds_bucket", "vllm:inter_token_latency_seconds_bucket",
             "vllm:e2e_request_latency_seconds_bucket", "vllm:request_queue_time_seconds_bucket",
             "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
             "vllm:prompt_tokens_total", "vllm:request_success_total"):
    check(f"metrics has {name}", name in metrics)

print(f"openai client: {passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
