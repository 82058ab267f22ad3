"""Single node vs device → edge → cloud as three separate `flow-node` processes (QUIC +
mutual TLS on loopback), escalate-always, on the same GGUF model: decode tokens/s through
the OpenAI API (streaming), alternating the two per request; medians over rounds.
The split's text must equal the single node's (DESIGN.md I2).

Usage: python3 split_processes.py SINGLE_HOST:PORT SPLIT_HOST:PORT [ROUNDS] [MAX_TOKENS]
(the commands that start the four processes are in docs/benchmarks.md).
"""
import json
import statistics
import sys
import time
import urllib.request

PROMPTS = [
    "Name three primary colors.",
    "Write a haiku about the sea.",
    "What is the capital of France?",
    "Give me two tips for sleeping well.",
]


def model_id(base):
    with urllib.request.urlopen(f"http://{base}/v1/models", timeout=30) as r:
        return json.load(r)["data"][0]["id"]


def stream(base, prompt, aiflow, max_tokens):
    body = json.dumps({
        "model": model_id(base), "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens, "temperature": 0, "stream": True, "aiflow": aiflow,
    }).encode()
    req = urllib.request.Request(f"http://{base}/v1/chat/completions", body,
                                 {"Content-Type": "application/json"})
    times, text = [], []
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=300) as r:
        for line in r:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            c = json.loads(line[6:])
            if not c.get("choices"):
                continue
            d = c["choices"][0].get("delta", {}).get("content")
            if d:
                times.append(time.perf_counter())
                text.append(d)
    n = len(times)
    decode = (n - 1) / (times[-1] - times[0]) if n > 1 else 0.0
    return "".join(text), decode, (times[0] - t0) if times else 0.0


def main():
    single, split = sys.argv[1], sys.argv[2]
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 5
    max_tokens = int(sys.argv[4]) if len(sys.argv) > 4 else 32
    res = {"single": [], "split": []}
    ttft = {"single": [], "split": []}
    mismatches = 0
    for _ in range(rounds):
        for p in PROMPTS:
            a, da, ta = stream(single, p, {"mode": "local"}, max_tokens)
            b, db, tb = stream(split, p, {"mode": "escalate", "threshold": 2.0}, max_tokens)
            mismatches += a != b
            res["single"].append(da)
            res["split"].append(db)
            ttft["single"].append(ta)
            ttft["split"].append(tb)
    s, m = statistics.median(res["single"]), statistics.median(res["split"])
    print(f"single node: decode {s:.1f} tok/s (median of {len(res['single'])}), "
          f"TTFT {1e3 * statistics.median(ttft['single']):.0f} ms")
    print(f"3 processes, escalate-always: decode {m:.1f} tok/s, "
          f"TTFT {1e3 * statistics.median(ttft['split']):.0f} ms")
    pairs = statistics.median(b / a for a, b in zip(res["single"], res["split"]) if a > 0)
    print(f"ratio split / single: {m / s:.3f} (median of per-pair ratios {pairs:.3f}); "
          f"texts differing from the single node: {mismatches}")
    sys.exit(1 if mismatches else 0)


if __name__ == "__main__":
    main()
