"""What an attacker does to scraped photos before personalizing: transforms that may wash a protective cloak out.

Every transform takes RGB PIL images and returns new RGB images of the same sizes (inputs are not modified) and is
deterministic for a given seed:

- `jpeg`   (quality=75): JPEG re-encoding in memory (Pillow's default 4:2:0 chroma subsampling, as the web does).
- `resize` (factor=0.5): down-scale by `factor` (Lanczos), then back up to the original size (bicubic).
- `blur`   (sigma=1.0): Gaussian blur, sigma in pixels.
- `flip`   (): horizontal mirror (a common augmentation; it also moves a perturbation off its pixels).
- `noise`  (std=0.05): Gaussian noise, std in [0, 1] pixel units (the first half of "noisy upscaling").
- `purify` (strength=0.1, steps=50, prompt="", guidance=1.0): diffusion purification (DiffPure-style img2img with
  diffusers' StableDiffusionImg2ImgPipeline built from the given pipeline's components): noise to
  t = strength * T, then denoise. The image is resized so its short side is the model's resolution (sides rounded
  to what the VAE and UNet accept), purified, and resized back to its own size.

`parse_transform("jpeg:75")` -> ("jpeg", {"quality": 75}); a bare value sets the transform's main setting, and
`name:key=value,key=value` sets any (e.g. "purify:strength=0.2,steps=20").
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from noclone.errors import NocloneError

DEFAULTS: dict[str, dict] = {
    "jpeg": {"quality": 75},
    "resize": {"factor": 0.5},
    "blur": {"sigma": 1.0},
    "flip": {},
    "noise": {"std": 0.05},
    "purify": {"strength": 0.1, "steps": 50, "prompt": "", "guidance": 1.0},
}
TRANSFORMS = tuple(DEFAULTS)
_MAIN = {"jpeg": "quality", "resize": "factor", "blur": "sigma", "noise": "std", "purify": "strength"}
_INTS = {"quality", "steps"}


def _value(key: str, text: str):
    if key == "prompt":
        return text
    try:
        return int(text) if key in _INTS else float(text)
    except ValueError:
        raise NocloneError(f"transform setting {key}={text!r} is not a number") from None


def parse_transform(spec: str) -> tuple[str, dict]:
    """'jpeg:75', 'resize:0.5', 'blur:1.5', 'flip', 'purify:strength=0.2,steps=20' -> (name, settings)."""
    name, _, rest = str(spec).strip().partition(":")
    name = name.strip().lower()
    if name not in DEFAULTS:
        raise NocloneError(f"unknown transform {name!r} in {spec!r}; choose from {', '.join(TRANSFORMS)}")
    settings: dict = {}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, text = part.partition("=")
        if not eq:
            if name not in _MAIN or settings:
                raise NocloneError(f"transform {spec!r}: give settings as key=value")
            key, text = _MAIN[name], part
        key = key.strip()
        if key not in DEFAULTS[name]:
            raise NocloneError(f"transform {name!r} has no setting {key!r} (settings: {', '.join(DEFAULTS[name]) or 'none'})")
        settings[key] = _value(key, text.strip())
    _check(name, {**DEFAULTS[name], **settings})
    return name, settings


def _check(name: str, s: dict) -> None:
    checks = {
        "jpeg": [(isinstance(s.get("quality"), int) and 1 <= s.get("quality", 0) <= 100, "jpeg quality must be an integer in 1..100")],
        "resize": [(0 < s.get("factor", 0) <= 1, "resize factor must be in (0, 1]")],
        "blur": [(math.isfinite(s.get("sigma", -1)) and s.get("sigma", -1) >= 0, "blur sigma must be >= 0")],
        "noise": [(math.isfinite(s.get("std", -1)) and 0 <= s.get("std", -1) <= 1, "noise std must be in [0, 1]")],
        "purify": [(0 < s.get("strength", 0) <= 1, "purify strength must be in (0, 1]"),
                   (int(s.get("steps", 0)) >= 1, "purify steps must be at least 1"),
                   (int(s.get("steps", 0) * s.get("strength", 0)) >= 1,
                    "purify strength x steps must be at least 1 (no denoising step would run)")],
    }.get(name, [])
    for ok, message in checks:
        if not ok:
            raise NocloneError(message)


def apply_transform(name: str, images: Sequence[Image.Image], model=None, seed: int = 0, **settings) -> list[Image.Image]:
    """The transform `name` applied to each image (same sizes, RGB, seeded); `model` is needed by 'purify'."""
    if name not in DEFAULTS:
        raise NocloneError(f"unknown transform {name!r}; choose from {', '.join(TRANSFORMS)}")
    unknown = set(settings) - set(DEFAULTS[name])
    if unknown:
        raise NocloneError(f"transform {name!r} has no setting(s) {', '.join(sorted(unknown))}")
    s = {**DEFAULTS[name], **settings}
    _check(name, s)
    rgb = [im.convert("RGB") for im in images]
    if name == "purify":
        return _purify(rgb, model, seed, **s)
    return [_one(name, im, seed, i, s) for i, im in enumerate(rgb)]


def apply_transforms(specs: Sequence[str], images: Sequence[Image.Image], model=None, seed: int = 0) -> list[Image.Image]:
    """Several transforms in order, each given as a spec string ('jpeg:75', ...)."""
    out = list(images)
    for k, spec in enumerate(specs):
        name, settings = parse_transform(spec)
        out = apply_transform(name, out, model=model, seed=seed + 1000 * k, **settings)
    return out


def _one(name: str, image: Image.Image, seed: int, index: int, s: dict) -> Image.Image:
    w, h = image.size
    if name == "jpeg":
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=int(s["quality"]))
        buffer.seek(0)
        with Image.open(buffer) as decoded:
            return decoded.convert("RGB")
    if name == "resize":
        small = image.resize((max(1, round(w * s["factor"])), max(1, round(h * s["factor"]))), Image.Resampling.LANCZOS)
        return small.resize((w, h), Image.Resampling.BICUBIC)
    if name == "blur":
        return image.filter(ImageFilter.GaussianBlur(radius=s["sigma"])) if s["sigma"] > 0 else image.copy()
    if name == "flip":
        return ImageOps.mirror(image)
    if name == "noise":
        rng = np.random.default_rng([seed, index])
        noisy = np.asarray(image, np.float32) + rng.normal(0.0, s["std"] * 255.0, (h, w, 3))
        return Image.fromarray(np.clip(np.rint(noisy), 0, 255).astype(np.uint8), "RGB")
    raise AssertionError(name)


def _multiple(pipe) -> int:
    """Image sides must be multiples of this: the VAE factor times the UNet's downsampling."""
    return pipe.vae_scale_factor * 2 ** (len(pipe.unet.config.block_out_channels) - 1)


def _purify(images: list[Image.Image], model, seed: int, strength: float, steps: int, prompt: str,
            guidance: float) -> list[Image.Image]:
    import torch
    from diffusers import StableDiffusionImg2ImgPipeline

    from noclone.cloak.base import resolve_model, working_size
    from noclone.training.data import pipeline_resolution

    if model is None:
        raise NocloneError("the purify transform needs a diffusion model (--model)")
    pipe = resolve_model(model)
    components = {k: v for k, v in pipe.components.items() if k != "image_encoder"}
    img2img = StableDiffusionImg2ImgPipeline(**{**components, "safety_checker": None, "feature_extractor": None,
                                               "requires_safety_checker": False})
    img2img.set_progress_bar_config(disable=True)
    res, m = pipeline_resolution(pipe), _multiple(pipe)
    out = []
    for i, image in enumerate(images):
        w, h = working_size(*image.size, res)
        size = (max(m, w // m * m), max(m, h // m * m))
        work = image.resize(size, Image.Resampling.LANCZOS) if size != image.size else image
        generator = torch.Generator(device="cpu").manual_seed(seed + i)
        with torch.no_grad():
            result = img2img(prompt=prompt, image=work, strength=strength, num_inference_steps=int(steps),
                             guidance_scale=guidance, generator=generator, output_type="pil").images[0]
        out.append(result.resize(image.size, Image.Resampling.LANCZOS) if result.size != image.size else result)
    return out
