"""llama.cpp side of `flow-node bench model` on a GGUF file (written to a temp file and run
by the benchmark; needs `pip install llama-cpp-python`).

One process = one measurement, like the Rust worker beside it: load the file, warm up,
time one prefill of the given prompt ids (a single llama_decode call) and then
`decode` single-token steps (each a llama_decode call, greedy argmax on the logits as the
Rust side does), and report peak RSS. Prints one JSON line.

llama.cpp's AMX / weight-repack buffer types are disabled (`use_extra_bufts=False`): the
AMX kernel crashes on this machine's build (see familial/tests/fixtures/gguf/README.md);
without them llama.cpp runs its regular CPU kernels (Q4_1 x Q8_1, Q8_0 x Q8_0 dot products
with AVX2/AVX-512 VNNI where the CPU has them).
"""
import json
import sys
import time

import llama_cpp
import llama_cpp.llama_cpp as _C

# Llama() has no argument for `use_extra_bufts`: patch the default model params.
_orig_default_params = _C.llama_model_default_params


def _no_extra_bufts():
    p = _orig_default_params()
    p.use_extra_bufts = False
    return p


_C.llama_model_default_params = _no_extra_bufts


def hwm_kb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def main():
    cfg = json.loads(sys.argv[1])
    t0 = time.perf_counter()
    kwargs = dict(
        model_path=cfg["model"],
        n_ctx=cfg["n_ctx"],
        n_batch=max(512, len(cfg["prompt"])),
        n_threads=cfg["threads"],
        n_threads_batch=cfg["threads"],
        type_k=0,  # f32 KV cache, as the Rust side keeps it
        type_v=0,
        verbose=False,
    )
    llm = llama_cpp.Llama(**kwargs)
    load_ms = (time.perf_counter() - t0) * 1e3
    ctx = llm._ctx
    prompt = cfg["prompt"]

    def run_prefill():
        llm.reset()
        llm._ctx.kv_cache_clear()
        t = time.perf_counter()
        llm.eval(prompt)
        return (time.perf_counter() - t) * 1e3

    def argmax():
        row = llm.scores[llm.n_tokens - 1]
        return int(row.argmax())

    run_prefill()  # warm-up
    prefill_ms = run_prefill()
    tok = argmax()
    steps = []
    for _ in range(cfg["decode"]):
        t = time.perf_counter()
        llm.eval([tok])
        tok = argmax()
        steps.append((time.perf_counter() - t) * 1e3)
    del ctx
    print(json.dumps({
        "engine": "llama.cpp",
        "version": llama_cpp.__version__,
        "load_ms": load_ms,
        "prefill_ms": prefill_ms,
        "decode_ms": sum(steps),
        "decode_steps": len(steps),
        "hwm_kb": hwm_kb(),
    }))


if __name__ == "__main__":
    main()
