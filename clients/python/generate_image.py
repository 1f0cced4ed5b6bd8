#!/usr/bin/env python3
"""Generates pictures with a modeld image model (or mode) and saves the PNGs.

    python3 generate_image.py sd15 "a lighthouse at dusk" --size 512x512 --steps 20 --out pictures
    python3 generate_image.py --mode sdxl-general "a lighthouse at dusk"
    python3 generate_image.py sd15 "the same, at night" --init-image day.png --strength 0.6 --scheduler euler_a

The daemon also writes each picture under its own `[images] output_dir`;
this asks for the bytes inline so they can be saved wherever the caller
likes, even on a machine that cannot read the daemon's folder. Standard
library only, with modeld_client beside it.
"""

import argparse
import base64
import os
import sys

from modeld_client import Client


def generate_image(target, prompt, out_dir, mode=False, **params):
    """Runs one image request and saves its pictures in `out_dir`.

    `params` are the request's other fields (size, steps, guidance, seed,
    count, negative_prompt, scheduler, init_image as base64 PNG, strength).
    Calls `progress(step, steps)` for every denoising step if given.
    Returns the paths written.
    """
    progress = params.pop("progress", None)
    request = {"prompt": prompt, "inline": True}
    request["mode" if mode else "model"] = target
    request.update({k: v for k, v in params.items() if v is not None})
    done = None
    with Client() as client:
        for event in client.stream("generate", request):
            if event["event"] == "progress" and progress and \
                    event.get("stage", "denoise") == "denoise":
                progress(event["step"], event["steps"])
            elif event.get("done"):
                done = event
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for image in done["images"]:
        path = os.path.join(out_dir, os.path.basename(image["path"]))
        with open(path, "wb") as f:
            f.write(base64.b64decode(image["base64"]))
        paths.append(path)
    return paths


def main():
    parser = argparse.ArgumentParser(description="Generate pictures with modeld.")
    parser.add_argument("target", help="a registered image model, or a mode with --mode")
    parser.add_argument("prompt")
    parser.add_argument("--mode", action="store_true", help="target names a mode")
    parser.add_argument("--negative-prompt")
    parser.add_argument("--size", help="WxH, multiples of 8")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--guidance", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--count", type=int)
    parser.add_argument("--scheduler", help="ddim, euler, euler_a, ddpm, dpmpp_2m or unipc")
    parser.add_argument("--init-image", help="img2img: the PNG to start from")
    parser.add_argument("--strength", type=float, help="img2img: how much to redraw, in (0, 1]")
    parser.add_argument("--out", default=".", help="folder for the PNG files")
    args = parser.parse_args()

    def progress(step, steps):
        print("\rstep %d/%d" % (step, steps), end="", file=sys.stderr, flush=True)

    init_image = None
    if args.init_image:
        with open(args.init_image, "rb") as f:
            init_image = base64.b64encode(f.read()).decode("ascii")
    paths = generate_image(
        args.target, args.prompt, args.out, mode=args.mode, progress=progress,
        negative_prompt=args.negative_prompt, size=args.size, steps=args.steps,
        guidance=args.guidance, seed=args.seed, count=args.count,
        scheduler=args.scheduler, init_image=init_image, strength=args.strength,
    )
    print(file=sys.stderr)
    for path in paths:
        print(path)


if __name__ == "__main__":
    main()
