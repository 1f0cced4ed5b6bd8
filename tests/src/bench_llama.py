"""The llama.cpp side of `bench cpu` (embedded in bench_cpu.rs, run with the
interpreter the bench is given; needs llama-cpp-python and numpy).

    python bench_llama.py quantize IN OUT
        llama.cpp's own quantizer: IN (an f32 GGUF) to OUT in Q4_K_M.

    python bench_llama.py probe GGUF [--no-extra-bufts]
        Loads GGUF and decodes two tokens; exits 0 when that works. Some
        virtual machines advertise AMX but fault on its instructions, which
        llama.cpp's extra (AMX) buffer type uses for quantized weights.

    python bench_llama.py serve [--no-extra-bufts]
        Reads one JSON request a line on stdin and answers each with one
        JSON line on stdout, keeping one model loaded between requests so
        that rounds of the two engines can alternate cheaply:
        {"op": "load", "path", "threads", "n_ctx"} -> {"load_s"}
        {"op": "decode", "prompt": [ids], "tokens": N, "seconds": S} ->
            {"first_s", "decode_s", "tokens"}: the prompt's prefill gives
            the first token, then N greedy steps are timed (decode_s), end
            tokens ignored, stopping early after the step that passes S
            seconds (optional); "tokens" holds the first id and one a step.
        {"op": "ttft", "path", "threads", "n_ctx", "prompt": [ids]} ->
            {"load_s", "first_s", "total_s"}: a model built from scratch
            (the timed span starts before Llama() is called), its first
            token, and the model freed again.
        {"op": "unload"} -> {}
        Failures answer {"error": message}.

With --no-extra-bufts, models load with use_extra_bufts off (no AMX and no
weight repacking), which Llama() does not expose, so its default model
parameters are patched.

The loop calls llama_decode and reads the last logits itself, as llama.cpp's
own tools do, rather than Llama.eval, which copies every logit row into
numpy and stops at nothing but its own sampler.
"""

import ctypes
import json
import os
import sys
import time

import llama_cpp
import llama_cpp.llama_cpp as low
import numpy as np


def without_extra_bufts():
    default = low.llama_model_default_params

    def params():
        value = default()
        value.use_extra_bufts = False
        return value

    low.llama_model_default_params = params


def quantize(source, target):
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.nthread = os.cpu_count() or 1
    code = llama_cpp.llama_model_quantize(
        source.encode(), target.encode(), ctypes.byref(params)
    )
    if code != 0:
        sys.exit(f"llama_model_quantize returned {code}")


def build(path, threads, n_ctx):
    return llama_cpp.Llama(
        model_path=path,
        n_ctx=n_ctx,
        n_threads=threads,
        n_threads_batch=threads,
        use_mmap=True,
        verbose=False,
    )


def clear(llm):
    """Empties the KV cache so that every round starts at position 0."""
    if hasattr(llama_cpp, "llama_memory_clear"):
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm.ctx), True)
    else:
        llama_cpp.llama_kv_self_clear(llm.ctx)


def step(llm, n_vocab, tokens):
    """Decodes `tokens` after those already in the cache; the greedy next id."""
    array = (llama_cpp.llama_token * len(tokens))(*tokens)
    code = llama_cpp.llama_decode(llm.ctx, llama_cpp.llama_batch_get_one(array, len(tokens)))
    if code != 0:
        raise RuntimeError(f"llama_decode returned {code}")
    logits = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return int(np.argmax(np.ctypeslib.as_array(logits, shape=(n_vocab,))))


def decode(llm, prompt, tokens, seconds=None):
    clear(llm)
    n_vocab = llm.n_vocab()
    start = time.perf_counter()
    out = [step(llm, n_vocab, prompt)]
    first = time.perf_counter()
    for _ in range(tokens):
        out.append(step(llm, n_vocab, [out[-1]]))
        if seconds is not None and time.perf_counter() - first > seconds:
            break
    end = time.perf_counter()
    return {"first_s": first - start, "decode_s": end - first, "tokens": out}


def ttft(request):
    start = time.perf_counter()
    llm = build(request["path"], request["threads"], request["n_ctx"])
    loaded = time.perf_counter()
    step(llm, llm.n_vocab(), request["prompt"])
    end = time.perf_counter()
    del llm
    return {"load_s": loaded - start, "first_s": end - loaded, "total_s": end - start}


def serve():
    llm = None
    for line in sys.stdin:
        request = json.loads(line)
        op = request["op"]
        try:
            if op == "load":
                llm = None
                start = time.perf_counter()
                llm = build(request["path"], request["threads"], request["n_ctx"])
                reply = {"load_s": time.perf_counter() - start}
            elif op == "decode":
                reply = decode(llm, request["prompt"], request["tokens"], request.get("seconds"))
            elif op == "ttft":
                llm = None
                reply = ttft(request)
            elif op == "unload":
                llm = None
                reply = {}
            else:
                reply = {"error": f"unknown op {op!r}"}
        except Exception as err:  # noqa: BLE001 - the bench prints it
            reply = {"error": f"{type(err).__name__}: {err}"}
        print(json.dumps(reply), flush=True)


def probe(path):
    llm = build(path, 1, 64)
    step(llm, llm.n_vocab(), [3, 4, 5])
    step(llm, llm.n_vocab(), [6])


if __name__ == "__main__":
    if "--no-extra-bufts" in sys.argv:
        without_extra_bufts()
    if sys.argv[1] == "quantize":
        quantize(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "probe":
        probe(sys.argv[2])
    else:
        serve()
