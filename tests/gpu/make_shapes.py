#!/usr/bin/env python3
"""Writes tests/gpu/shapes/{sd15,sdxl}.json: the configs and tensor shapes of
a Stable Diffusion 1.5 and an SDXL base pipeline, as diffusers and
transformers build them, for acceptance.py to write zero-weight pipelines
of the real sizes (sparse files) on a GPU machine that has no diffusers.

Needs torch, diffusers, transformers and accelerate; builds every network
on the meta device, so it takes seconds and no memory. Run it again when
the shapes should follow a newer diffusers:

    python tests/gpu/make_shapes.py
"""

import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(os.path.dirname(HERE), "fixtures")

VAE = dict(
    in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
)
CLIP_L = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
)
CLIP_BIG_G = dict(
    vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
    num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280,
)


def described(model, config):
    shapes = {name: list(t.shape) for name, t in model.state_dict().items()}
    return {"config": config, "tensors": shapes}


def unet_part(**config):
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    with init_empty_weights():
        unet = UNet2DConditionModel(**config)
    return described(unet, json.loads(unet.to_json_string()))


def vae_part(**config):
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL
    with init_empty_weights():
        vae = AutoencoderKL(**config)
    return described(vae, json.loads(vae.to_json_string()))


def clip_part(projected, **config):
    from accelerate import init_empty_weights
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    clip_config = CLIPTextConfig(**config)
    with init_empty_weights():
        model = (CLIPTextModelWithProjection if projected else CLIPTextModel)(clip_config)
    text = clip_config.to_dict()
    text["architectures"] = [type(model).__name__]
    return described(model, text)


def scheduler_of(fixture):
    with open(os.path.join(FIXTURES, fixture, "scheduler", "scheduler_config.json")) as f:
        return json.load(f)


def sd15():
    unet = unet_part(
        sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2, attention_head_dim=8, cross_attention_dim=768,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )
    return {
        "model_index": {
            "_class_name": "StableDiffusionPipeline",
            "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDIMScheduler"],
            "safety_checker": [None, None], "feature_extractor": [None, None],
            "requires_safety_checker": False,
        },
        "components": {
            "unet": unet, "vae": vae_part(sample_size=512, **VAE),
            "text_encoder": clip_part(False, **CLIP_L),
        },
        "scheduler": scheduler_of("tiny-sd"),
        "tokenizers": {"tokenizer": "tiny-sd/tokenizer"},
    }


def sdxl():
    unet = unet_part(
        sample_size=128, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280),
        layers_per_block=2, transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    )
    return {
        "model_index": {
            "_class_name": "StableDiffusionXLPipeline",
            "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "scheduler": ["diffusers", "EulerDiscreteScheduler"],
            "force_zeros_for_empty_prompt": True,
        },
        "components": {
            "unet": unet,
            "vae": vae_part(sample_size=1024, scaling_factor=0.13025, force_upcast=True, **VAE),
            "text_encoder": clip_part(False, **CLIP_L),
            "text_encoder_2": clip_part(True, **CLIP_BIG_G),
        },
        "scheduler": scheduler_of("tiny-sdxl"),
        "tokenizers": {"tokenizer": "tiny-sdxl/tokenizer", "tokenizer_2": "tiny-sdxl/tokenizer_2"},
    }


def main():
    os.makedirs(os.path.join(HERE, "shapes"), exist_ok=True)
    for name, build in [("sd15", sd15), ("sdxl", sdxl)]:
        with open(os.path.join(HERE, "shapes", name + ".json"), "w") as f:
            json.dump(build(), f, indent=None, separators=(",", ":"))
            f.write("\n")


if __name__ == "__main__":
    main()
