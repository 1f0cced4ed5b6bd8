#!/usr/bin/env python3
"""GPU acceptance for modeld, run on a machine with an NVIDIA GPU.

It needs only the CUDA build of modeld (`.ci/cuda-build`, carried over as
`target/cuda/cuda/modeld`), the CUDA 13 libraries (pip's NVIDIA wheels are
found on sys.path), Python 3 and `nvidia-smi`. Larger models are llamas of
zeros written as sparse files, so they take no disk. It checks, on `cuda:0`:

1. greedy output of the tiny fixtures matches transformers (expected.json);
2. `measured_bytes` is VRAM the driver saw the load take, and `unload` gives
   it back (NVML's per-process figure returns to its pre-load value);
3. repeated load/unload cycles of two models of different sizes keep no VRAM;
4. a model that cannot fit is refused with `insufficient_memory` naming the
   device, the daemon survives, and a model that fits loads afterwards;
5. throughput (figures, not pass/fail): batch-1 bf16 decode of a 1.1B- and
   a 7B-shaped llama as a fraction of the GPU's memory bandwidth, and the
   aggregate of 8 concurrent clients against one (continuous batching);
   concurrent greedy generations of the fixtures still match transformers;
6. images: the tiny-sd fixture draws the same picture on `cuda:0` as on the
   CPU (float32, same seed), and an SD1.5-shaped pipeline at 512x512 and an
   SDXL-shaped one at 1024x1024 (zero weights of the real sizes, written
   from `shapes/*.json` as sparse files; float16) report load time, s/step
   and VRAM, against diffusers on the same GPU in the same run when
   diffusers is importable (carry its wheels: it is pure Python);
   then a FLUX.1-dev-shaped pipeline (`shapes/flux-dev.json`: 19 double and
   38 single blocks, T5-XXL, CLIP-L, the 16-channel VAE; 33.7 GB of sparse
   bf16 files) at 1024x1024, 4 steps, guidance 3.5, 512 T5 tokens, in bf16,
   and again with the transformer's 2-D weights stored as fp8 (F8_E4M3,
   21.8 GB; modeld computes in bf16): load time, s/step, generate_ms,
   estimated and measured bytes, and `bandwidth_bound_s`, the transformer's
   stored bytes read once at the GPU's bandwidth (a lower bound on s/step;
   at 1024x1024 the step is bound by compute far above it), with diffusers'
   FluxPipeline s/step in bf16 on the same folder when importable. A
   variant whose weights and 4 GiB of headroom exceed the GPU's free memory
   is skipped with a `skipped` line saying so.
7. runners: the tiny Qwen-Image pipeline on the diffusers runner (this
   Python as `[runners] python`; skipped when diffusers is not importable):
   NVML counts VRAM for the runner's PID, `measured_bytes` and `freed_bytes`
   report it, and after `unload` the PID is gone and holds nothing.

Prints one JSON line per figure and exits non-zero on the first failure.
Usage: tests/gpu/acceptance.py [--modeld PATH] [--big-layers N] [--bandwidth-gbs N]
       tests/gpu/acceptance.py --images-only --device cpu   (a CPU smoke run
       of check 6 at small sizes, to try the script without a GPU: SD at
       64x64, and FLUX with one block of each kind and one T5 layer at
       full width, 64x64, 2 steps, 16 T5 tokens, in f32)
       tests/gpu/acceptance.py --runner-only [--device cpu]   (check 7 alone;
       on the CPU resident memory stands in for NVML)
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(REPO, "clients", "python"))
from modeld_client import Client, ModeldError  # noqa: E402

GIB = 1 << 30


def report(**fields):
    print(json.dumps(fields), flush=True)


def fail(message):
    report(result="fail", reason=message)
    sys.exit(1)


def process_vram(pid):
    """This process's VRAM in bytes, from nvidia-smi (NVML)."""
    out = subprocess.run(
        ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
        capture_output=True, text=True, check=True,
    ).stdout
    for line in out.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) == 2 and fields[0] == str(pid):
            return int(fields[1]) << 20
    return 0


def cuda_library_path():
    """Directories of pip's NVIDIA wheels, for the CUDA libraries."""
    paths = []
    for entry in sys.path:
        candidate = os.path.join(entry, "nvidia")
        if os.path.isdir(candidate):
            for root, dirs, _ in os.walk(candidate):
                if os.path.basename(root) == "lib":
                    paths.append(root)
    return ":".join(paths)


class Daemon:
    def __init__(self, modeld, workdir, config=""):
        os.makedirs(workdir, exist_ok=True)
        self.socket = os.path.join(workdir, "modeld.sock")
        with open(os.path.join(workdir, "modeld.toml"), "w") as f:
            f.write(config)
        env = dict(os.environ, HF_HOME=os.path.join(workdir, "hf"), MODELD_LOG="info")
        extra = cuda_library_path()
        if extra:
            env["LD_LIBRARY_PATH"] = extra + ":" + env.get("LD_LIBRARY_PATH", "")
        self.log = open(os.path.join(workdir, "modeld.log"), "w")
        self.process = subprocess.Popen(
            [modeld, "--socket", self.socket, "--state-dir", os.path.join(workdir, "state"),
             "--config", os.path.join(workdir, "modeld.toml")],
            env=env, stderr=self.log,
        )
        deadline = time.time() + 60
        while True:
            try:
                self.call("status")
                return
            except (OSError, ConnectionError):
                if self.process.poll() is not None or time.time() > deadline:
                    fail("modeld did not start; see %s" % self.log.name)
                time.sleep(0.1)

    def call(self, method, params=None):
        with Client(self.socket) as client:
            return client.call(method, params)

    def generate(self, params):
        with Client(self.socket) as client:
            return list(client.stream("generate", params))[-1]

    def stop(self):
        self.process.terminate()
        self.process.wait(timeout=60)


def check_fixtures(daemon, workdir):
    for fixture in ["tiny-llama", "tiny-qwen2"]:
        source = os.path.join(REPO, "tests", "fixtures", fixture)
        copy = os.path.join(workdir, fixture)
        shutil.copytree(source, copy)
        daemon.call("models.register", {"name": fixture, "local_path": copy})
        loaded = daemon.call("load", {"name": fixture, "device": "cuda:0", "dtype": "f32"})
        expected = json.load(open(os.path.join(source, "expected.json")))
        matches = 0
        for case in expected["cases"]:
            done = daemon.generate({"model": fixture, "prompt": case["prompt"], "temperature": 0,
                                    "max_tokens": expected["max_new_tokens"]})
            matches += done["token_ids"] == case["greedy_ids"]
        report(check="greedy", model=fixture, device=loaded["model"]["device"],
               matches=matches, cases=len(expected["cases"]))
        if matches != len(expected["cases"]):
            fail("%s: greedy output differs from transformers on cuda:0" % fixture)
        daemon.call("unload", {"name": fixture})


# Bytes per element of the safetensors dtypes the sparse files are written in.
DTYPE_WIDTH = {"F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1}


def tensor_bytes(shape, dtype):
    size = DTYPE_WIDTH[dtype]
    for dim in shape:
        size *= dim
    return size


def write_sparse_safetensors(file, shapes, dtype="BF16"):
    """Zeros of `shapes` (name -> shape) in safetensors, written as a sparse
    file: the size is real for the loader and the GPU, but takes no disk
    space. `dtype` is every tensor's safetensors dtype, or a function of
    (name, shape) giving each one's. Returns the data's size in bytes."""
    dtype_of = dtype if callable(dtype) else (lambda name, shape: dtype)
    header, offset = {}, 0
    for name, shape in shapes.items():
        kind = dtype_of(name, shape)
        size = tensor_bytes(shape, kind)
        header[name] = {"dtype": kind, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(file, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        f.truncate(8 + len(text) + offset)
    return offset


def write_sparse_llama(path, layers, hidden, intermediate):
    """A llama of zeros in bf16 safetensors, written as a sparse file: the
    size is real for the loader and the GPU, but takes no disk space."""
    os.makedirs(path, exist_ok=True)
    vocab, heads = 32000, hidden // 128
    shapes = {"model.embed_tokens.weight": [vocab, hidden], "lm_head.weight": [vocab, hidden],
              "model.norm.weight": [hidden]}
    for i in range(layers):
        p = "model.layers.%d." % i
        for name, shape in [("self_attn.q_proj", [hidden, hidden]), ("self_attn.k_proj", [hidden, hidden]),
                            ("self_attn.v_proj", [hidden, hidden]), ("self_attn.o_proj", [hidden, hidden]),
                            ("mlp.gate_proj", [intermediate, hidden]), ("mlp.up_proj", [intermediate, hidden]),
                            ("mlp.down_proj", [hidden, intermediate])]:
            shapes[p + name + ".weight"] = shape
        shapes[p + "input_layernorm.weight"] = [hidden]
        shapes[p + "post_attention_layernorm.weight"] = [hidden]
    offset = write_sparse_safetensors(os.path.join(path, "model.safetensors"), shapes)
    config = {"model_type": "llama", "hidden_size": hidden, "intermediate_size": intermediate,
              "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": heads,
              "vocab_size": vocab, "rms_norm_eps": 1e-5, "max_position_embeddings": 4096,
              "rope_theta": 10000.0, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False}
    json.dump(config, open(os.path.join(path, "config.json"), "w"))
    shutil.copy(os.path.join(REPO, "tests", "fixtures", "tiny-llama", "tokenizer.json"), path)
    return offset


# Peak memory bandwidth by GPU name, GB/s (vendor figures).
BANDWIDTH_GBS = {"H100 80GB HBM3": 3350, "H100 PCIe": 2000, "H200": 4800, "A100-SXM4-80GB": 2039}


def bandwidth_of(name, given):
    if given:
        return given
    for key, value in BANDWIDTH_GBS.items():
        if key in name:
            return value
    return None


def aggregate_tokens_per_s(daemon, model, clients, tokens):
    """Completion tokens per second of `clients` generating at once."""
    import threading
    results = [0] * clients
    def one(i):
        done = daemon.generate({"model": model, "prompt": "client %d" % i, "max_tokens": tokens,
                                "temperature": 0})
        results[i] = done["completion_tokens"]
    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    started = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(results) / (time.time() - started)


def check_throughput(daemon, workdir, bandwidth_gbs):
    gpu = daemon.call("vram")["gpus"][0]["name"]
    bandwidth = bandwidth_of(gpu, bandwidth_gbs)
    for name in ["small", "big"]:
        loaded = daemon.call("load", {"name": name, "device": "cuda:0", "dtype": "bf16"})["model"]
        weights = loaded["estimated_bytes"] - loaded["kv_cache_bytes"]
        aggregate_tokens_per_s(daemon, name, 1, 16)
        one = max(aggregate_tokens_per_s(daemon, name, 1, 128) for _ in range(3))
        eight = max(aggregate_tokens_per_s(daemon, name, 8, 128) for _ in range(2))
        limit = bandwidth * 1e9 / weights if bandwidth else None
        report(check="throughput", model=name, gpu=gpu, weights=weights,
               batch1_tok_s=round(one, 1), limit_tok_s=limit and round(limit, 1),
               fraction_of_bandwidth=limit and round(one / limit, 3),
               clients8_tok_s=round(eight, 1), clients8_over_1=round(eight / one, 2))
        daemon.call("unload", {"name": name})
    # Batched greedy output still matches transformers.
    import threading
    for fixture in ["tiny-llama", "tiny-qwen2"]:
        expected = json.load(open(os.path.join(REPO, "tests", "fixtures", fixture, "expected.json")))
        daemon.call("load", {"name": fixture, "device": "cuda:0", "dtype": "f32"})
        cases = expected["cases"] * 2
        outputs = [None] * len(cases)
        def one(i):
            outputs[i] = daemon.generate({"model": fixture, "prompt": cases[i]["prompt"], "temperature": 0,
                                          "max_tokens": expected["max_new_tokens"]})["token_ids"]
        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(cases))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        matches = sum(out == case["greedy_ids"] for out, case in zip(outputs, cases))
        report(check="batched_greedy", model=fixture, matches=matches, cases=len(cases))
        if matches != len(cases):
            fail("%s: batched greedy output differs from transformers on cuda:0" % fixture)
        daemon.call("unload", {"name": fixture})


def check_vram_cycles(daemon, workdir, big_layers):
    models = {"small": (22, 2048, 5632), "big": (big_layers, 4096, 11008)}
    for name, (layers, hidden, intermediate) in models.items():
        path = os.path.join(workdir, name)
        write_sparse_llama(path, layers, hidden, intermediate)
        daemon.call("models.register", {"name": name, "local_path": path})
    pid = daemon.process.pid
    baseline = process_vram(pid)
    for cycle, name in enumerate(["big", "small", "big", "small", "big"]):
        started = time.time()
        loaded = daemon.call("load", {"name": name, "device": "cuda:0", "dtype": "bf16"})["model"]
        load_s = time.time() - started
        held = process_vram(pid)
        freed = daemon.call("unload", {"name": name})["freed_bytes"]
        time.sleep(1)
        after = process_vram(pid)
        report(check="vram_cycle", cycle=cycle, model=name, load_s=round(load_s, 3),
               estimated=loaded["estimated_bytes"], measured=loaded["measured_bytes"],
               nvml_held=held - baseline, freed=freed, nvml_after_unload=after - baseline)
        if after - baseline > 256 << 20:
            fail("%s: %d MiB still held after unload" % (name, (after - baseline) >> 20))
        weights = loaded["estimated_bytes"] - loaded["kv_cache_bytes"]
        if not 0.8 <= loaded["measured_bytes"] / weights <= 1.2:
            fail("%s: measured %d vs estimated weights %d" % (name, loaded["measured_bytes"], weights))


def too_big(workdir, name, free):
    """A sparse model larger than `free` bytes of VRAM."""
    hidden, intermediate = 8192, 28672
    per_layer = 2 * (4 * hidden * hidden + 3 * hidden * intermediate)
    path = os.path.join(workdir, name)
    write_sparse_llama(path, free // per_layer + 2, hidden, intermediate)
    return path


def check_out_of_memory(modeld, workdir):
    # Refused by the estimate, before anything is allocated.
    daemon = Daemon(modeld, os.path.join(workdir, "budget"))
    free = daemon.call("vram")["gpus"][0]["free_bytes"]
    daemon.call("models.register", {"name": "huge", "local_path": too_big(workdir, "huge", free)})
    expect_insufficient(daemon, "huge", "estimate")
    daemon.stop()
    # With the budget check disabled, the real CUDA out-of-memory inside
    # candle must come back as the same answer, memory handed back.
    daemon = Daemon(modeld, os.path.join(workdir, "nobudget"), '[scheduler]\nmemory_budget = "100000G"\n')
    daemon.call("models.register", {"name": "huge", "local_path": os.path.join(workdir, "huge")})
    baseline = process_vram(daemon.process.pid)
    expect_insufficient(daemon, "huge", "cuda")
    report(check="vram_after_oom", held=process_vram(daemon.process.pid) - baseline)
    small = os.path.join(workdir, "small")
    daemon.call("models.register", {"name": "small", "local_path": small})
    loaded = daemon.call("load", {"name": "small", "device": "cuda:0"})
    report(check="load_after_oom", model=loaded["model"]["name"])
    daemon.stop()


def expect_insufficient(daemon, name, how):
    try:
        daemon.call("load", {"name": name, "device": "cuda:0", "dtype": "bf16"})
        fail("a model larger than the free VRAM was loaded (%s)" % how)
    except ModeldError as err:
        report(check="out_of_memory", how=how, kind=err.kind, message=err.message[:200], data=err.data)
        if err.kind != "insufficient_memory" or err.data.get("device") != "cuda:0":
            fail("expected insufficient_memory on cuda:0, got %s" % err)


def load_shapes(name):
    """`shapes/<name>.json`: a pipeline's model index, its components'
    configs and tensor shapes, its scheduler config and which fixtures'
    tokenizers it borrows (written by make_shapes.py)."""
    with open(os.path.join(HERE, "shapes", name + ".json")) as f:
        return json.load(f)


def component_dtype(dtype, component):
    """`dtype` (one safetensors dtype, or a function of (component, name,
    shape)) as a function of (name, shape) for `component`'s tensors."""
    if callable(dtype):
        return lambda name, shape: dtype(component, name, shape)
    return lambda name, shape: dtype


def pipeline_bytes(spec, dtype):
    """Each component's weight bytes when `spec` is written in `dtype`."""
    sizes = {}
    for component, part in spec["components"].items():
        dtype_of = component_dtype(dtype, component)
        sizes[component] = sum(tensor_bytes(shape, dtype_of(name, shape))
                               for name, shape in part["tensors"].items())
    return sizes


def write_sparse_pipeline(path, spec, dtype):
    """A diffusers pipeline folder of zero weights at the sizes in `spec`
    (see load_shapes), with the tiny fixtures' tokenizers. `dtype` is every
    tensor's safetensors dtype, or a function of (component, tensor name,
    shape) giving each one's. Returns each component's weight bytes."""
    os.makedirs(path, exist_ok=True)
    json.dump(spec["model_index"], open(os.path.join(path, "model_index.json"), "w"))
    sizes = {}
    for name, part in spec["components"].items():
        folder = os.path.join(path, name)
        os.makedirs(folder, exist_ok=True)
        json.dump(part["config"], open(os.path.join(folder, "config.json"), "w"))
        stem = "model" if name.startswith("text_encoder") else "diffusion_pytorch_model"
        sizes[name] = write_sparse_safetensors(os.path.join(folder, stem + ".safetensors"), part["tensors"],
                                               component_dtype(dtype, name))
    os.makedirs(os.path.join(path, "scheduler"), exist_ok=True)
    json.dump(spec["scheduler"], open(os.path.join(path, "scheduler", "scheduler_config.json"), "w"))
    for name, fixture in spec["tokenizers"].items():
        shutil.copytree(os.path.join(REPO, "tests", "fixtures", fixture), os.path.join(path, name))
    return sizes


def png_pixels(data):
    """The 8-bit RGB pixels of a PNG (what modeld writes), as bytes."""
    import struct
    import zlib
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    at, idat, width, height = 8, b"", 0, 0
    while at < len(data):
        length, kind = struct.unpack(">I4s", data[at:at + 8])
        body = data[at + 8:at + 8 + length]
        if kind == b"IHDR":
            width, height, depth, color = struct.unpack(">IIBB", body[:10])
            assert (depth, color) == (8, 2), "not 8-bit RGB"
        elif kind == b"IDAT":
            idat += body
        at += 12 + length
    raw, stride = zlib.decompress(idat), width * 3
    rows, previous = [], bytearray(stride)
    for y in range(height):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for x in range(stride):
            a = line[x - 3] if x >= 3 else 0
            b = previous[x]
            c = previous[x - 3] if x >= 3 else 0
            if kind == 1:
                line[x] = (line[x] + a) & 255
            elif kind == 2:
                line[x] = (line[x] + b) & 255
            elif kind == 3:
                line[x] = (line[x] + (a + b) // 2) & 255
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[x] = (line[x] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line))
        previous = line
    return b"".join(rows)


def image_run(daemon, params):
    """Runs one image generation; returns (done event, seconds per step:
    the median gap between consecutive progress events)."""
    with Client(daemon.socket) as client:
        events = list(client.stream("generate", params))
    elapsed = [e["elapsed_ms"] for e in events
               if e.get("event") == "progress" and e.get("stage", "denoise") == "denoise"]
    gaps = sorted(b - a for a, b in zip(elapsed, elapsed[1:]))
    step_s = gaps[len(gaps) // 2] / 1000 if gaps else None
    return events[-1], step_s


def check_image_devices(daemon, workdir, device):
    """The tiny-sd fixture's picture on `device` against the CPU's."""
    import base64
    source = os.path.join(REPO, "tests", "fixtures", "tiny-sd")
    copy = os.path.join(workdir, "tiny-sd")
    shutil.copytree(source, copy)
    pictures = {}
    for where in sorted({"cpu", device}):
        name = "tiny-sd-" + where.replace(":", "")
        daemon.call("models.register", {"name": name, "local_path": copy})
        daemon.call("load", {"name": name, "device": where, "dtype": "f32"})
        done, _ = image_run(daemon, {"model": name, "prompt": "a cat", "size": "64x64", "steps": 4,
                                     "guidance": 7.5, "seed": 1, "inline": True})
        pictures[where] = png_pixels(base64.b64decode(done["images"][0]["base64"]))
        daemon.call("unload", {"name": name})
    worst = max(abs(a - b) for a, b in zip(pictures["cpu"], pictures[device]))
    report(check="image_devices", device=device, max_pixel_diff=worst)
    if worst > 2:
        fail("tiny-sd draws a different picture on %s than on the CPU (%d)" % (device, worst))


def diffusers_steps(path, pipeline, device, dtype, **call):
    """diffusers' load time and median s/step for the same pipeline folder
    on the same device; None when diffusers is not importable. `pipeline`
    is the diffusers class's name; `call` its arguments beside the prompt."""
    try:
        import gc
        import torch
        import diffusers
    except ImportError:
        return None
    started = time.time()
    torch_dtype = {"f16": torch.float16, "bf16": torch.bfloat16, "f32": torch.float32}[dtype]
    pipe = getattr(diffusers, pipeline).from_pretrained(path, torch_dtype=torch_dtype).to(device)
    load_s = time.time() - started
    ends = []
    def on_step(pipe, step, timestep, kwargs):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        ends.append(time.time())
        return kwargs
    pipe("a cat", callback_on_step_end=on_step, output_type="np", **call)
    gaps = sorted(b - a for a, b in zip(ends, ends[1:]))
    del pipe
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return load_s, gaps[len(gaps) // 2]


def check_image_speed(daemon, workdir, device, small):
    dtype = "f32" if device == "cpu" else "f16"
    cases = [("sd15", False, 64 if small else 512), ("sdxl", True, 64 if small else 1024)]
    steps = 3 if small else 20
    for name, xl, size in cases:
        path = os.path.join(workdir, name)
        write_sparse_pipeline(path, load_shapes(name), "F32" if dtype == "f32" else "F16")
        daemon.call("models.register", {"name": name, "local_path": path})
        started = time.time()
        loaded = daemon.call("load", {"name": name, "device": device, "dtype": dtype})["model"]
        load_s = time.time() - started
        image_run(daemon, {"model": name, "prompt": "a cat", "size": "%dx%d" % (size, size),
                           "steps": 2, "guidance": 7.5})
        done, step_s = image_run(daemon, {"model": name, "prompt": "a cat", "steps": steps,
                                          "size": "%dx%d" % (size, size), "guidance": 7.5})
        figures = dict(check="image_speed", model=name, device=device, dtype=dtype, size=size,
                       steps=steps, load_s=round(load_s, 2), step_s=step_s,
                       generate_ms=done["generate_ms"],
                       estimated=loaded["estimated_bytes"], measured=loaded["measured_bytes"])
        daemon.call("unload", {"name": name})
        theirs = diffusers_steps(path, "StableDiffusionXLPipeline" if xl else "StableDiffusionPipeline",
                                 device, dtype, height=size, width=size, num_inference_steps=steps,
                                 guidance_scale=7.5)
        if theirs:
            figures.update(diffusers_load_s=round(theirs[0], 2), diffusers_step_s=round(theirs[1], 4),
                           step_ratio=step_s and round(step_s / theirs[1], 2))
        report(**figures)
        shutil.rmtree(path, ignore_errors=True)


def reduced_flux(spec):
    """FLUX.1-dev's shapes with one double- and one single-stream block and
    one T5 layer, every width kept: the CPU smoke run's pipeline (1.08G
    parameters, 4.3 GB in f32, of which T5's token table is 0.5 GB)."""
    spec = json.loads(json.dumps(spec))
    depths = {"transformer": {"num_layers": ("transformer_blocks.", 1),
                              "num_single_layers": ("single_transformer_blocks.", 1)},
              "text_encoder_2": {"num_layers": ("encoder.block.", 1), "num_decoder_layers": (None, 1)}}
    for component, fields in depths.items():
        part = spec["components"][component]
        for field, (prefix, count) in fields.items():
            part["config"][field] = count
            if prefix:
                part["tensors"] = {name: shape for name, shape in part["tensors"].items()
                                   if not name.startswith(prefix)
                                   or int(name[len(prefix):].split(".")[0]) < count}
    return spec


def gpu_of(daemon, device):
    """modeld's `vram` entry (name, free_bytes, ...) of the GPU `device`
    names ("cuda:N"); None on the CPU or where NVML does not list it."""
    if not device.startswith("cuda"):
        return None
    index = int(device.partition(":")[2] or 0)
    return next((gpu for gpu in daemon.call("vram")["gpus"] if gpu["index"] == index), None)


def fp8_transformer(component, name, shape):
    """The FLUX transformer's 2-D (linear) weights as fp8, the rest bf16."""
    return "F8_E4M3" if component == "transformer" and len(shape) == 2 else "BF16"


# FLUX.1-dev's distilled guidance, as diffusers' default and modeld's.
FLUX_GUIDANCE = 3.5
# Room beside the weights for a 1024x1024 FLUX run: the VAE upcast to f32,
# its decode at full size and the transformer's activations over 4096 image
# and 512 text tokens.
FLUX_HEADROOM = 4 * GIB


def check_flux_speed(daemon, workdir, device, small, bandwidth_gbs):
    """A FLUX.1-dev-shaped pipeline in bf16, then with its transformer's
    2-D weights stored as fp8 (F8_E4M3, computed in bf16): load time,
    s/step, VRAM, and the s/step a transformer that only read its weights
    once a step at the GPU's bandwidth would take; diffusers' FluxPipeline
    on the same folder for the bf16 one. `small` (the CPU smoke run): one
    block of each kind and one T5 layer at 64x64, in f32."""
    spec = reduced_flux(load_shapes("flux-dev")) if small else load_shapes("flux-dev")
    dtype = "f32" if device == "cpu" else "bf16"
    size, steps, text = (64, 2, 16) if small else (1024, 4, 512)
    for name, file_dtype in [("flux-dev", "BF16"), ("flux-dev-fp8", fp8_transformer)]:
        sizes = pipeline_bytes(spec, file_dtype)
        weights = sum(sizes.values())
        gpu = gpu_of(daemon, device)
        need = weights + FLUX_HEADROOM
        if gpu and gpu["free_bytes"] < need:
            report(check="flux_speed", model=name, device=device, skipped=True,
                   reason="%s has %.1f GiB free; this pipeline needs about %.1f GiB (%.1f of weights)"
                   % (gpu["name"], gpu["free_bytes"] / GIB, need / GIB, weights / GIB))
            continue
        path = os.path.join(workdir, name)
        write_sparse_pipeline(path, spec, file_dtype)
        daemon.call("models.register", {"name": name, "local_path": path})
        started = time.time()
        loaded = daemon.call("load", {"name": name, "device": device, "dtype": dtype})["model"]
        load_s = time.time() - started
        if loaded["arch"] != "flux-dev":
            fail("%s loaded as %s, not flux-dev (its guidance embedder was missed)" % (name, loaded["arch"]))
        params = {"model": name, "prompt": "a cat", "size": "%dx%d" % (size, size), "steps": steps,
                  "guidance": FLUX_GUIDANCE, "max_sequence_length": text}
        image_run(daemon, dict(params, steps=2))
        done, step_s = image_run(daemon, params)
        bandwidth = None if device == "cpu" else bandwidth_of(gpu["name"] if gpu else "", bandwidth_gbs)
        bound = bandwidth and sizes["transformer"] / (bandwidth * 1e9)
        figures = dict(check="flux_speed", model=name, device=device, dtype=dtype, size=size,
                       steps=steps, max_sequence_length=text, load_s=round(load_s, 2), step_s=step_s,
                       generate_ms=done["generate_ms"], weights=weights,
                       transformer_bytes=sizes["transformer"], estimated=loaded["estimated_bytes"],
                       measured=loaded["measured_bytes"], bandwidth_gbs=bandwidth,
                       bandwidth_bound_s=bound and round(bound, 4),
                       fraction_of_bandwidth=bound and step_s and round(bound / step_s, 3))
        daemon.call("unload", {"name": name})
        if name == "flux-dev":
            theirs = diffusers_steps(path, "FluxPipeline", device, dtype, height=size, width=size,
                                     num_inference_steps=steps, guidance_scale=FLUX_GUIDANCE,
                                     max_sequence_length=text)
            if theirs:
                figures.update(diffusers_load_s=round(theirs[0], 2), diffusers_step_s=round(theirs[1], 4),
                               step_ratio=step_s and round(step_s / theirs[1], 2))
        report(**figures)
        shutil.rmtree(path, ignore_errors=True)


def children_of(pid):
    """Process ids whose parent is `pid`, from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry) as f:
                stat = f.read()
        except OSError:
            continue
        if int(stat[stat.rfind(")") + 2:].split()[1]) == pid:
            found.append(int(entry))
    return found


def resident_bytes(pid):
    """A process's resident memory (VmRSS), 0 once it is gone."""
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) << 10
    except OSError:
        pass
    return 0


def check_runner(modeld, workdir, device):
    """Check 7: the diffusers runner on the GPU. Its VRAM is measured per PID
    (NVML), `freed_bytes` says what it held, and after unload the driver no
    longer counts the process. Needs diffusers importable in this Python."""
    try:
        import diffusers  # noqa: F401
    except ImportError:
        report(check="runner", skipped="diffusers is not importable in %s" % sys.executable)
        return
    runner_dir = os.path.join(workdir, "runner")
    config = '[runners]\npython = "%s"\n' % sys.executable
    daemon = Daemon(modeld, runner_dir, config)
    try:
        pipeline = os.path.join(runner_dir, "t2i")
        shutil.copytree(os.path.join(REPO, "tests", "fixtures", "tiny-qwen-image", "t2i"), pipeline)
        daemon.call("models.register", {"name": "qwen", "local_path": pipeline})
        started = time.time()
        dtype = "f32" if device == "cpu" else "bf16"
        loaded = daemon.call("load", {"name": "qwen", "device": device, "dtype": dtype})["model"]
        load_s = time.time() - started
        runners = children_of(daemon.process.pid)
        if len(runners) != 1:
            fail("runner: expected one child process, found %s" % runners)
        pid = runners[0]
        held = process_vram(pid) if device != "cpu" else resident_bytes(pid)
        done = daemon.generate({"model": "qwen", "prompt": "a lighthouse made of model caches",
                                "negative_prompt": "blurry", "guidance": 4.0, "steps": 3,
                                "size": "48x32", "seed": 7})
        if not done.get("images"):
            fail("runner: no picture: %s" % done)
        freed = daemon.call("unload", {"name": "qwen"})["freed_bytes"]
        after = process_vram(pid) if device != "cpu" else resident_bytes(pid)
        report(check="runner", load_s=round(load_s, 3), measured=loaded["measured_bytes"],
               estimated=loaded["estimated_bytes"], nvml_held=held, freed=freed,
               nvml_after_unload=after, alive=os.path.exists("/proc/%d" % pid))
        if held == 0 or loaded["measured_bytes"] == 0:
            fail("runner: NVML counted no VRAM for the runner (pid %d)" % pid)
        if freed < held // 2:
            fail("runner: freed_bytes %d, but the runner held %d" % (freed, held))
        if after != 0 or os.path.exists("/proc/%d" % pid):
            fail("runner: pid %d still exists or holds %d bytes after unload" % (pid, after))
    finally:
        daemon.stop()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modeld", default=os.path.join(REPO, "target", "cuda", "cuda", "modeld"))
    parser.add_argument("--big-layers", type=int, default=32)
    parser.add_argument("--bandwidth-gbs", type=float, default=None,
                        help="the GPU's memory bandwidth, when its name is not known here")
    parser.add_argument("--images-only", action="store_true",
                        help="run check 6 alone (the tiny-sd picture, SD1.5, SDXL and FLUX.1-dev speed)")
    parser.add_argument("--runner-only", action="store_true",
                        help="run check 7 alone (the diffusers runner's VRAM per PID)")
    parser.add_argument("--device", default="cuda:0",
                        help="where check 6 runs its pipelines (cpu: a small smoke run, FLUX with "
                             "one block of each kind)")
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="modeld-gpu-")
    if args.runner_only:
        try:
            check_runner(args.modeld, workdir, args.device)
            report(result="pass")
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        return
    daemon = Daemon(args.modeld, workdir)
    if args.images_only:
        try:
            check_image_devices(daemon, workdir, args.device)
            check_image_speed(daemon, workdir, args.device, small=args.device == "cpu")
            check_flux_speed(daemon, workdir, args.device, args.device == "cpu", args.bandwidth_gbs)
            report(result="pass")
        finally:
            daemon.stop()
            shutil.rmtree(workdir, ignore_errors=True)
        return
    try:
        status = daemon.call("vram")
        report(check="vram", gpus=[(g["name"], g["total_bytes"]) for g in status["gpus"]],
               nvml=status["nvml"])
        if not status["gpus"]:
            fail("no GPU visible to modeld: %s" % status["nvml"])
        check_fixtures(daemon, workdir)
        check_vram_cycles(daemon, workdir, args.big_layers)
        check_throughput(daemon, workdir, args.bandwidth_gbs)
        check_image_devices(daemon, workdir, "cuda:0")
        check_image_speed(daemon, workdir, "cuda:0", small=False)
        check_flux_speed(daemon, workdir, "cuda:0", False, args.bandwidth_gbs)
    finally:
        daemon.stop()
    try:
        check_out_of_memory(args.modeld, workdir)
        check_runner(args.modeld, workdir, "cuda:0")
        report(result="pass")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
