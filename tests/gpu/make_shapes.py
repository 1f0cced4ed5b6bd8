#!/usr/bin/env python3
"""Writes tests/gpu/shapes/{sd15,sdxl,flux-dev}.json: the configs and tensor
shapes of a Stable Diffusion 1.5, an SDXL base and a FLUX.1-dev pipeline,
as diffusers and transformers build them, for acceptance.py to write
zero-weight pipelines of the real sizes (sparse files) on a GPU machine
that has no diffusers.

Needs torch, diffusers and transformers (accelerate is used when present);
builds every network on the meta device, so it takes seconds and no
memory. Run it again when the shapes should follow a newer diffusers, for
all pipelines or the ones named:

    python tests/gpu/make_shapes.py [sd15] [sdxl] [flux-dev]
"""

import json
import os
import sys

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
# FLUX.1-dev's text_encoder is CLIP-L with the config openai published:
# the end token given as 2 (transformers then pools at the largest id).
CLIP_L_FLUX = dict(CLIP_L, projection_dim=768, bos_token_id=0, eos_token_id=2, pad_token_id=1)
# google/t5-v1_1-xxl, FLUX's text_encoder_2, as its config.json gives it;
# transformers 5 writes an encoder's is_encoder_decoder, use_cache and
# tie_word_embeddings as false, false and true whatever it was given.
T5_XXL = dict(
    vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_decoder_layers=24,
    num_heads=64, relative_attention_num_buckets=32, relative_attention_max_distance=128,
    dropout_rate=0.1, layer_norm_epsilon=1e-6, initializer_factor=1.0, feed_forward_proj="gated-gelu",
    is_encoder_decoder=True, use_cache=True, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    tie_word_embeddings=False, classifier_dropout=0.0,
)
FLUX_DEV = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
FLUX_SCHEDULER = dict(
    base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5, max_shift=1.15, shift=3.0,
    use_dynamic_shifting=True, num_train_timesteps=1000,
)
CLIP_BIG_G = dict(
    vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
    num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280,
)


def empty_weights():
    """A context in which networks are built without memory."""
    try:
        from accelerate import init_empty_weights
        return init_empty_weights()
    except ImportError:
        import torch
        return torch.device("meta")


def described(model, config):
    """The config and the tensors as save_pretrained writes them: a tensor
    tied to an earlier one (T5's encoder.embed_tokens is its `shared`) is
    saved once, under its first name."""
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers(remove_duplicate=False))
    seen, shapes = set(), {}
    for name, tensor in model.state_dict().items():
        key = id(tensors.get(name, tensor))
        if key not in seen:
            seen.add(key)
            shapes[name] = list(tensor.shape)
    return {"config": config, "tensors": shapes}


def diffusers_part(kind, **config):
    with empty_weights():
        model = kind(**config)
    return described(model, json.loads(model.to_json_string()))


def unet_part(**config):
    from diffusers import UNet2DConditionModel
    return diffusers_part(UNet2DConditionModel, **config)


def vae_part(**config):
    from diffusers import AutoencoderKL
    return diffusers_part(AutoencoderKL, **config)


def transformers_part(model_class, config):
    with empty_weights():
        model = model_class(config)
    text = config.to_dict()
    text["architectures"] = [model_class.__name__]
    return described(model, text)


def clip_part(projected, **config):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    kind = CLIPTextModelWithProjection if projected else CLIPTextModel
    return transformers_part(kind, CLIPTextConfig(**config))


def t5_part(**config):
    from transformers import T5Config, T5EncoderModel
    return transformers_part(T5EncoderModel, T5Config(**config))


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


def flux_dev():
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER)
    return {
        "model_index": {
            "_class_name": "FluxPipeline",
            "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "text_encoder_2": ["transformers", "T5EncoderModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "tokenizer_2": ["transformers", "T5Tokenizer"],
            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            "feature_extractor": [None, None], "image_encoder": [None, None],
        },
        "components": {
            "transformer": diffusers_part(FluxTransformer2DModel, **FLUX_DEV),
            "vae": vae_part(
                sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                use_post_quant_conv=False, force_upcast=True, **dict(VAE, latent_channels=16),
            ),
            "text_encoder": clip_part(False, **CLIP_L_FLUX),
            "text_encoder_2": t5_part(**T5_XXL),
        },
        "scheduler": json.loads(scheduler.to_json_string()),
        "tokenizers": {"tokenizer": "tiny-flux/dev/tokenizer", "tokenizer_2": "tiny-flux/dev/tokenizer_2"},
    }


PIPELINES = {"sd15": sd15, "sdxl": sdxl, "flux-dev": flux_dev}


def main():
    os.makedirs(os.path.join(HERE, "shapes"), exist_ok=True)
    names = sys.argv[1:] or list(PIPELINES)
    unknown = [name for name in names if name not in PIPELINES]
    if unknown:
        sys.exit("unknown pipeline %s; these are known: %s" % (", ".join(unknown), ", ".join(PIPELINES)))
    for name in names:
        build = PIPELINES[name]
        with open(os.path.join(HERE, "shapes", name + ".json"), "w") as f:
            json.dump(build(), f, indent=None, separators=(",", ":"))
            f.write("\n")


if __name__ == "__main__":
    main()
