"""Stable Diffusion component configs as data: tiny test shapes, the sandbox model, and SD1.5/SD2.1 shapes.

Every preset builds the exact SD component types (AutoencoderKL, UNet2DConditionModel, CLIPTextModel,
CLIPTokenizer, DDPMScheduler), so code tested on them runs unchanged on real Stable Diffusion.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from noclone.errors import NocloneError

PRESETS: dict[str, dict[str, Any]] = {
    # Smallest SD1-shaped pipeline: unit tests.
    "tiny": {
        "resolution": 32,
        "unet": dict(
            block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, attention_head_dim=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=16,
        ),
        "vae": dict(block_out_channels=(16, 32), layers_per_block=1, latent_channels=4, norm_num_groups=16),
        "text": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
        "prediction_type": "epsilon",
    },
    # SD2-shaped tiny pipeline: linear projections, per-block head dims, v-prediction.
    "tiny-sd2": {
        "resolution": 32,
        "unet": dict(
            block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, attention_head_dim=(2, 4),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=16, use_linear_projection=True,
        ),
        "vae": dict(block_out_channels=(16, 32), layers_per_block=1, latent_channels=4, norm_num_groups=16),
        "text": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, hidden_act="gelu"),
        "prediction_type": "v_prediction",
    },
    # The embedded sandbox model: 64x64 images, 16x16x8 latents (VAE factor 4), ~11M-parameter UNet.
    # Cross-attention at 8x8 and 4x4 only: attention at 16x16 costs 40% of a CPU training step.
    "sandbox": {
        "resolution": 64,
        "unet": dict(
            block_out_channels=(64, 128, 192), layers_per_block=1, cross_attention_dim=64, attention_head_dim=8,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), norm_num_groups=32,
        ),
        # 8 latent channels (SD uses 4): a 6x compression this small VAE learns in minutes on a CPU
        "vae": dict(block_out_channels=(16, 32, 64), layers_per_block=1, latent_channels=8, norm_num_groups=4),
        "text": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4),
        "prediction_type": "epsilon",
    },
    # Sandbox v2: SD's VAE shape (8x down, 4 latent channels) at 128 px, so latents stay 16x16; a UNet with SD's two
    # layers per block (cross-attention at 8x8 and 4x4 keeps a CPU DreamBooth step ~1.2x v1's); a deeper text encoder
    # for compositional captions. About 53 MB as written (UNet and VAE fp16, text encoder fp32).
    "sandbox-v2": {
        "resolution": 128,
        "unet": dict(
            block_out_channels=(64, 128, 192), layers_per_block=2, cross_attention_dim=64, attention_head_dim=8,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), norm_num_groups=32,
        ),
        "vae": dict(block_out_channels=(32, 64, 128, 128), layers_per_block=1, latent_channels=4, norm_num_groups=16),
        "text": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=6, num_attention_heads=4),
        "prediction_type": "epsilon",
    },
    # Real shapes with random weights: memory plans and shape tests only.
    "sd15-shapes": {
        "resolution": 512,
        "unet": dict(
            block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, norm_num_groups=32,
        ),
        "vae": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, norm_num_groups=32),
        "text": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, hidden_act="quick_gelu"),
        "prediction_type": "epsilon",
    },
}

# Sandbox v2 at 64 px: v2's UNet and text encoder (for the compositional captions and bound rare tokens) on v1's 64 px
# renders and 4x VAE. The VAE is not where v1 loses identity (its round trip keeps 0.99-1.00 of the identity match),
# and this world trains on 2 CPU cores in under two hours where v2's 128 px VAE needs a GPU.
PRESETS["sandbox-v2-64"] = {**PRESETS["sandbox-v2"], "resolution": 64, "vae": PRESETS["sandbox"]["vae"]}

# sandbox-v2-64 with SD2.1's v-prediction and a noise schedule rescaled to zero terminal SNR, sampled from t = T
# ("trailing"), as in Lin et al. 2024. On a 16x16 latent the sandbox's identities are mostly colours of large areas,
# the lowest frequencies, which SD's schedule leaves partly in the starting noise: an epsilon model then copies
# them from the noise whatever the prompt, and DreamBooth's epsilon loss gives them almost no weight at high noise.
# At zero terminal SNR nothing is left in the starting noise, and the v-loss weighs the image itself there.
PRESETS["sandbox-v2-64-zsnr"] = {**PRESETS["sandbox-v2-64"], "prediction_type": "v_prediction",
                                 "schedule": dict(rescale_betas_zero_snr=True, timestep_spacing="trailing")}


def build_unet(preset: str):
    from diffusers import UNet2DConditionModel

    spec = _preset(preset)
    n_latent = 2 ** (len(spec["vae"]["block_out_channels"]) - 1)
    channels = spec["vae"]["latent_channels"]
    return UNet2DConditionModel(
        sample_size=spec["resolution"] // n_latent, in_channels=channels, out_channels=channels, **spec["unet"]
    )


def build_vae(preset: str):
    from diffusers import AutoencoderKL

    vae = dict(_preset(preset)["vae"])
    n = len(vae["block_out_channels"])
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, sample_size=_preset(preset)["resolution"], **vae,
    )


def build_text_encoder(preset: str, vocab_size: int = 49408):
    from transformers import CLIPTextConfig, CLIPTextModel

    text = dict(_preset(preset)["text"])
    text.setdefault("hidden_act", "quick_gelu")
    config = CLIPTextConfig(
        vocab_size=vocab_size, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
        pad_token_id=49407, projection_dim=text["hidden_size"], **text,
    )
    return CLIPTextModel(config)


def build_scheduler(preset: str):
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, steps_offset=1, prediction_type=_preset(preset)["prediction_type"],
        **_preset(preset).get("schedule", {}),
    )


def build_pipeline(preset: str, tokenizer_dir: str | Path | None = None, seed: int = 0):
    """A randomly initialised StableDiffusionPipeline of the preset's shapes (no downloads)."""
    from diffusers import StableDiffusionPipeline

    from noclone.models.tokenizer import load_clip_tokenizer, write_clip_tokenizer_files

    torch.manual_seed(seed)
    if tokenizer_dir is None:
        from noclone.sandbox.assets import tokenizer_dir as shipped_tokenizer_dir

        tokenizer_dir = shipped_tokenizer_dir()
    if not Path(tokenizer_dir).joinpath("vocab.json").exists() and not Path(tokenizer_dir).joinpath("tokenizer.json").exists():
        write_clip_tokenizer_files(tokenizer_dir)
    return StableDiffusionPipeline(
        vae=build_vae(preset), text_encoder=build_text_encoder(preset), tokenizer=load_clip_tokenizer(tokenizer_dir),
        unet=build_unet(preset), scheduler=build_scheduler(preset), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


def resolution(preset: str) -> int:
    """The image size a preset's pipeline works at."""
    return int(_preset(preset)["resolution"])


def _preset(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise NocloneError(f"unknown architecture preset {name!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[name]
