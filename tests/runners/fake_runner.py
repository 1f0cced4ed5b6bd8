#!/usr/bin/env python3
"""A fake runner for modeld's runner tests: standard library only.

Speaks runner protocol version 1 (runners/PROTOCOL.md) and misbehaves on
purpose, as chosen by --behaviour:

  good                  declares prompt, negative_prompt, size (16..256, multiple
                        of 16), steps (1..10), guidance, seed, count (1..4),
                        init_image (images), frames (1..9) and the custom option
                        `shift` (number 0..10); loads anything; draws solid-colour
                        PNGs (see COLOURS below), one progress per step
  crash_mid_generation  writes a line to stderr and exits with status 3 after the
                        first step's progress
  hang                  stops answering (and reading) after the first progress
  garbage               prints a line that is not JSON after the first progress,
                        then carries on as `good`
  huge_line             after the first progress prints one line of --huge-mb MB
                        (default 100; a JSON object, slowly, over about a second)
                        before its newline, then carries on as `good`
  ignore_sigterm        ignores SIGTERM, and ignores unload and EOF by sleeping
                        forever; otherwise `good`
  exit_at_load          on load writes "boom: cannot load" to stderr and exits 1
  oom_at_load           on load answers error insufficient_memory and exits 1
  spawn_child           starts a grandchild `sleep 1000` before its hello (pid on
                        stderr, in ready's `child_pid`, and in FILE.child with
                        --record), otherwise `good`
  no_hello              says nothing and sleeps forever

Options:
  --step-s S      sleep S seconds per denoising step (default 0.01)
  --load-s S      sleep S seconds before answering load (default 0)
  --video         output "video": `frames` frames per video (default 3), one
                  `image` message per frame with `frame`
  --via-path      write pictures into the load's scratch_dir and send `path`
  --swap-loras    declare swap_loras: true and answer `loras` with ready
  --record FILE   append every received line to FILE; when saying hello also
                  write os.environ as JSON to FILE.env

COLOURS: picture i of a job (seed s, prompt p) is one solid RGB colour, the
first three bytes of sha256(f"{p}\\n{s + i}") (UTF-8); for frame f of a video,
sha256(f"{p}\\n{s + i}\\n{f}"). Size defaults to 64x64.

A parameter that this runner did not declare, or a value past a declared
limit, is answered with error invalid_params: modeld should have refused it.
"""

import argparse
import base64
import hashlib
import json
import os
import queue
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib

BEHAVIOURS = ["good", "crash_mid_generation", "hang", "garbage", "huge_line", "ignore_sigterm",
              "exit_at_load", "oom_at_load", "spawn_child", "no_hello"]

PARAMS = {
    "prompt": {"type": "string", "max_length": 2000, "required": True},
    "negative_prompt": {"type": "string", "max_length": 2000},
    "size": {"type": "size", "min": 16, "max": 256, "multiple_of": 16, "max_pixels": 65536, "default": "64x64"},
    "steps": {"type": "integer", "min": 1, "max": 10, "default": 4},
    "guidance": {"type": "number", "min": 0, "max": 20, "default": 4.0},
    "seed": {"type": "integer", "min": 0},
    "count": {"type": "integer", "min": 1, "max": 4},
    "init_image": {"type": "images", "max_items": 4, "max_pixels": 65536},
    "frames": {"type": "integer", "min": 1, "max": 9, "default": 3},
    "shift": {"type": "number", "min": 0, "max": 10, "default": 3.0},
}

OUT = None
OUT_LOCK = threading.Lock()


def send_raw(data):
    with OUT_LOCK:
        OUT.write(data)
        OUT.flush()


def send(msg):
    send_raw(json.dumps(msg, separators=(",", ":")).encode() + b"\n")


def log(text):
    sys.stderr.write("fake runner: %s\n" % text)
    sys.stderr.flush()


def sleep_forever():
    while True:
        time.sleep(3600)


# ---------------------------------------------------------------- PNG


def png_chunk(kind, body):
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def solid_png(width, height, rgb):
    row = b"\x00" + bytes(rgb) * width
    raw = row * height
    return (b"\x89PNG\r\n\x1a\n"
            + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + png_chunk(b"IDAT", zlib.compress(raw, 6))
            + png_chunk(b"IEND", b""))


def colour(prompt, seed, frame=None):
    text = "%s\n%d" % (prompt, seed) if frame is None else "%s\n%d\n%d" % (prompt, seed, frame)
    return hashlib.sha256(text.encode("utf-8")).digest()[:3]


# ---------------------------------------------------------------- stdin


class Inbox:
    def __init__(self, record):
        self.q = queue.Queue()
        self.lock = threading.Lock()
        self.pending = set()
        self.cancelled = set()
        self.record = record
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in sys.stdin.buffer:
            if self.record:
                with open(self.record, "ab") as f:
                    f.write(line if line.endswith(b"\n") else line + b"\n")
            try:
                msg = json.loads(line)
            except ValueError:
                log("ignoring a line that is not JSON: %r" % line[:100])
                continue
            if not isinstance(msg, dict):
                continue
            if msg.get("type") == "cancel":
                with self.lock:
                    if msg.get("job") in self.pending:
                        self.cancelled.add(msg.get("job"))
                continue
            if msg.get("type") == "generate":
                with self.lock:
                    self.pending.add(msg.get("job"))
            self.q.put(msg)
        self.q.put(None)

    def is_cancelled(self, job):
        with self.lock:
            return job in self.cancelled

    def done(self, job):
        with self.lock:
            self.pending.discard(job)
            self.cancelled.discard(job)


# ---------------------------------------------------------------- generation


class Invalid(Exception):
    def __init__(self, field, message):
        super().__init__(message)
        self.field = field


def check_params(params):
    for name, value in params.items():
        spec = PARAMS.get(name)
        if spec is None:
            raise Invalid(name, "fake runner: undeclared parameter %r reached the runner" % name)
        t = spec["type"]
        bad = None
        if t in ("integer", "number"):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (t == "integer" and not isinstance(value, int)):
                bad = "not a %s" % t
            elif ("min" in spec and value < spec["min"]) or ("max" in spec and value > spec["max"]):
                bad = "%r outside %s..%s" % (value, spec.get("min"), spec.get("max"))
        elif t == "string":
            if not isinstance(value, str) or len(value) > spec.get("max_length", 1 << 30):
                bad = "not a string within max_length"
        elif t == "size":
            try:
                w, h = (int(x) for x in str(value).lower().split("x"))
            except ValueError:
                bad = "not WxH"
            else:
                m = spec["multiple_of"]
                if not (spec["min"] <= w <= spec["max"] and spec["min"] <= h <= spec["max"]) or w % m or h % m \
                        or w * h > spec["max_pixels"]:
                    bad = "%s outside the declared limits" % value
        elif t == "images":
            items = value if isinstance(value, list) else [value]
            if len(items) > spec["max_items"]:
                bad = "more than %d items" % spec["max_items"]
            for item in items:
                try:
                    if not base64.b64decode(item).startswith(b"\x89PNG"):
                        bad = "not a base64 PNG"
                except Exception:
                    bad = "not base64"
        if bad:
            raise Invalid(name, "fake runner: %s: %s (modeld should have refused it)" % (name, bad))
    if "prompt" not in params:
        raise Invalid("prompt", "fake runner: prompt is required")


class Fake:
    def __init__(self, args, inbox):
        self.args = args
        self.inbox = inbox
        self.scratch = None
        self.child_pid = None

    def ready(self):
        msg = {"type": "ready", "class": "FakePipeline", "output": "video" if self.args.video else "image",
               "swap_loras": bool(self.args.swap_loras), "params": PARAMS}
        if self.child_pid:
            msg["child_pid"] = self.child_pid
        send(msg)

    def generate(self, job, params):
        b = self.args.behaviour
        check_params(params)
        log("job %s params %s" % (job, json.dumps({k: v for k, v in params.items() if k != "init_image"})))
        w, h = (int(x) for x in str(params.get("size", "64x64")).lower().split("x"))
        steps = int(params.get("steps", PARAMS["steps"]["default"]))
        seed = int(params.get("seed", 0))
        count = int(params.get("count", 1))
        frames = int(params.get("frames", PARAMS["frames"]["default"]))
        prompt = params["prompt"]
        first = True
        for i in range(count):
            send({"type": "progress", "job": job, "stage": "encode", "step": 0, "steps": steps, "index": i})
            for step in range(1, steps + 1):
                time.sleep(self.args.step_s)
                if self.inbox.is_cancelled(job):
                    send({"type": "cancelled", "job": job})
                    return
                send({"type": "progress", "job": job, "stage": "denoise", "step": step, "steps": steps, "index": i})
                if first:
                    first = False
                    self.after_first_progress(job)
            send({"type": "progress", "job": job, "stage": "decode", "step": steps, "steps": steps, "index": i})
            if self.args.video:
                for f in range(frames):
                    self.picture(job, i, solid_png(w, h, colour(prompt, seed + i, f)), f)
            else:
                self.picture(job, i, solid_png(w, h, colour(prompt, seed + i)))
        send({"type": "done", "job": job})

    def after_first_progress(self, job):
        b = self.args.behaviour
        if b == "crash_mid_generation":
            log("crashing mid-generation on purpose (exit 3)")
            os._exit(3)
        elif b == "hang":
            log("hanging on purpose")
            sleep_forever()
        elif b == "garbage":
            send_raw(b"this line is not JSON {\n")
        elif b == "huge_line":
            total = self.args.huge_mb * 1024 * 1024
            head = b'{"type":"progress","job":%d,"pad":"' % job
            chunk = b"x" * (1 << 20)
            with OUT_LOCK:
                OUT.write(head)
                written, pieces = 0, max(1, total // len(chunk))
                while written < total:
                    n = min(len(chunk), total - written)
                    OUT.write(chunk[:n])
                    OUT.flush()
                    written += n
                    time.sleep(1.0 / pieces)
                OUT.write(b'"}\n')
                OUT.flush()

    def picture(self, job, index, png, frame=None):
        msg = {"type": "image", "job": job, "index": index}
        if frame is not None:
            msg["frame"] = frame
        if self.args.via_path and self.scratch:
            name = "job%s-%d%s.png" % (job, index, "" if frame is None else "-%03d" % frame)
            tmp = os.path.join(self.scratch, "." + name)
            with open(tmp, "wb") as f:
                f.write(png)
            os.rename(tmp, os.path.join(self.scratch, name))
            msg["path"] = name
        else:
            msg["png"] = base64.b64encode(png).decode("ascii")
        send(msg)


def stop(args):
    if args.behaviour == "ignore_sigterm":
        log("ignoring the stop request on purpose")
        sleep_forever()
    os._exit(0)


def main():
    global OUT
    ap = argparse.ArgumentParser(description="modeld fake runner (tests)")
    ap.add_argument("--behaviour", "--behavior", default="good", choices=BEHAVIOURS)
    ap.add_argument("--step-s", type=float, default=0.01)
    ap.add_argument("--load-s", type=float, default=0.0)
    ap.add_argument("--video", action="store_true")
    ap.add_argument("--via-path", action="store_true")
    ap.add_argument("--swap-loras", action="store_true")
    ap.add_argument("--huge-mb", type=int, default=100)
    ap.add_argument("--record")
    args = ap.parse_args()

    OUT = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    if args.behaviour == "ignore_sigterm":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if args.behaviour == "no_hello":
        log("saying nothing on purpose")
        sleep_forever()

    inbox = Inbox(args.record)
    fake = Fake(args, inbox)
    if args.behaviour == "spawn_child":
        child = subprocess.Popen(["sleep", "1000"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        fake.child_pid = child.pid
        log("grandchild pid %d" % child.pid)
        if args.record:
            with open(args.record + ".child", "w") as f:
                f.write("%d\n" % child.pid)

    if args.record:
        with open(args.record + ".env", "w") as f:
            json.dump(dict(os.environ), f, indent=1, sort_keys=True)
    send({"type": "hello", "protocol": 1, "runner": "fake", "version": "1", "swap_loras": bool(args.swap_loras),
          "params": PARAMS})

    while True:
        msg = inbox.q.get()
        if msg is None:
            log("stdin closed")
            stop(args)
        kind = msg.get("type")
        if kind == "unload":
            log("unload")
            stop(args)
        elif kind == "load":
            if args.load_s:
                time.sleep(args.load_s)
            if args.behaviour == "exit_at_load":
                log("boom: cannot load")
                os._exit(1)
            if args.behaviour == "oom_at_load":
                send({"type": "error", "kind": "insufficient_memory",
                      "message": "fake runner: out of memory: tried to allocate 20.00 GiB"})
                os._exit(1)
            fake.scratch = msg.get("scratch_dir")
            fake.ready()
        elif kind == "loras":
            if args.swap_loras:
                fake.ready()
            else:
                send({"type": "error", "kind": "load_failed", "message": "fake runner: cannot swap LoRAs"})
                os._exit(1)
        elif kind == "generate":
            job = msg.get("job")
            try:
                fake.generate(job, msg.get("params") or {})
            except Invalid as e:
                send({"type": "error", "job": job, "kind": "invalid_params", "message": str(e), "field": e.field})
            inbox.done(job)
        else:
            log("ignoring message type %r" % kind)


if __name__ == "__main__":
    main()
