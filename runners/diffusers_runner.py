#!/usr/bin/env python3
"""modeld's bundled diffusers runner: runner protocol version 1.

The conversation is specified in runners/PROTOCOL.md (normative). In short:
modeld starts this script with the interpreter named by `[runners] python`,
reads `hello`, sends `load` (a diffusers pipeline folder, optionally a
single-file transformer such as a ComfyUI fp8 `diffusion_models/` file, and
LoRAs), gets `ready` with the parameters this pipeline accepts, then sends
`generate` jobs one at a time and finally `unload` or closes stdin.

Only the standard library, torch and diffusers (with what diffusers itself
needs: transformers, peft for LoRAs, Pillow, numpy) are used. Nothing is ever
downloaded: HF_HUB_OFFLINE=1 is forced before any Hugging Face import.

stdout carries protocol lines only. File descriptor 1 is pointed at stderr at
start (so that libraries, C code included, cannot write into the protocol) and
the protocol is written to a private duplicate of the original stdout.
"""

import base64
import gc
import importlib.util
import inspect
import io
import json
import os
import queue
import re
import sys
import threading
import time
import traceback

PROTOCOL = 1
RUNNER = "diffusers"
VERSION = "1"

# Paths handed to a runner are already resolved by modeld; never reach out.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Pictures whose base64 would make a line longer than this are written to
# scratch_dir and sent by `path` instead (modeld's default line limit is 64 MiB).
PATH_THRESHOLD_BYTES = 16 * 1024 * 1024

# Pipelines whose `image` argument takes several pictures (a list).
MULTI_IMAGE_CLASSES = {"QwenImageEditPlusPipeline"}
# Pipelines that cannot run without an input picture.
IMAGE_REQUIRED_RE = re.compile(r"(Edit|Img2Img|Inpaint|ImageToVideo|I2V|Upscale|Variation)")

DTYPES = ("float32", "float16", "bfloat16")


# ---------------------------------------------------------------- stdio


def _take_stdout():
    """Keeps the real stdout for protocol lines and points fd 1 at stderr."""
    sys.stdout.flush()
    fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return os.fdopen(fd, "wb")


_OUT = _take_stdout()
_OUT_LOCK = threading.Lock()


def log(*parts):
    print("diffusers_runner:", *parts, file=sys.stderr, flush=True)


def send(msg):
    line = json.dumps(msg, separators=(",", ":"), ensure_ascii=True).encode("ascii") + b"\n"
    with _OUT_LOCK:
        try:
            _OUT.write(line)
            _OUT.flush()
        except (BrokenPipeError, OSError) as e:
            # modeld is gone: nobody to answer to.
            log("stdout closed (%s), exiting" % e)
            os._exit(1)


def finish(code=0):
    try:
        sys.stderr.flush()
    except Exception:
        pass
    os._exit(code)


# ---------------------------------------------------------------- stdin


class Inbox:
    """Reads stdin on a thread. `cancel` is acted on at once (it sets a flag the
    step callback checks); every other message is queued for the main loop.
    EOF and `unload` also raise the stop flag, so that a running job ends at
    its next step."""

    def __init__(self):
        self.q = queue.Queue()
        self.lock = threading.Lock()
        self.pending = set()  # generate jobs read but not finished
        self.cancelled = set()
        self.stop = threading.Event()
        t = threading.Thread(target=self._read, name="stdin", daemon=True)
        t.start()

    def _read(self):
        stdin = sys.stdin.buffer
        while True:
            try:
                line = stdin.readline()
            except Exception as e:
                log("stdin read failed: %s" % e)
                line = b""
            if not line:
                self.stop.set()
                self.q.put(None)
                return
            line = line.strip()
            if not line:
                continue
            try:
                msg = json.loads(line)
                if not isinstance(msg, dict):
                    raise ValueError("not a JSON object")
            except Exception as e:
                log("ignoring a line that is not a JSON object (%s): %r" % (e, line[:200]))
                continue
            kind = msg.get("type")
            if kind == "cancel":
                with self.lock:
                    job = msg.get("job")
                    if job in self.pending:
                        self.cancelled.add(job)
                continue
            if kind == "generate":
                with self.lock:
                    self.pending.add(msg.get("job"))
            if kind == "unload":
                self.stop.set()
            self.q.put(msg)

    def get(self):
        return self.q.get()

    def should_stop(self, job):
        if self.stop.is_set():
            return True
        with self.lock:
            return job in self.cancelled

    def done(self, job):
        with self.lock:
            self.pending.discard(job)
            self.cancelled.discard(job)


# ---------------------------------------------------------------- imports

torch = None
diffusers = None
np = None
PIL_Image = None
_import_error = None


def _missing_module():
    for name in ("torch", "diffusers"):
        try:
            if importlib.util.find_spec(name) is None:
                return name, "No module named '%s'" % name
        except Exception as e:  # a broken package can fail here too
            return name, "%s: %s" % (type(e).__name__, e)
    return None


def _import_libraries():
    """Imports the heavy libraries; on failure returns the load_failed message."""
    global torch, diffusers, np, PIL_Image
    name = "torch"
    try:
        import torch as _torch

        name = "diffusers"
        import diffusers as _diffusers

        name = "numpy"
        import numpy as _np

        name = "PIL"
        from PIL import Image as _Image
    except BaseException as e:
        traceback.print_exc()
        return "this Python (%s) cannot import %s: %s: %s" % (sys.executable, name, type(e).__name__, e)
    torch, diffusers, np, PIL_Image = _torch, _diffusers, _np, _Image
    try:
        _diffusers.utils.logging.disable_progress_bar()
    except Exception:
        pass
    return None


def _patch_qwen2vl_processor():
    """transformers 5.x cannot build Qwen2VLProcessor without torchvision
    (the video-processor slot is checked against a class that only exists with
    torchvision), so QwenImageEdit pipelines fail to load. The edit pipelines
    never pass videos: declare the processor as image processor + tokenizer,
    which makes Qwen2VLImageProcessor fall back to its PIL backend. Only done
    when torchvision is not importable; with torchvision the stock processor
    is used (its resize differs slightly, see the fixture's README)."""
    try:
        if importlib.util.find_spec("torchvision") is not None:
            import torchvision  # noqa: F401

            return
    except Exception:
        pass
    try:
        from transformers import Qwen2VLProcessor
    except Exception:
        return
    if getattr(Qwen2VLProcessor, "_modeld_patched", False):
        return
    Qwen2VLProcessor.get_attributes = classmethod(lambda cls: ["image_processor", "tokenizer"])
    Qwen2VLProcessor._modeld_patched = True
    log("torchvision not importable: Qwen2VLProcessor limited to image processor + tokenizer")


# ---------------------------------------------------------------- errors


class Cancelled(Exception):
    pass


class BadParams(Exception):
    def __init__(self, field, message):
        super().__init__(message)
        self.field = field


def is_oom(e):
    if torch is not None:
        oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
        if oom is not None and isinstance(e, oom):
            return True
    if isinstance(e, MemoryError):
        return True
    return "out of memory" in str(e).lower()


def describe(e):
    text = str(e).strip()
    name = type(e).__name__
    if not text:
        return name
    return "%s: %s" % (name, text)


def free_memory():
    gc.collect()
    try:
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:
        pass


# ---------------------------------------------------------------- hello params

HELLO_PARAMS = {
    "prompt": {"type": "string", "max_length": 20000, "required": True},
    "negative_prompt": {"type": "string", "max_length": 20000},
    "size": {"type": "size", "min": 16, "max": 4096, "multiple_of": 16, "max_pixels": 16777216},
    "steps": {"type": "integer", "min": 1, "max": 200},
    "guidance": {"type": "number", "min": 0, "max": 100},
    "seed": {"type": "integer", "min": 0},
    "count": {"type": "integer", "min": 1, "max": 8},
    "init_image": {"type": "images", "max_items": 4, "max_pixels": 16777216},
    "strength": {"type": "number", "min": 0, "max": 1},
    "frames": {"type": "integer", "min": 1, "max": 257},
    "max_sequence_length": {"type": "integer", "min": 1, "max": 4096},
}


# ---------------------------------------------------------------- the model


class Model:
    def __init__(self, msg):
        self.msg = msg
        self.pipe = None
        self.cls = None
        self.sig = {}
        self.params = {}
        self.output = "image"
        self.multi_image = False
        self.loras = []
        self.adapters = []
        self.scratch_dir = msg.get("scratch_dir")

    # -- load

    def load(self):
        msg = self.msg
        pipeline = msg.get("pipeline")
        if not pipeline:
            raise LoadError("the diffusers runner needs a diffusers pipeline folder (`pipeline` is null)")
        index_path = os.path.join(pipeline, "model_index.json")
        try:
            with open(index_path, encoding="utf-8") as f:
                index = json.load(f)
        except FileNotFoundError:
            raise LoadError("%s has no model_index.json: not a diffusers pipeline folder" % pipeline)
        except ValueError as e:
            raise LoadError("%s: not valid JSON: %s" % (index_path, e))

        dtype_name = msg.get("dtype") or "float32"
        if dtype_name not in DTYPES:
            raise LoadError("unknown dtype %r (expected one of %s)" % (dtype_name, ", ".join(DTYPES)))
        dtype = getattr(torch, dtype_name)
        device = msg.get("device") or "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise LoadError("device %s asked for, but this torch (%s) sees no CUDA device" % (device, torch.__version__))
        if not (device == "cpu" or device.startswith("cuda")):
            raise LoadError("unknown device %r (expected cpu or cuda)" % device)

        _patch_qwen2vl_processor()
        dtype_kw = _dtype_kwarg()

        kwargs = {dtype_kw: dtype}
        transformer_file = msg.get("transformer")
        if transformer_file and not os.path.isfile(transformer_file):
            raise LoadError("transformer file %s does not exist" % transformer_file)
        if transformer_file:
            entry = index.get("transformer")
            if not (isinstance(entry, list) and len(entry) == 2 and entry[1]):
                raise LoadError("%s has no transformer component to replace with %s" % (pipeline, transformer_file))
            library, class_name = entry
            module = diffusers if library in (None, "diffusers") else importlib.import_module(library)
            klass = getattr(module, class_name, None)
            if klass is None:
                raise LoadError("%s.%s (model_index.json's transformer) does not exist in this %s" % (library, class_name, library))
            if not hasattr(klass, "from_single_file"):
                raise LoadError("%s cannot be loaded from a single file (no from_single_file)" % class_name)
            log("loading transformer %s from %s" % (class_name, transformer_file))
            kwargs["transformer"] = klass.from_single_file(
                transformer_file, config=os.path.join(pipeline, "transformer"), **{dtype_kw: dtype}
            )

        log("loading %s from %s (%s, %s)" % (index.get("_class_name"), pipeline, dtype_name, device))
        pipe = diffusers.DiffusionPipeline.from_pretrained(pipeline, **kwargs)
        try:
            pipe.set_progress_bar_config(disable=True)
        except Exception:
            pass
        if device != "cpu":
            pipe = pipe.to(device)
        self.pipe = pipe
        self.cls = type(pipe).__name__
        self.sig = dict(inspect.signature(pipe.__call__).parameters)
        self.multi_image = self.cls in MULTI_IMAGE_CLASSES
        self.output = "video" if "num_frames" in self.sig else "image"
        self.params = self._declare()
        self.set_loras(msg.get("loras") or [])
        free_memory()

    def can_swap_loras(self):
        return hasattr(self.pipe, "load_lora_weights") and hasattr(self.pipe, "set_adapters")

    def set_loras(self, loras):
        pipe = self.pipe
        if not loras and not self.adapters:
            return
        if not self.can_swap_loras():
            raise LoadError("%s does not take LoRAs (no load_lora_weights)" % self.cls)
        if self.adapters:
            pipe.unload_lora_weights()
            self.adapters = []
            free_memory()
        names, weights = [], []
        for i, lora in enumerate(loras):
            path = lora.get("path")
            if not path:
                raise LoadError("LoRA %d has no path" % i)
            if not os.path.exists(path):
                raise LoadError("LoRA file %s does not exist" % path)
            name = _adapter_name(lora.get("name") or os.path.splitext(os.path.basename(path))[0], names)
            log("loading LoRA %s from %s at %s" % (name, path, lora.get("strength", 1.0)))
            pipe.load_lora_weights(path, adapter_name=name)
            names.append(name)
            weights.append(float(lora.get("strength", 1.0)))
        if names:
            pipe.set_adapters(names, adapter_weights=weights)
        self.adapters = names
        self.loras = loras

    def _declare(self):
        """Which generation parameters this pipeline takes, from __call__'s signature."""
        sig = self.sig
        p = {"prompt": dict(HELLO_PARAMS["prompt"])}
        if "negative_prompt" in sig:
            p["negative_prompt"] = dict(HELLO_PARAMS["negative_prompt"])
        if "height" in sig and "width" in sig:
            m = self._size_multiple()
            size = {"type": "size", "min": m, "max": 4096, "multiple_of": m, "max_pixels": 4096 * 4096}
            h, w = _default(sig["height"]), _default(sig["width"])
            if isinstance(h, int) and isinstance(w, int):
                size["default"] = "%dx%d" % (w, h)
            p["size"] = size
        if "num_inference_steps" in sig:
            p["steps"] = _with_default(dict(HELLO_PARAMS["steps"]), sig["num_inference_steps"])
        guidance_arg = self._guidance_arg()
        if guidance_arg:
            p["guidance"] = _with_default(dict(HELLO_PARAMS["guidance"]), sig[guidance_arg])
        p["seed"] = dict(HELLO_PARAMS["seed"])
        p["count"] = dict(HELLO_PARAMS["count"])
        if "image" in sig:
            if self.multi_image:
                spec = {"type": "images", "max_items": 4, "max_pixels": 16777216}
            else:
                spec = {"type": "image", "max_pixels": 16777216}
            if IMAGE_REQUIRED_RE.search(self.cls) or sig["image"].default is inspect.Parameter.empty:
                spec["required"] = True
            p["init_image"] = spec
        if "strength" in sig:
            p["strength"] = _with_default(dict(HELLO_PARAMS["strength"]), sig["strength"])
        if "num_frames" in sig:
            p["frames"] = _with_default(dict(HELLO_PARAMS["frames"]), sig["num_frames"])
        if "max_sequence_length" in sig:
            spec = dict(HELLO_PARAMS["max_sequence_length"])
            d = _default(sig["max_sequence_length"])
            if isinstance(d, int) and d > 0:
                spec["max"] = d
                spec["default"] = d
            p["max_sequence_length"] = spec
        return p

    def _guidance_arg(self):
        if "true_cfg_scale" in self.sig:
            return "true_cfg_scale"
        if "guidance_scale" in self.sig:
            return "guidance_scale"
        return None

    def _size_multiple(self):
        pipe = self.pipe
        scale = getattr(pipe, "vae_scale_factor_spatial", None) or getattr(pipe, "vae_scale_factor", None) or 8
        patch = 1
        denoiser = getattr(pipe, "transformer", None)
        cfg = getattr(denoiser, "config", None)
        if cfg is not None:
            ps = getattr(cfg, "patch_size", None) or 1
            if isinstance(ps, (list, tuple)):
                ps = ps[-1] or 1
            patch = int(ps)
            # FLUX-style pipelines pack 2x2 latent patches themselves (patch_size 1,
            # in_channels = 4 x the VAE's latent channels).
            vae_cfg = getattr(getattr(pipe, "vae", None), "config", None)
            latent = getattr(vae_cfg, "latent_channels", None) or getattr(vae_cfg, "z_dim", None)
            if patch == 1 and latent and getattr(cfg, "in_channels", None) == 4 * latent:
                patch = 2
        try:
            return max(1, int(scale) * patch)
        except Exception:
            return 16

    # -- generate

    def generate(self, inbox, job, params):
        pipe = self.pipe
        sig = self.sig
        seed = int(params.get("seed", 0))
        count = int(params.get("count", 1))
        kw = self._call_kwargs(params)

        steps = kw.get("num_inference_steps") or self.params.get("steps", {}).get("default")
        state = {"index": 0}

        def on_step(p, i, t, callback_kwargs):
            if inbox.should_stop(job):
                raise Cancelled()
            total = getattr(p, "_num_timesteps", None) or steps or (i + 1)
            send({"type": "progress", "job": job, "stage": "denoise", "step": i + 1, "steps": total, "index": state["index"]})
            if i + 1 >= total:
                send({"type": "progress", "job": job, "stage": "decode", "step": total, "steps": total, "index": state["index"]})
            return callback_kwargs

        if "callback_on_step_end" in sig:
            kw["callback_on_step_end"] = on_step
        if "output_type" in sig:
            kw["output_type"] = "np"

        for i in range(count):
            if inbox.should_stop(job):
                raise Cancelled()
            state["index"] = i
            send({"type": "progress", "job": job, "stage": "encode", "step": 0, "steps": steps or 0, "index": i})
            generator = torch.Generator("cpu").manual_seed(seed + i)
            result = pipe(generator=generator, **kw)
            if inbox.should_stop(job):
                raise Cancelled()
            self._send_output(job, i, result)
        send({"type": "done", "job": job})

    def _call_kwargs(self, params):
        sig = self.sig
        kw = {}
        unknown = [k for k in params if k not in self.params]
        if unknown:
            raise BadParams(unknown[0], "%s does not take parameter %r" % (self.cls, unknown[0]))
        prompt = params.get("prompt")
        if not isinstance(prompt, str):
            raise BadParams("prompt", "prompt must be a string")
        kw["prompt"] = prompt
        neg = params.get("negative_prompt")
        if neg is not None:
            kw["negative_prompt"] = neg
        size = params.get("size")
        if size is not None:
            m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", str(size))
            if not m:
                raise BadParams("size", "size must be \"WxH\", got %r" % (size,))
            kw["width"], kw["height"] = int(m.group(1)), int(m.group(2))
        if params.get("steps") is not None:
            kw["num_inference_steps"] = int(params["steps"])
        if params.get("guidance") is not None:
            kw[self._guidance_arg()] = float(params["guidance"])
        if params.get("strength") is not None:
            kw["strength"] = float(params["strength"])
        if params.get("frames") is not None:
            kw["num_frames"] = int(params["frames"])
        if params.get("max_sequence_length") is not None:
            kw["max_sequence_length"] = int(params["max_sequence_length"])
        init = params.get("init_image")
        if init is not None:
            images = init if isinstance(init, list) else [init]
            if not images:
                raise BadParams("init_image", "init_image is an empty list")
            decoded = [_decode_image(x, n) for n, x in enumerate(images)]
            if len(decoded) > 1 and not self.multi_image:
                raise BadParams("init_image", "%s takes one init_image, got %d" % (self.cls, len(decoded)))
            kw["image"] = decoded if len(decoded) > 1 else decoded[0]
        return kw

    def _send_output(self, job, index, result):
        frames = getattr(result, "frames", None)
        if frames is not None:
            video = frames[0]
            for f, frame in enumerate(video):
                self._send_picture(job, index, _to_u8(frame), frame_no=f)
            return
        images = getattr(result, "images", None)
        if images is None:
            images = result[0] if isinstance(result, (tuple, list)) else result
        self._send_picture(job, index, _to_u8(images[0]))

    def _send_picture(self, job, index, u8, frame_no=None):
        png = encode_png(u8)
        msg = {"type": "image", "job": job, "index": index}
        if frame_no is not None:
            msg["frame"] = frame_no
        if len(png) * 4 // 3 > PATH_THRESHOLD_BYTES and self.scratch_dir and os.path.isdir(self.scratch_dir):
            name = "job%s-%d%s.png" % (job, index, "" if frame_no is None else "-%05d" % frame_no)
            tmp = os.path.join(self.scratch_dir, "." + name + ".tmp")
            with open(tmp, "wb") as f:
                f.write(png)
            os.replace(tmp, os.path.join(self.scratch_dir, name))
            msg["path"] = name
        else:
            msg["png"] = base64.b64encode(png).decode("ascii")
        send(msg)


class LoadError(Exception):
    pass


def _dtype_kwarg():
    """diffusers >= 0.36-ish renamed torch_dtype to dtype (torch_dtype warns)."""
    try:
        from diffusers.utils import deprecation_utils

        if hasattr(deprecation_utils, "_resolve_dtype"):
            return "dtype"
    except Exception:
        pass
    return "torch_dtype"


def _default(param):
    d = param.default
    return None if d is inspect.Parameter.empty else d


def _with_default(spec, param):
    d = _default(param)
    if isinstance(d, bool) or d is None:
        return spec
    if isinstance(d, (int, float)):
        spec["default"] = d
    return spec


def _adapter_name(name, taken):
    clean = re.sub(r"[^A-Za-z0-9_]", "_", str(name)) or "lora"
    if clean[0].isdigit():
        clean = "l_" + clean
    out, n = clean, 2
    while out in taken:
        out = "%s_%d" % (clean, n)
        n += 1
    return out


def _decode_image(data, n):
    field = "init_image"
    if not isinstance(data, str):
        raise BadParams(field, "init_image[%d] must be a base64 PNG string" % n)
    if data.startswith("data:"):
        data = data.split(",", 1)[-1]
    try:
        raw = base64.b64decode(data, validate=False)
        img = PIL_Image.open(io.BytesIO(raw))
        img.load()
    except Exception as e:
        raise BadParams(field, "init_image[%d] is not a readable picture: %s" % (n, e))
    return img.convert("RGB")


def _to_u8(x):
    """[0, 1] float picture (HWC, as diffusers' output_type='np' gives) to uint8,
    exactly as the references were made: (x * 255).round().astype(uint8)."""
    if PIL_Image is not None and isinstance(x, PIL_Image.Image):
        return np.asarray(x.convert("RGB") if x.mode not in ("RGB", "RGBA", "L") else x)
    if torch is not None and isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    x = np.asarray(x)
    if x.ndim == 3 and x.shape[0] in (1, 3, 4) and x.shape[-1] not in (1, 3, 4):
        x = x.transpose(1, 2, 0)
    if x.dtype == np.uint8:
        return x
    u8 = np.clip((x * 255).round(), 0, 255).astype(np.uint8)
    if u8.ndim == 3 and u8.shape[-1] == 1:
        u8 = u8[..., 0]
    return u8


def encode_png(u8):
    buf = io.BytesIO()
    PIL_Image.fromarray(np.ascontiguousarray(u8)).save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------- main loop


def main():
    missing = _missing_module()
    if missing:
        name, err = missing
        send({"type": "error", "kind": "load_failed",
              "message": "this Python (%s) cannot import %s: %s" % (sys.executable, name, err)})
        finish(1)

    inbox = Inbox()
    send({"type": "hello", "protocol": PROTOCOL, "runner": RUNNER, "version": VERSION,
          "swap_loras": False, "params": HELLO_PARAMS})
    # Import while modeld prepares the load: the hello goes out in well under a second.
    import_error = _import_libraries()

    model = None
    while True:
        msg = inbox.get()
        if msg is None:
            log("stdin closed, exiting")
            finish(0)
        kind = msg.get("type")
        if kind == "unload":
            log("unload, exiting")
            model = None
            free_memory()
            finish(0)
        elif kind == "load":
            if import_error:
                send({"type": "error", "kind": "load_failed", "message": import_error})
                finish(1)
            model = None
            free_memory()
            model = Model(msg)
            t0 = time.time()
            try:
                model.load()
            except BaseException as e:
                traceback.print_exc()
                kind_ = "insufficient_memory" if is_oom(e) else "load_failed"
                send({"type": "error", "kind": kind_, "message": describe(e) if not isinstance(e, LoadError) else str(e)})
                finish(1)
            log("loaded %s in %.2f s" % (model.cls, time.time() - t0))
            send(_ready(model))
        elif kind == "loras":
            if model is None:
                send({"type": "error", "kind": "load_failed", "message": "loras before load"})
                continue
            try:
                model.set_loras(msg.get("loras") or [])
            except BaseException as e:
                traceback.print_exc()
                kind_ = "insufficient_memory" if is_oom(e) else "load_failed"
                send({"type": "error", "kind": kind_, "message": describe(e) if not isinstance(e, LoadError) else str(e)})
                finish(1)
            send(_ready(model))
        elif kind == "generate":
            job = msg.get("job")
            run_job(model, inbox, job, msg.get("params") or {})
            inbox.done(job)
            if inbox.stop.is_set():
                # unload or EOF arrived while the job ran: the loop reads it next.
                pass
        else:
            log("ignoring message of type %r" % (kind,))


def _ready(model):
    return {"type": "ready", "class": model.cls, "output": model.output,
            "swap_loras": model.can_swap_loras(), "params": model.params}


def run_job(model, inbox, job, params):
    if model is None:
        send({"type": "error", "job": job, "kind": "inference_failed", "message": "generate before load"})
        return
    try:
        model.generate(inbox, job, params)
    except Cancelled:
        send({"type": "cancelled", "job": job})
    except BadParams as e:
        send({"type": "error", "job": job, "kind": "invalid_params", "message": str(e), "field": e.field})
    except BaseException as e:
        traceback.print_exc()
        kind = "insufficient_memory" if is_oom(e) else "inference_failed"
        send({"type": "error", "job": job, "kind": kind, "message": describe(e)})
        free_memory()
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            finish(1)


if __name__ == "__main__":
    main()
