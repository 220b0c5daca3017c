"""Generate N images per prompt with per-image seeds; write PNGs and a manifest.json."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from noclone.data.atomic import atomic_output_dir
from noclone.data.images import save_image
from noclone.errors import NocloneError

log = logging.getLogger(__name__)

SCHEDULERS = ("ddim", "dpm++", "euler", "euler-a", "pndm", "ddpm", "lms", "unipc")


@dataclass
class GenerationConfig:
    n: int = 16
    seed: int = 0
    steps: int = 25
    guidance: float = 7.5
    scheduler: str | None = None
    batch_size: int = 8
    negative_prompt: str | None = None


def set_scheduler(pipe, name: str | None) -> None:
    """Swap the sampling scheduler by short name, keeping the model's noise schedule."""
    if name is None:
        return
    import diffusers

    classes = {
        "ddim": "DDIMScheduler", "dpm++": "DPMSolverMultistepScheduler", "euler": "EulerDiscreteScheduler",
        "euler-a": "EulerAncestralDiscreteScheduler", "pndm": "PNDMScheduler", "ddpm": "DDPMScheduler",
        "lms": "LMSDiscreteScheduler", "unipc": "UniPCMultistepScheduler",
    }
    if name not in classes:
        raise NocloneError(f"unknown scheduler {name!r}; choose from {', '.join(SCHEDULERS)}")
    pipe.scheduler = getattr(diffusers, classes[name]).from_config(pipe.scheduler.config)


def sample(pipe, prompt: str, seeds: Sequence[int], config: GenerationConfig) -> list[Image.Image]:
    """One image per seed for `prompt` (each image reproducible from its own seed alone)."""
    return [image for chunk in _sampled(pipe, prompt, seeds, config, "pil") for image in chunk]


@torch.no_grad()
def sample_latents(pipe, prompt: str, seeds: Sequence[int], config: GenerationConfig) -> torch.Tensor:
    """`sample`'s final latents before decoding (pipeline-scaled, float32 on the CPU), one per seed."""
    return torch.cat([chunk.float().cpu() for chunk in _sampled(pipe, prompt, seeds, config, "latent")])


def _sampled(pipe, prompt: str, seeds: Sequence[int], config: GenerationConfig, output_type: str):
    for start in range(0, len(seeds), config.batch_size):
        chunk = list(seeds[start : start + config.batch_size])
        generators = [torch.Generator(device="cpu").manual_seed(s) for s in chunk]
        latents = torch.cat([
            torch.randn((1, pipe.unet.config.in_channels, *_latent_hw(pipe)), generator=g) for g in generators
        ]).to(pipe.device, pipe.unet.dtype)
        out = pipe(
            [prompt] * len(chunk), num_inference_steps=config.steps, guidance_scale=config.guidance,
            negative_prompt=[config.negative_prompt] * len(chunk) if config.negative_prompt else None,
            latents=latents, generator=generators, output_type=output_type,
        )
        yield out.images


def _latent_hw(pipe) -> tuple[int, int]:
    size = pipe.unet.config.sample_size
    return (size, size) if isinstance(size, int) else tuple(size)


def generate_to_dir(pipe, prompts: Sequence[str], out: str | Path, config: GenerationConfig,
                    overwrite: bool = False, extra_manifest: dict | None = None, progress: bool = True) -> Path:
    """Write `config.n` images for each prompt (seeds seed..seed+n-1) plus manifest.json, atomically."""
    from noclone.models.pipeline import model_fingerprint

    if config.n < 1 or config.steps < 1:
        raise NocloneError("--n and --steps must be at least 1")
    set_scheduler(pipe, config.scheduler)
    entries = []
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        for p_index, prompt in enumerate(tqdm(prompts, desc="generating", disable=not progress, leave=False)):
            seeds = [config.seed + i for i in range(config.n)]
            for seed, image in zip(seeds, sample(pipe, prompt, seeds, config)):
                name = f"p{p_index:02d}_s{seed:05d}.png"
                save_image(image, tmp / name)
                entries.append({"file": name, "prompt": prompt, "seed": seed})
        manifest = {
            "model_fingerprint": model_fingerprint(pipe),
            "scheduler": type(pipe.scheduler).__name__,
            **asdict(config),
            "images": entries,
            **(extra_manifest or {}),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return Path(out)
