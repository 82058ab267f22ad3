#!/usr/bin/env python3
"""Draft acceptance of `speculate` mode, greedy vs sampled, against a running entry node.

    flow-node cluster --model models/smollm2-family --http 127.0.0.1:0 --addr-file /tmp/addr &
    python3 tests/speculate_acceptance.py "$(cat /tmp/addr)" [MODEL]

Prints, per temperature, drafts accepted / proposed (from each response's `aiflow` object)
and tokens generated. A measurement, not a test: docs/benchmarks.md quotes it.
"""
import json
import sys
import time
import urllib.request

PROMPTS = [
    "What is the capital of France?",
    "Give me three tips for staying healthy.",
    "Explain what a neural network is in one paragraph.",
    "Write a haiku about autumn.",
    "How do I boil an egg?",
    "What causes rain?",
]


def ask(addr, model, prompt, temperature, seed):
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 48,
        "temperature": temperature,
        "seed": seed,
        "aiflow": {"mode": "speculate", "draft_len": 4},
    }
    req = urllib.request.Request(
        f"http://{addr}/v1/chat/completions",
        json.dumps(body).encode(),
        {"content-type": "application/json"},
    )
    return json.load(urllib.request.urlopen(req, timeout=300))


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    addr = sys.argv[1]
    model = sys.argv[2] if len(sys.argv) > 2 else "smollm2-family"
    for temperature, seeds in [(0.0, [0]), (0.7, [1, 2])]:
        proposed = accepted = tokens = 0
        t0 = time.time()
        for prompt in PROMPTS:
            for seed in seeds:
                r = ask(addr, model, prompt, temperature, seed)
                proposed += r["aiflow"].get("drafts_proposed", 0)
                accepted += r["aiflow"].get("drafts_accepted", 0)
                tokens += r["usage"]["completion_tokens"]
        print(
            f"temperature {temperature}: drafts accepted {accepted}/{proposed} = "
            f"{accepted / max(proposed, 1):.2f}, {tokens} tokens, {time.time() - t0:.1f} s"
        )


if __name__ == "__main__":
    main()
