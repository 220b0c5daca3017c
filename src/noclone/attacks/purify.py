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
- `gridpure` (strength=0.1, steps=50, grid=2, iterations=1, prompt="", guidance=1.0): GrIDPure-style patch-wise
  purification (Zhao et al. 2024, "Can protective perturbation safeguard personal data from being exploited by
  stable diffusion?"). The image is resized to `grid` x purify's working size, split into overlapping patches of
  purify's working size (the model's resolution on the short side) with a stride of half a patch, so
  (2 * grid - 1)^2 patches; each is purified as by `purify`, the patches are merged back by averaging the pixels
  they share, and all of this is repeated `iterations` times before resizing back to the image's own size.
  `grid=1` is plain `purify`.
- `upscale` (std=0.05, factor=0.5, strength=0.1, steps=50, prompt="", guidance=1.0): a stand-in for "noisy
  upscaling" (Hönig et al. 2024, "Adversarial perturbations cannot reliably protect artists from generative AI"),
  who add Gaussian noise and run the Stable Diffusion x4 upscaler. We have no upscaler model, so this is the
  closest stand-in: add Gaussian noise (`std` as in `noise`), down-scale by `factor` (Lanczos) and back up
  (bicubic), then let the diffusion model restore detail by img2img at `strength` (as `purify`).

`purify`, `gridpure` and `upscale` need a diffusion model.

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
    "gridpure": {"strength": 0.1, "steps": 50, "grid": 2, "iterations": 1, "prompt": "", "guidance": 1.0},
    "upscale": {"std": 0.05, "factor": 0.5, "strength": 0.1, "steps": 50, "prompt": "", "guidance": 1.0},
}
TRANSFORMS = tuple(DEFAULTS)
MODEL_TRANSFORMS = ("purify", "gridpure", "upscale")  # the transforms that run the diffusion model
_MAIN = {"jpeg": "quality", "resize": "factor", "blur": "sigma", "noise": "std", "purify": "strength",
         "gridpure": "strength", "upscale": "std"}
_INTS = {"quality", "steps", "grid", "iterations"}


def _value(key: str, text: str):
    if key == "prompt":
        return text
    try:
        return int(text) if key in _INTS else float(text)
    except ValueError:
        kind = "an integer" if key in _INTS else "a number"
        raise NocloneError(f"transform setting {key}={text!r} is not {kind}") from None


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


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _number(s: dict, key: str, default: float = -1.0) -> float:
    """s[key] as a float, or `default` where it is missing or not a number (so a check on it fails)."""
    try:
        value = float(s.get(key, default))
    except (TypeError, ValueError):
        return default
    return value if math.isfinite(value) else default


def _diffusion_checks(name: str, s: dict) -> list:
    strength, steps = _number(s, "strength", 0.0), _number(s, "steps", 0.0)
    return [(0 < strength <= 1, f"{name} strength must be in (0, 1]"),
            (int(steps) >= 1, f"{name} steps must be at least 1"),
            (int(steps * strength) >= 1, f"{name} strength x steps must be at least 1 (no denoising step would run)")]


def _check(name: str, s: dict) -> None:
    checks = {
        "jpeg": [(isinstance(s.get("quality"), int) and 1 <= s.get("quality", 0) <= 100, "jpeg quality must be an integer in 1..100")],
        "resize": [(0 < s.get("factor", 0) <= 1, "resize factor must be in (0, 1]")],
        "blur": [(math.isfinite(s.get("sigma", -1)) and s.get("sigma", -1) >= 0, "blur sigma must be >= 0")],
        "noise": [(math.isfinite(s.get("std", -1)) and 0 <= s.get("std", -1) <= 1, "noise std must be in [0, 1]")],
        "purify": _diffusion_checks("purify", s),
        "gridpure": [*_diffusion_checks("gridpure", s),
                     (_is_int(s.get("grid")) and s.get("grid") >= 1, "gridpure grid must be an integer >= 1"),
                     (_is_int(s.get("iterations")) and s.get("iterations") >= 1,
                      "gridpure iterations must be an integer >= 1")],
        "upscale": [(0 <= _number(s, "std") <= 1, "upscale std must be in [0, 1]"),
                    (0 < _number(s, "factor") <= 1, "upscale factor must be in (0, 1]"),
                    *_diffusion_checks("upscale", s)],
    }.get(name, [])
    for ok, message in checks:
        if not ok:
            raise NocloneError(message)


def apply_transform(name: str, images: Sequence[Image.Image], model=None, seed: int = 0, **settings) -> list[Image.Image]:
    """The transform `name` applied to each image (same sizes, RGB, seeded); MODEL_TRANSFORMS need `model`."""
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
    if name == "gridpure":
        return _gridpure(rgb, model, seed, **s)
    if name == "upscale":
        return _upscale(rgb, model, seed, **s)
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


def _img2img(model, name: str):
    """(img2img pipeline built from the model's components, the model's resolution, the multiple sides must be)."""
    from diffusers import StableDiffusionImg2ImgPipeline

    from noclone.cloak.base import resolve_model
    from noclone.training.data import pipeline_resolution

    if model is None:
        raise NocloneError(f"the {name} transform needs a diffusion model (--model)")
    pipe = resolve_model(model)
    components = {k: v for k, v in pipe.components.items() if k != "image_encoder"}
    img2img = StableDiffusionImg2ImgPipeline(**{**components, "safety_checker": None, "feature_extractor": None,
                                               "requires_safety_checker": False})
    img2img.set_progress_bar_config(disable=True)
    return img2img, pipeline_resolution(pipe), _multiple(pipe)


def _model_size(size: tuple[int, int], resolution: int, multiple: int) -> tuple[int, int]:
    """The size an image of `size` is purified at: short side = resolution, sides rounded down to the multiple."""
    from noclone.cloak.base import working_size

    w, h = working_size(*size, resolution)
    return max(multiple, w // multiple * multiple), max(multiple, h // multiple * multiple)


def _denoise(img2img, work: Image.Image, generator, strength: float, steps: int, prompt: str,
             guidance: float) -> Image.Image:
    """One RGB image already at the model size, noised to t = strength * T and denoised (same size out)."""
    import torch

    with torch.no_grad():
        return img2img(prompt=prompt, image=work, strength=strength, num_inference_steps=int(steps),
                       guidance_scale=guidance, generator=generator, output_type="pil").images[0].convert("RGB")


def _resized(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    return image.resize(size, Image.Resampling.LANCZOS) if image.size != size else image


def _generator(seed: int):
    import torch

    return torch.Generator(device="cpu").manual_seed(int(seed))


def _purify(images: list[Image.Image], model, seed: int, strength: float, steps: int, prompt: str,
            guidance: float) -> list[Image.Image]:
    img2img, res, m = _img2img(model, "purify")
    out = []
    for i, image in enumerate(images):
        work = _resized(image, _model_size(image.size, res, m))
        result = _denoise(img2img, work, _generator(seed + i), strength, steps, prompt, guidance)
        out.append(_resized(result, image.size))
    return out


def _starts(total: int, patch: int, count: int) -> list[int]:
    """`count` patch offsets from 0 to total - patch, evenly spaced (half a patch apart when total = grid x patch)."""
    if count == 1:
        return [0]
    return [round(k * (total - patch) / (count - 1)) for k in range(count)]


def _gridpure(images: list[Image.Image], model, seed: int, strength: float, steps: int, grid: int, iterations: int,
              prompt: str, guidance: float) -> list[Image.Image]:
    """GrIDPure: purify overlapping model-size patches of a grid x model-size image, average, repeat.

    Each image has one torch generator seeded seed + index (as `purify`), drawn on patch after patch (rows, then
    columns within a row) and iteration after iteration, so every patch gets its own noise and grid=1,
    iterations=1 gives exactly `purify`'s output.
    """
    img2img, res, m = _img2img(model, "gridpure")
    grid, iterations = int(grid), int(iterations)
    out = []
    for i, image in enumerate(images):
        pw, ph = _model_size(image.size, res, m)
        total = (pw * grid, ph * grid)
        xs, ys = _starts(total[0], pw, 2 * grid - 1), _starts(total[1], ph, 2 * grid - 1)
        generator = _generator(seed + i)
        work = _resized(image, total)
        for _ in range(iterations):
            summed = np.zeros((total[1], total[0], 3), np.float64)
            count = np.zeros((total[1], total[0], 1), np.float64)
            for y in ys:
                for x in xs:
                    patch = work.crop((x, y, x + pw, y + ph))
                    result = _denoise(img2img, patch, generator, strength, steps, prompt, guidance)
                    summed[y:y + ph, x:x + pw] += np.asarray(_resized(result, (pw, ph)), np.float64)
                    count[y:y + ph, x:x + pw] += 1
            work = Image.fromarray(np.clip(np.rint(summed / count), 0, 255).astype(np.uint8), "RGB")
        out.append(_resized(work, image.size))
    return out


def _upscale(images: list[Image.Image], model, seed: int, std: float, factor: float, strength: float, steps: int,
             prompt: str, guidance: float) -> list[Image.Image]:
    """Noisy upscaling stand-in: Gaussian noise, down- and up-scaling, then img2img restores detail."""
    img2img, res, m = _img2img(model, "upscale")
    out = []
    for i, image in enumerate(images):
        degraded = _one("resize", _one("noise", image, seed, i, {"std": std}), seed, i, {"factor": factor})
        work = _resized(degraded, _model_size(image.size, res, m))
        result = _denoise(img2img, work, _generator(seed + i), strength, steps, prompt, guidance)
        out.append(_resized(result, image.size))
    return out
