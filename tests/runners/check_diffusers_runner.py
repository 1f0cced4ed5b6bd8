#!/usr/bin/env python3
"""Checks runners/diffusers_runner.py against tests/fixtures/tiny-qwen-image.

Developer tool and reference for the Rust tests, which do the same through the
daemon. Standard library only (it does not need the runner's venv): it starts
the runner with the given interpreter, speaks runner protocol version 1
(runners/PROTOCOL.md), runs every case of the fixture and compares the sha256
of each decoded picture's uint8 HWC pixels with expected.json's
`image_sha256_u8` (per frame for the Wan video). PNGs are decoded here with
zlib and the PNG filter reconstruction, so Pillow's zlib does not matter.

    tests/runners/check_diffusers_runner.py [PYTHON] [--cases t2i,edit,...]
        [--direct] [--fixtures DIR] [--runner FILE] [--timeout S] [--quiet]

PYTHON defaults to $MODELD_RUNNER_PYTHON, then python3. Exit status 0 when
every check passes.

Float kernels are not bit-identical across CPUs: on a host whose CPU differs
from the machine that made the references, diffusers itself can land a few
values of a picture on the other side of a rounding boundary (seen: 1 to 2
values of 4608 off by 1 for t2i_nocfg, t2i_lora and t2i_fp8, 941 of 3.2
million off by at most 2 for edit, on a Xeon with AVX-512/AMX; t2i and wan
matched). Each mismatch says how far it is from the reference PNG. With
--direct the checker also runs each case straight through diffusers in PYTHON,
exactly as expected.json describes it; a case whose pixels differ from the
reference but equal that direct run is reported HOST and passes: the runner
reproduced diffusers exactly, the host rounds differently.

Besides the fixture's cases it checks, on the t2i runner: seed + i numbering
for count > 1, a cancel (sent with its generate, so the runner sees it before
the first step ends) followed by a job that still works, an unknown parameter
refused with invalid_params, and, when the runner declares swap_loras, that
swapping the LoRA in and out in place gives t2i_lora and then t2i again.
"""

import argparse
import base64
import hashlib
import json
import os
import queue
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
DEFAULT_RUNNER = os.path.join(REPO, "runners", "diffusers_runner.py")
DEFAULT_FIXTURES = os.path.join(REPO, "tests", "fixtures", "tiny-qwen-image")

ALL_CASES = ["t2i", "t2i_nocfg", "t2i_lora", "t2i_fp8", "edit", "wan"]


# ---------------------------------------------------------------- PNG


def _paeth(a, b, c):
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    if pa <= pb and pa <= pc:
        return a
    if pb <= pc:
        return b
    return c


def decode_png(data):
    """Returns (width, height, channels, pixels) with pixels the uint8 HWC bytes.
    Handles 8-bit grey, grey+alpha, RGB and RGBA, non-interlaced (what Pillow writes)."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG")
    pos, idat, ihdr = 8, [], None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        ctype = data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        crc = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])[0]
        if zlib.crc32(ctype + body) & 0xFFFFFFFF != crc:
            raise ValueError("bad CRC in %r chunk" % ctype)
        pos += 12 + length
        if ctype == b"IHDR":
            ihdr = struct.unpack(">IIBBBBB", body)
        elif ctype == b"IDAT":
            idat.append(body)
        elif ctype == b"IEND":
            break
    if ihdr is None:
        raise ValueError("no IHDR")
    width, height, depth, colour, _comp, _filt, interlace = ihdr
    channels = {0: 1, 2: 3, 4: 2, 6: 4}.get(colour)
    if depth != 8 or channels is None or interlace != 0:
        raise ValueError("unsupported PNG: depth %d, colour type %d, interlace %d" % (depth, colour, interlace))
    raw = zlib.decompress(b"".join(idat))
    bpp, stride = channels, width * channels
    if len(raw) != height * (stride + 1):
        raise ValueError("PNG data is %d bytes, expected %d" % (len(raw), height * (stride + 1)))
    out = bytearray(height * stride)
    prev = bytearray(stride)
    for y in range(height):
        ftype = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        if ftype == 0:
            pass
        elif ftype == 1:
            for x in range(bpp, stride):
                line[x] = (line[x] + line[x - bpp]) & 0xFF
        elif ftype == 2:
            line = bytearray((a + b) & 0xFF for a, b in zip(line, prev))
        elif ftype == 3:
            for x in range(stride):
                left = line[x - bpp] if x >= bpp else 0
                line[x] = (line[x] + ((left + prev[x]) >> 1)) & 0xFF
        elif ftype == 4:
            for x in range(stride):
                if x >= bpp:
                    line[x] = (line[x] + _paeth(line[x - bpp], prev[x], prev[x - bpp])) & 0xFF
                else:
                    line[x] = (line[x] + prev[x]) & 0xFF
        else:
            raise ValueError("bad PNG filter type %d" % ftype)
        out[y * stride:(y + 1) * stride] = line
        prev = line
    return width, height, channels, bytes(out)


def pixels_sha256(png):
    w, h, c, px = decode_png(png)
    return hashlib.sha256(px).hexdigest(), (h, w, c)


def near(got_px, want_px):
    """(values that differ, largest difference) between two equal-length uint8 buffers."""
    if len(got_px) != len(want_px):
        return None
    diff = [abs(a - b) for a, b in zip(got_px, want_px) if a != b]
    return len(diff), max(diff) if diff else 0


# Runs the fixture's calls straight through diffusers, in the runner's interpreter,
# exactly as expected.json describes them (pipeline recipe, `call` keyword
# arguments, CPU generator, output_type='np'); prints {case: sha256 of the uint8
# pixels, or a list of per-frame sha256 for wan}. This separates a runner bug
# (runner != direct diffusers) from a host whose float kernels round differently
# from the machine that made the references (runner == direct != reference).
DIRECT = r"""
import hashlib, json, os, sys
os.environ["HF_HUB_OFFLINE"] = "1"
import numpy as np, torch, PIL.Image
import importlib.util
if importlib.util.find_spec("torchvision") is None:
    from transformers import Qwen2VLProcessor
    Qwen2VLProcessor.get_attributes = classmethod(lambda cls: ["image_processor", "tokenizer"])
import diffusers
fx, cases = sys.argv[1], sys.argv[2].split(",")
os.chdir(fx)
E = json.load(open("expected.json"))
calls = {c["name"]: c for c in E["cases"]}
calls["wan"] = E["wan"]["case"]
def u8(x):
    return (x * 255).round().astype(np.uint8)
def sha(a):
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()
out = {}
for name in cases:
    c = calls[name]
    kw = {k: v for k, v in c["call"].items() if k not in ("generator", "image")}
    kw["generator"] = torch.Generator("cpu").manual_seed(c["seed"])
    if name == "edit":
        kw["image"] = PIL.Image.open("inputs/edit_input.png").convert("RGB")
        pipe = diffusers.QwenImageEditPlusPipeline.from_pretrained("edit", dtype=torch.float32)
    elif name == "wan":
        pipe = diffusers.WanPipeline.from_pretrained("wan", dtype=torch.float32)
    elif name == "t2i_fp8":
        tr = diffusers.QwenImageTransformer2DModel.from_single_file(
            "single_file/tiny-qwen-image_fp8_e4m3fn.safetensors", config="t2i/transformer", dtype=torch.float32)
        pipe = diffusers.QwenImagePipeline.from_pretrained("t2i", transformer=tr, dtype=torch.float32)
    else:
        pipe = diffusers.QwenImagePipeline.from_pretrained("t2i", dtype=torch.float32)
        if name == "t2i_lora":
            pipe.load_lora_weights("lora", adapter_name="tiny")
            pipe.set_adapters(["tiny"], adapter_weights=[0.8])
    pipe.set_progress_bar_config(disable=True)
    r = pipe(**kw)
    out[name] = [sha(u8(f)) for f in r.frames[0]] if name == "wan" else sha(u8(r.images[0]))
    print("direct %s done" % name, file=sys.stderr, flush=True)
sys.stdout.write("DIRECT " + json.dumps(out) + "\n")
"""


def run_direct(python, fixtures, cases):
    proc = subprocess.run([python, "-c", DIRECT, fixtures, ",".join(cases)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, timeout=1800)
    for line in proc.stdout.decode("utf-8", "replace").splitlines():
        if line.startswith("DIRECT "):
            return json.loads(line[len("DIRECT "):])
    raise ProtocolError("direct diffusers run failed (status %s):\n%s"
                        % (proc.returncode, proc.stderr.decode("utf-8", "replace")[-3000:]))


# ---------------------------------------------------------------- runner


class ProtocolError(Exception):
    pass


class Runner:
    def __init__(self, python, runner, timeout, quiet):
        self.timeout = timeout
        self.stderr_tail = []
        env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "USER")}
        env["HF_HUB_OFFLINE"] = "1"
        self.scratch = tempfile.mkdtemp(prefix="modeld-runner-scratch-")
        self.proc = subprocess.Popen(
            [python, runner], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=env, start_new_session=True,
        )
        self.lines = queue.Queue()
        threading.Thread(target=self._read_stdout, daemon=True).start()
        threading.Thread(target=self._read_stderr, args=(quiet,), daemon=True).start()

    def _read_stdout(self):
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def _read_stderr(self, quiet):
        for line in self.proc.stderr:
            text = line.decode("utf-8", "replace").rstrip("\n")
            self.stderr_tail = (self.stderr_tail + [text])[-40:]
            if not quiet:
                print("    [runner] " + text, file=sys.stderr)

    def send(self, msg):
        self.proc.stdin.write(json.dumps(msg).encode() + b"\n")
        self.proc.stdin.flush()

    def recv(self, timeout=None):
        try:
            line = self.lines.get(timeout=timeout or self.timeout)
        except queue.Empty:
            raise ProtocolError("no message within %s s" % (timeout or self.timeout))
        if line is None:
            code = self.proc.wait(timeout=10)
            raise ProtocolError("runner exited (status %s); stderr tail:\n%s" % (code, "\n".join(self.stderr_tail)))
        try:
            msg = json.loads(line)
        except ValueError:
            raise ProtocolError("not JSON on stdout: %r" % line[:200])
        if not isinstance(msg, dict) or "type" not in msg:
            raise ProtocolError("not a protocol message: %r" % line[:200])
        return msg

    def hello(self):
        msg = self.recv()
        if msg["type"] == "error":
            raise ProtocolError("runner could not start: %s" % msg.get("message"))
        if msg["type"] != "hello" or msg.get("protocol") != 1:
            raise ProtocolError("expected hello with protocol 1, got %r" % msg)
        return msg

    def load(self, pipeline, transformer=None, loras=(), dtype="float32"):
        self.send({"type": "load", "model": "tiny", "pipeline": pipeline, "transformer": transformer,
                   "device": "cpu", "dtype": dtype, "loras": list(loras), "scratch_dir": self.scratch})
        return self.expect_ready()

    def expect_ready(self):
        msg = self.recv()
        if msg["type"] != "ready":
            raise ProtocolError("expected ready, got %r" % msg)
        return msg

    def generate(self, job, params, cancel=False):
        """Runs one job; returns (end message, {index: {frame or None: png bytes}}, progress list)."""
        self.send({"type": "generate", "job": job, "params": params})
        if cancel:
            self.send({"type": "cancel", "job": job})
        pictures, progress = {}, []
        while True:
            msg = self.recv()
            if msg.get("job") != job:
                raise ProtocolError("message for job %r during job %r: %r" % (msg.get("job"), job, msg))
            t = msg["type"]
            if t == "progress":
                progress.append(msg)
            elif t == "image":
                if "png" in msg:
                    png = base64.b64decode(msg["png"])
                else:
                    path = os.path.join(self.scratch, msg["path"])
                    with open(path, "rb") as f:
                        png = f.read()
                    os.remove(path)
                pictures.setdefault(msg["index"], {})[msg.get("frame")] = png
            elif t in ("done", "cancelled", "error"):
                return msg, pictures, progress
            else:
                raise ProtocolError("unexpected message during a job: %r" % msg)

    def close(self, how="unload"):
        try:
            if how == "unload":
                self.send({"type": "unload"})
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            code = self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = "killed after 30 s"
        shutil.rmtree(self.scratch, ignore_errors=True)
        return code


# ---------------------------------------------------------------- cases


def b64_file(path):
    with open(path, "rb") as f:
        return base64.b64encode(f.read()).decode("ascii")


def params_for(call, seed):
    """A fixture call (diffusers keyword arguments) as protocol params."""
    p = {"prompt": call["prompt"], "seed": seed, "count": 1}
    if "negative_prompt" in call:
        p["negative_prompt"] = call["negative_prompt"]
    if "num_inference_steps" in call:
        p["steps"] = call["num_inference_steps"]
    for g in ("true_cfg_scale", "guidance_scale"):
        if g in call:
            p["guidance"] = call[g]
    if "height" in call:
        p["size"] = "%dx%d" % (call["width"], call["height"])
    if "num_frames" in call:
        p["frames"] = call["num_frames"]
    return p


class Checker:
    def __init__(self, args):
        self.args = args
        self.fx = args.fixtures
        with open(os.path.join(self.fx, "expected.json")) as f:
            self.expected = json.load(f)
        self.cases = {c["name"]: c for c in self.expected["cases"]}
        self.cases["wan"] = self.expected["wan"]["case"]
        self.results = []  # (name, status, detail); status OK, HOST (== direct diffusers here) or FAIL
        self.direct = {}
        if args.direct:
            print("running the cases straight through diffusers for comparison...", flush=True)
            self.direct = run_direct(args.python, self.fx, [c for c in args.cases])
            print("direct diffusers: %s" % json.dumps({k: (v[:16] if isinstance(v, str) else [x[:16] for x in v])
                                                       for k, v in self.direct.items()}), flush=True)

    def record(self, name, ok, detail):
        status = ok if isinstance(ok, str) else ("OK" if ok else "FAIL")
        self.results.append((name, status, detail))
        print("%-28s %-4s  %s" % (name, status, detail), flush=True)

    def verdict(self, case_name, got, want, got_px, want_png):
        """OK when got == the reference; HOST when got differs from it but equals what
        diffusers itself gives on this host (with --direct); otherwise FAIL. Non-OK
        results say how far the pixels are from the reference PNG."""
        if got == want:
            return "OK", ""
        extra = ""
        try:
            with open(self.path(want_png), "rb") as f:
                n = near(got_px, decode_png(f.read())[3])
            if n:
                extra = " [%d of %d values differ from %s, by at most %d]" % (n[0], len(got_px), want_png, n[1])
        except OSError:
            pass
        direct = self.direct.get(case_name)
        if direct is not None:
            extra += " [direct diffusers here: %s]" % (direct if isinstance(direct, str) else "frames")[:16]
        return "FAIL", extra

    def runner(self):
        r = Runner(self.args.python, self.args.runner, self.args.timeout, self.args.quiet)
        r.hello()
        return r

    def path(self, *parts):
        return os.path.join(self.fx, *parts)

    def check_image(self, name, case, runner, job, params, index=0, label=None):
        label = label or name
        t0 = time.time()
        end, pics, progress = runner.generate(job, params)
        took = time.time() - t0
        if end["type"] != "done":
            self.record(label, False, "job ended with %r" % end)
            return False
        steps = params.get("steps")
        denoise = [p for p in progress if p.get("stage") == "denoise" and p.get("index", index) == index]
        if steps and len(denoise) < steps:
            self.record(label, False, "%d denoise progress messages for %d steps" % (len(denoise), steps))
            return False
        w, h, c, px = decode_png(pics[index][None])
        got, shape = hashlib.sha256(px).hexdigest(), (h, w, c)
        want = case["image_sha256_u8"]
        status, extra = self.verdict(name, got, want, px, case["png"])
        if status != "OK" and self.direct.get(name) == got:
            status = "HOST"
        if list(shape) != list(case["image_shape"]):
            status = "FAIL"
        self.record(label, status, "%s %s (%.2f s)" % (got[:16], "x".join(map(str, shape)), took)
                    + ("" if status == "OK" else " want %s%s" % (want[:16], extra)))
        return status != "FAIL"

    # -- t2i runner: t2i, t2i_nocfg, count, cancel, invalid params, LoRA swap

    def run_t2i(self, wanted):
        need = {"t2i", "t2i_nocfg", "t2i_lora"} & wanted
        if not need:
            return
        r = self.runner()
        try:
            ready = r.load(self.path("t2i"))
            p = ready.get("params", {})
            ok = (ready.get("class") == "QwenImagePipeline" and ready.get("output") == "image"
                  and "init_image" not in p and "frames" not in p and p.get("size", {}).get("multiple_of") == 16)
            self.record("t2i ready", ok, "class %s, output %s, params %s" % (ready.get("class"), ready.get("output"), sorted(p)))
            t2i, nocfg = self.cases["t2i"], self.cases["t2i_nocfg"]
            job = 1
            if "t2i" in wanted:
                self.check_image("t2i", t2i, r, job, params_for(t2i["call"], t2i["seed"]))
                job += 1
            if "t2i_nocfg" in wanted:
                self.check_image("t2i_nocfg", nocfg, r, job, params_for(nocfg["call"], nocfg["seed"]))
                job += 1
                # count 2 from seed - 1: picture 1 must be the reference (seed + i).
                params = params_for(nocfg["call"], nocfg["seed"] - 1)
                params["count"] = 2
                self.check_image("t2i_nocfg", nocfg, r, job, params, index=1, label="t2i_nocfg count=2 [1]")
                job += 1
            # Cancel: sent right behind its generate.
            params = params_for(t2i["call"], t2i["seed"])
            params["steps"] = 200
            end, pics, _ = r.generate(job, params, cancel=True)
            self.record("cancel", end["type"] == "cancelled" and not pics, "job ended with %s" % end["type"])
            job += 1
            end, _, _ = r.generate(job, dict(params_for(nocfg["call"], 1), bogus=1))
            self.record("unknown parameter", end["type"] == "error" and end.get("kind") == "invalid_params"
                        and end.get("field") == "bogus", "%r" % end)
            job += 1
            if "t2i_lora" in wanted and ready.get("swap_loras"):
                r.send({"type": "loras", "loras": [self.lora()]})
                r.expect_ready()
                self.check_image("t2i_lora", self.cases["t2i_lora"], r, job, params_for(t2i["call"], t2i["seed"]),
                                 label="t2i_lora (swapped in)")
                job += 1
                r.send({"type": "loras", "loras": []})
                r.expect_ready()
                self.check_image("t2i", t2i, r, job, params_for(t2i["call"], t2i["seed"]),
                                 label="t2i (LoRA swapped out)")
                job += 1
        finally:
            code = r.close()
            self.record("t2i runner exit", code == 0, "status %s" % code)
        if "t2i_lora" in wanted:
            r = self.runner()
            try:
                r.load(self.path("t2i"), loras=[self.lora()])
                case = self.cases["t2i_lora"]
                self.check_image("t2i_lora", case, r, 1, params_for(case["call"], case["seed"]))
            finally:
                r.close(how="eof")

    def lora(self):
        return {"name": "tiny", "path": self.path("lora", "pytorch_lora_weights.safetensors"), "strength": 0.8}

    def run_fp8(self):
        r = self.runner()
        try:
            r.load(self.path("t2i"), transformer=self.path("single_file", "tiny-qwen-image_fp8_e4m3fn.safetensors"))
            case = self.cases["t2i_fp8"]
            self.check_image("t2i_fp8", case, r, 1, params_for(case["call"], case["seed"]))
        finally:
            r.close()

    def run_edit(self):
        r = self.runner()
        try:
            ready = r.load(self.path("edit"))
            spec = ready.get("params", {}).get("init_image", {})
            self.record("edit ready", ready.get("class") == "QwenImageEditPlusPipeline" and spec.get("type") == "images",
                        "class %s, init_image %s" % (ready.get("class"), spec))
            case = self.cases["edit"]
            params = params_for(case["call"], case["seed"])
            params["init_image"] = [b64_file(self.path("inputs", "edit_input.png"))]
            self.check_image("edit", case, r, 1, params)
        finally:
            r.close()

    def run_wan(self):
        r = self.runner()
        try:
            ready = r.load(self.path("wan"))
            p = ready.get("params", {})
            self.record("wan ready", ready.get("class") == "WanPipeline" and ready.get("output") == "video"
                        and "frames" in p and "init_image" not in p,
                        "class %s, output %s, params %s" % (ready.get("class"), ready.get("output"), sorted(p)))
            case = self.cases["wan"]
            t0 = time.time()
            end, pics, _ = r.generate(1, params_for(case["call"], case["seed"]))
            took = time.time() - t0
            if end["type"] != "done":
                self.record("wan", False, "job ended with %r" % end)
                return
            frames = pics.get(0, {})
            want = [f["sha256_u8"] for f in case["frames"]]
            got = [pixels_sha256(frames[f])[0] if f in frames else None for f in range(len(want))]
            status = "OK" if got == want and len(frames) == len(want) else "FAIL"
            if status == "FAIL" and self.direct.get("wan") == got and len(frames) == len(want):
                status = "HOST"
            self.record("wan", status, "%d/%d frames match the reference (%.2f s)"
                        % (sum(g == w for g, w in zip(got, want)), len(want), took))
            whole = hashlib.sha256(b"".join(decode_png(frames[f])[3] for f in sorted(frames))).hexdigest()
            self.record("wan video", "OK" if whole == case["video_sha256_u8"] else status, whole[:16])
        finally:
            r.close()

    def run(self):
        wanted = set(self.args.cases)
        steps = [
            (bool({"t2i", "t2i_nocfg", "t2i_lora"} & wanted), lambda: self.run_t2i(wanted)),
            ("t2i_fp8" in wanted, self.run_fp8),
            ("wan" in wanted, self.run_wan),
            ("edit" in wanted, self.run_edit),
        ]
        for enabled, fn in steps:
            if not enabled:
                continue
            try:
                fn()
            except (ProtocolError, OSError, KeyError) as e:
                self.record(fn.__name__ if hasattr(fn, "__name__") else "run", False, "%s: %s" % (type(e).__name__, e))
        failed = [n for n, st, _ in self.results if st == "FAIL"]
        host = [n for n, st, _ in self.results if st == "HOST"]
        print("\n%d checks, %d failed%s" % (len(self.results), len(failed), (": " + ", ".join(failed)) if failed else ""))
        if host:
            print("HOST: %s differ from the references but are exactly what diffusers itself gives on this host "
                  "(its float kernels round differently from the machine that made them); the runner adds nothing."
                  % ", ".join(host))
        return 0 if not failed else 1


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("python", nargs="?", default=os.environ.get("MODELD_RUNNER_PYTHON") or "python3")
    ap.add_argument("--runner", default=DEFAULT_RUNNER)
    ap.add_argument("--fixtures", default=DEFAULT_FIXTURES)
    ap.add_argument("--cases", default=",".join(ALL_CASES), help="comma-separated, from " + ", ".join(ALL_CASES))
    ap.add_argument("--timeout", type=float, default=600, help="seconds to wait for any one message")
    ap.add_argument("--quiet", action="store_true", help="do not echo the runner's stderr")
    ap.add_argument("--direct", action="store_true",
                    help="also run each case straight through diffusers in PYTHON; a case that differs from the "
                         "reference but equals the direct run passes as HOST")
    args = ap.parse_args()
    args.cases = [c for c in args.cases.split(",") if c]
    unknown = set(args.cases) - set(ALL_CASES)
    if unknown:
        ap.error("unknown case(s): " + ", ".join(sorted(unknown)))
    sys.exit(Checker(args).run())


if __name__ == "__main__":
    main()
