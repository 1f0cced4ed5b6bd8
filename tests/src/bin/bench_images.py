"""The diffusers side of `bench images` (embedded in bench.rs, run with the
interpreter the bench is given).

    python bench_images.py make-sd15 OUT TOKENIZER_DIR SCHEDULER_CONFIG
        A Stable Diffusion 1.5-shaped pipeline with random weights (UNet,
        VAE and CLIP text encoder at SD1.5's real config shapes, float32
        safetensors) saved in diffusers layout under OUT; the tokenizer and
        scheduler config are copied from the given fixture files.

    python bench_images.py run MODEL SIZE STEPS COUNT GUIDANCE ROUNDS
        ROUNDS timed StableDiffusionPipeline calls on the CPU (FluxPipeline
        when MODEL's model_index.json names it, with 512 T5 tokens); prints one
        JSON line: load_s, rounds (per call: step_s, the seconds between
        consecutive step ends, and generate_s, the whole call) and
        peak_rss_bytes (this process's high-water mark).
"""

import json
import os
import resource
import shutil
import sys
import time


def make_sd15(out, tokenizer_dir, scheduler_config):
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        attention_head_dim=8,
        cross_attention_dim=768,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
        )
    )
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    with open(scheduler_config) as f:
        scheduler = DDIMScheduler.from_config(json.load(f))
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    # The tokenizer files as the fixture has them (tokenizer.json included).
    shutil.rmtree(os.path.join(out, "tokenizer"))
    shutil.copytree(tokenizer_dir, os.path.join(out, "tokenizer"))


def load(model):
    import torch
    from diffusers import FluxPipeline, StableDiffusionPipeline

    with open(os.path.join(model, "model_index.json")) as f:
        flux = json.load(f)["_class_name"] == "FluxPipeline"
    if flux:
        return FluxPipeline.from_pretrained(model, dtype=torch.float32), {"max_sequence_length": 512}
    pipe = StableDiffusionPipeline.from_pretrained(
        model, safety_checker=None, requires_safety_checker=False, dtype=torch.float32
    )
    return pipe, {}


def run(model, size, steps, count, guidance, rounds):
    started = time.perf_counter()
    pipe, extra = load(model)
    pipe.set_progress_bar_config(disable=True)
    load_s = time.perf_counter() - started
    results = [one_call(pipe, size, steps, count, guidance, extra) for _ in range(rounds)]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"load_s": load_s, "rounds": results, "peak_rss_bytes": peak}))


def one_call(pipe, size, steps, count, guidance, extra):
    import torch

    marks = []

    def on_step(pipeline, i, t, kwargs):
        marks.append(time.perf_counter())
        return kwargs

    started = time.perf_counter()
    with torch.inference_mode():
        pipe(
            prompt="a lighthouse at dusk, oil painting",
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=size,
            width=size,
            num_images_per_prompt=count,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
            callback_on_step_end=on_step,
            **extra,
        )
    generate_s = time.perf_counter() - started
    return {"step_s": [b - a for a, b in zip(marks, marks[1:])], "generate_s": generate_s}


def main():
    command, args = sys.argv[1], sys.argv[2:]
    if command == "make-sd15":
        make_sd15(*args)
    elif command == "run":
        model, size, steps, count, guidance, rounds = args
        run(model, int(size), int(steps), int(count), float(guidance), int(rounds))
    else:
        sys.exit("usage: bench_images.py make-sd15 OUT TOKENIZER_DIR SCHEDULER_CONFIG | run MODEL SIZE STEPS COUNT GUIDANCE ROUNDS")


if __name__ == "__main__":
    main()
