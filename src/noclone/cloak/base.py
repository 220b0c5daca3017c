r"""Image-level protection ("cloaking"): perturb a subject's photos before posting so that personalizing on them fails.

Shared by every method (one class each, one call signature, like torchattacks):

- `CloakConfig`: L_inf budget, step size, steps, seed, prompts. **Budgets and step sizes are in [0, 1] pixel units**
  (8/255 = 8 grey levels). Tensors are in [-1, 1], where the same bound is 2 * budget (`config.eps`); the papers'
  "eps 0.05" (Anti-DreamBooth, PhotoGuard code) is in [-1, 1] space, i.e. budget 0.025 here.
- `Cloak.perturb(x)`: a [-1, 1] NCHW batch -> protected batch of the same shape, |x_adv - x| <= 2 * budget.
  `Cloak.protect(images)`: PIL images -> protected RGB PIL images of the same sizes, |out - in| <= budget (checked
  on the 8-bit values: the perturbation is rounded to whole grey levels and clipped to floor(255 * budget) levels).
- Any size: each image is resized so that its short side is the working resolution R (the model's, or the RID
  generator's training resolution; aspect kept, Lanczos, as the attacker's `center_crop_resize` does), the
  perturbation is computed there, resized back to the original size (bilinear, a convex combination so the bound
  holds) and added at the original resolution. Optimization methods see R x R crops of the working image: the
  centre crop for surrogate training (the attacker's view) and a seeded random crop along the long side at each PGD
  step, so every pixel of a non-square photo gets protected.
- `get_cloak(method, model=None, **settings)`, `protect_folder(...)` live in registry.py, which imports the methods
  (each method imports this module): PNG outputs, metadata stripped, atomic, a `cloak.json` manifest with hashes and
  timings, never image data.
"""

from __future__ import annotations

import logging
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from noclone.attacks.base import PromptTemplates
from noclone.errors import NocloneError
from noclone.training.diffusion import encode_prompts, step_generator

log = logging.getLogger(__name__)

MANIFEST_NAME = "cloak.json"
DEFAULT_BUDGET = 8 / 255
DEFAULT_PRESET = "sandbox"
NULLABLE_SETTINGS = frozenset({"max_grad_norm"})  # None is a value here (no clipping), not "not given"


# ------------------------------------------------------------------------------------------------- settings


def _shown(value: str | float) -> str:
    """A setting as the user wrote it: '8/255' stays '8/255', a float from a config prints without noise."""
    if isinstance(value, float):
        return f"{value:g}"
    return str(value).strip()


BUDGET_EXPECTED = "the L-inf budget must be between 0 and 1 in pixel units (e.g. 8/255 or 0.03)"
STEP_SIZE_EXPECTED = "the PGD step size must be between 0 and 1 in pixel units (e.g. 1/255 or 0.004)"


def _fraction(value: str | float, flag: str, expected: str) -> float:
    """'8/255' or '0.03' (or a number) -> float; otherwise `flag value: expected` on one line."""
    text = str(value).strip()
    try:
        if "/" in text:
            num, den = text.split("/", 1)
            return float(num) / float(den)
        return float(text)
    except (ValueError, ZeroDivisionError):
        raise NocloneError(f"{flag} {_shown(value)}: {expected}") from None


def parse_budget(value: str | float) -> float:
    """'8/255', '0.03' or a number -> an L_inf budget in [0, 1] pixel units (at least one grey level, below 1).

    Every path that takes a budget (protect-images, rid train, the cloak and RID configs' validate) comes here, so
    a bad one reads the same everywhere."""
    budget = _fraction(value, "--budget", BUDGET_EXPECTED)
    if not math.isfinite(budget) or not (0 < budget < 1):
        raise NocloneError(f"--budget {_shown(value)}: {BUDGET_EXPECTED}")
    if budget * 255 < 1 - 1e-6:
        raise NocloneError(f"--budget {_shown(value)}: the L-inf budget must be at least one grey level, 1/255 "
                           "in pixel units (below that nothing changes; e.g. 8/255 or 0.03)")
    return budget


def parse_step_size(value: str | float | None) -> float | None:
    """'1/255' or '0.004' -> a positive step size in [0, 1] pixel units (None stays None)."""
    if value is None:
        return None
    step = _fraction(value, "--step-size", STEP_SIZE_EXPECTED)
    if not math.isfinite(step) or not 0 < step <= 1:
        raise NocloneError(f"--step-size {_shown(value)}: {STEP_SIZE_EXPECTED}")
    return step


def grey_levels(budget: float) -> int:
    """How many 8-bit levels a pixel may move under `budget` (floor, with float slack: 8/255 -> 8)."""
    return int(math.floor(budget * 255 + 1e-6))


@dataclass
class CloakConfig(PromptTemplates):
    """Settings every cloak shares. `budget`/`step_size` are L_inf values in [0, 1] pixel units."""

    budget: float = DEFAULT_BUDGET
    step_size: float = 1 / 255
    steps: int = 20
    seed: int = 0
    random_start: bool = False        # PGD from a uniform point of the ball instead of the clean image
    batch_size: int = 8               # images per forward/backward
    class_noun: str = "person"
    token: str = "sks"
    template: str = "a photo of {token} {class_noun}"
    class_template: str = "a photo of a {class_noun}"
    progress: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def eps(self) -> float:
        """The budget in [-1, 1] tensor units (2 * budget)."""
        return 2.0 * self.budget

    @property
    def alpha(self) -> float:
        """The step size in [-1, 1] tensor units."""
        return 2.0 * self.step_size

    def validate(self) -> None:
        parse_budget(self.budget)
        parse_step_size(self.step_size)  # the same wording as the flag's
        checks = [
            (isinstance(self.steps, int) and self.steps >= 1, f"--steps {self.steps} must be at least 1"),
            (self.batch_size >= 1, f"batch_size {self.batch_size} must be at least 1"),
            (bool(self.token.strip()) and " " not in self.token, f"--token {self.token!r} must be one non-empty word"),
            (bool(self.class_noun.strip()), "--class-noun must not be empty"),
        ]
        for ok, message in checks:
            if not ok:
                raise NocloneError(message)

    def manifest(self) -> dict:
        """What cloak.json records: every setting plus the budget in both units."""
        out = asdict(self)
        out["budget_255"] = self.budget * 255
        out["budget_minus1_1"] = self.eps
        return out


def make_config(config_class: type[CloakConfig], presets: dict[str, dict], preset: str = "sandbox",
                **settings) -> CloakConfig:
    """`config_class` with the preset's values, then the settings given (None values are ignored, except
    `max_grad_norm`, where None means no gradient clipping)."""
    if preset not in presets:
        raise NocloneError(f"unknown preset {preset!r}; choose from {', '.join(presets)}")
    known = {f.name for f in fields(config_class)}
    given = {k: v for k, v in settings.items() if v is not None or k in NULLABLE_SETTINGS}
    unknown = sorted(set(given) - known)
    if unknown:
        raise NocloneError(f"unknown setting(s) for this cloak: {', '.join(unknown)}")
    if "budget" in given:
        given["budget"] = parse_budget(given["budget"])
    if "step_size" in given:
        given["step_size"] = parse_step_size(given["step_size"])
    config = replace(config_class(**presets[preset]), **given)
    config.validate()
    return config


# ------------------------------------------------------------------------------------------- image <-> tensor


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """An image as a [1, 3, H, W] float32 tensor in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0) / 127.5 - 1.0


def working_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """(w, h) with the short side = resolution and the aspect ratio kept."""
    short = min(width, height)
    if short == resolution:
        return width, height
    scale = resolution / short
    return max(resolution, round(width * scale)), max(resolution, round(height * scale))


def to_working(image: Image.Image, resolution: int) -> torch.Tensor:
    """The image at the working resolution (short side R, Lanczos), as [1, 3, h, w] in [-1, 1]."""
    image = image.convert("RGB")
    size = working_size(*image.size, resolution)
    if size != image.size:
        image = image.resize(size, Image.Resampling.LANCZOS)
    return pil_to_tensor(image)


def resize_delta(delta: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A [N, 3, h, w] perturbation resized to (H, W) (bilinear: convex weights, so |delta| bounds hold)."""
    if tuple(delta.shape[-2:]) == tuple(size):
        return delta
    return F.interpolate(delta, size=size, mode="bilinear", align_corners=False)


def apply_delta(image: Image.Image, delta: torch.Tensor, budget: float) -> Image.Image:
    """Add a [1, 3, h, w] perturbation in [-1, 1] units to an image at its own size; rounded, within budget."""
    rgb = image.convert("RGB")
    width, height = rgb.size
    d = resize_delta(delta.detach().float().cpu(), (height, width))[0].permute(1, 2, 0).numpy() * 127.5
    levels = grey_levels(budget)
    step = np.clip(np.rint(d), -levels, levels)
    out = np.clip(np.asarray(rgb, dtype=np.float32) + step, 0, 255).astype(np.uint8)
    return Image.fromarray(out, "RGB")


def crop_view(x: torch.Tensor, resolution: int, offset: float | None) -> torch.Tensor:
    """An R x R crop of a [N, 3, h, w] working image along its long side; offset in [0, 1] (None = centre)."""
    h, w = x.shape[-2:]
    if h == w == resolution:
        return x
    if min(h, w) != resolution:  # not a working image (tensor API at another size): resize
        return F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=True)
    frac = 0.5 if offset is None else offset
    if w > h:
        left = int(round((w - resolution) * frac))
        return x[..., :, left:left + resolution]
    top = int(round((h - resolution) * frac))
    return x[..., top:top + resolution, :]


# ------------------------------------------------------------------------------------------------- the cloak


class Cloak(ABC):
    """One protection method: `perturb` ([-1, 1] tensors) and `protect` (PIL images), the same for every method."""

    name: ClassVar[str] = "base"
    config_class: ClassVar[type[CloakConfig]] = CloakConfig
    PRESETS: ClassVar[dict[str, dict]] = {"sandbox": {}, "paper": {}}
    needs_model: ClassVar[bool] = True

    def __init__(self, model=None, config: CloakConfig | None = None, preset: str = "sandbox", **settings):
        if self.needs_model and model is None:
            raise NocloneError(f"{self.name} needs a diffusion model (--model DIR, FILE or sandbox)")
        self.pipe = resolve_model(model) if model is not None else None
        if config is not None and settings:
            raise NocloneError("give either a config or settings, not both")
        self.config = config if config is not None else make_config(self.config_class, self.PRESETS, preset, **settings)
        self.config.validate()
        self.preset_name = None if config is not None else preset  # a config given directly has no preset
        self.stats: dict[str, Any] = {}
        self.warnings: list[str] = []  # plain lines for the person running it; cloak.json records them too

    @classmethod
    def preset_config(cls, preset: str = "sandbox", **settings) -> CloakConfig:
        return make_config(cls.config_class, cls.PRESETS, preset, **settings)

    @classmethod
    def show(cls, preset: str) -> str:
        """The `--show` table of a preset: each setting, its value, the default preset's, `*` where they differ."""
        from noclone.presets import format_table, table_rows

        return format_table(f"{cls.name} preset {preset!r}", table_rows(cls.preset_config(preset),
                                                                        cls.preset_config(DEFAULT_PRESET)),
                            DEFAULT_PRESET, cls.preset_notes(preset))

    @classmethod
    def preset_notes(cls, preset: str) -> list[str]:
        """Lines printed under a preset's table (what it reproduces, what it needs)."""
        return []

    # --- what a method implements ---
    @property
    @abstractmethod
    def resolution(self) -> int:
        """The working resolution R (short side) at which perturbations are computed."""

    @abstractmethod
    def compute_deltas(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Perturbations ([-1, 1] units, |d| <= eps) for working images xs (each [1, 3, h, w], short side R)."""

    # --- the shared API ---
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.perturb(x)

    def input_warnings(self, sizes: Sequence[tuple[int, int]]) -> list[str]:
        """Warnings about inputs of these (width, height) sizes that the method cannot protect well (none here)."""
        return []

    def _check_inputs(self, sizes: Sequence[tuple[int, int]]) -> None:
        """Log each input warning once per cloak (one run), and keep it for the manifest."""
        for message in self.input_warnings(sizes):
            if message not in self.warnings:
                self.warnings.append(message)
                log.warning("%s", message)

    def perturb(self, x: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] in [-1, 1] -> protected batch of the same shape (|x_adv - x| <= 2 * budget)."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise NocloneError(f"expected an [N, 3, H, W] tensor in [-1, 1], got shape {list(x.shape)}")
        x = x.detach().float().cpu()
        h, w = x.shape[-2:]
        self._check_inputs([(int(w), int(h))])
        wh = working_size(w, h, self.resolution)
        size = (wh[1], wh[0])
        work = x if size == (h, w) else F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        deltas = torch.cat(self.compute_deltas([work[i : i + 1] for i in range(len(work))]))
        delta = resize_delta(deltas.float().cpu(), (h, w)).clamp(-self.config.eps, self.config.eps)
        return (x + delta).clamp(-1, 1)

    def protect(self, images: Sequence[Image.Image]) -> list[Image.Image]:
        """Protected copies of the images: RGB, same sizes, each within the budget; the inputs are not modified."""
        if not images:
            raise NocloneError("no images to protect")
        self._check_inputs([im.size for im in images])
        work = [to_working(im, self.resolution) for im in images]
        deltas = self.compute_deltas(work)
        return [apply_delta(im, d, self.config.budget) for im, d in zip(images, deltas)]

    def manifest(self) -> dict:
        """What cloak.json says about the method (settings, model fingerprint): never image data."""
        from noclone.models.pipeline import model_fingerprint

        from noclone.presets import card_entry

        info = {"method": self.name, "settings": self.config.manifest(), "seed": self.config.seed,
                "working_resolution": self.resolution, "warnings": list(self.warnings)}
        # `preset` and, under `preset_settings`, the settings that differ from the default preset
        entry = card_entry(self.preset_name, self.config, self.preset_config(DEFAULT_PRESET), DEFAULT_PRESET)
        info.update(preset=entry["preset"], preset_settings=entry["settings"])
        if self.pipe is not None:
            info["model_fingerprint"] = model_fingerprint(self.pipe)
        if self.stats:
            info["stats"] = self.stats
        return info


def resolve_model(model):
    """A loaded pipeline from a pipeline, 'sandbox', a diffusers directory or a .safetensors file (CPU, fp32)."""
    if model is None or hasattr(model, "unet"):
        return model
    from noclone.models.pipeline import load_pipeline
    from noclone.sandbox.assets import model_path

    path = model_path(model)
    return load_pipeline(path, device="cpu")


# ------------------------------------------------------------------------------------------ PGD machinery


class OptimizationCloak(Cloak):
    """Per-image optimization against a frozen (or surrogate) diffusion model: PGD with sign steps.

    Subclasses define `objective(views, generator) -> scalar` (maximized; minimized when `maximize` is False) and
    may override `compute_deltas`
    (ASPL interleaves surrogate training). Randomness (t, noise, crop offsets, random start) comes from
    `step_generator(seed, step, stream)`: a run is reproducible from its seed.
    """

    maximize: ClassVar[bool] = True

    def __init__(self, model=None, config: CloakConfig | None = None, preset: str = "sandbox", **settings):
        super().__init__(model, config, preset, **settings)
        from noclone.training.data import pipeline_resolution

        self._resolution = pipeline_resolution(self.pipe)
        self._cond_cache: dict[str, torch.Tensor] = {}

    @property
    def resolution(self) -> int:
        return self._resolution

    @abstractmethod
    def objective(self, views: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The scalar the method pushes up (or down if not `maximize`) for [N, 3, R, R] views in [-1, 1]."""

    # --- helpers for subclasses ---
    def cond(self, prompt: str) -> torch.Tensor:
        """Text-encoder hidden states [1, 77, D] of a prompt (cached, no gradient)."""
        if prompt not in self._cond_cache:
            with torch.no_grad():
                self._cond_cache[prompt] = encode_prompts(self.pipe.text_encoder, self.pipe.tokenizer, [prompt])
        return self._cond_cache[prompt]

    def encode(self, views: torch.Tensor) -> torch.Tensor:
        """VAE posterior means * scaling factor (gradients flow from latents to pixels); float32 on the CPU, where
        the shared `diffusion_loss` draws its noise (it moves them back to the UNet's device)."""
        vae = self.pipe.vae
        latents = vae.encode(views.to(vae.device, vae.dtype)).latent_dist.mean * vae.config.scaling_factor
        return latents.float().cpu()

    def start(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Initial perturbations: zeros, or uniform in the ball with `random_start`."""
        eps = self.config.eps
        if not self.config.random_start:
            return [torch.zeros_like(x) for x in xs]
        g = step_generator(self.config.seed, 0, f"{self.name}/start")
        return [((torch.rand(x.shape, generator=g) * 2 - 1) * eps + x).clamp(-1, 1) - x for x in xs]

    def views(self, xs: list[torch.Tensor], generator: torch.Generator | None) -> torch.Tensor:
        """[N, 3, R, R]: the centre crop (generator None) or a random crop of each working image."""
        out = []
        for x in xs:
            offset = None if generator is None else float(torch.rand((), generator=generator))
            out.append(crop_view(x, self.resolution, offset))
        return torch.cat(out)

    def pgd(self, xs: list[torch.Tensor], deltas: list[torch.Tensor], steps: int, stream: str,
            objective: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
            step_size: Callable[[int], float] | None = None, first_step: int = 0) -> tuple[list[torch.Tensor], list[float]]:
        """`steps` signed-gradient steps on each image's perturbation (chunks of batch_size); returns (deltas, losses)."""
        objective = objective or self.objective
        c, eps = self.config, self.config.eps
        sign = 1.0 if self.maximize else -1.0
        deltas = [d.clone() for d in deltas]
        losses = []
        for k in range(steps):
            step = first_step + k
            alpha = step_size(step) if step_size is not None else c.alpha
            total = 0.0
            for start in range(0, len(xs), c.batch_size):
                idx = range(start, min(start + c.batch_size, len(xs)))
                g = step_generator(c.seed, step, f"{stream}/{start}")
                ds = [deltas[i].detach().requires_grad_(True) for i in idx]
                views = self.views([(xs[i] + d).clamp(-1, 1) for i, d in zip(idx, ds)], g)
                loss = objective(views, g)
                grads = torch.autograd.grad(loss, ds)
                with torch.no_grad():
                    for i, d, grad in zip(idx, ds, grads):
                        moved = (d + sign * alpha * grad.sign()).clamp(-eps, eps)
                        deltas[i] = (xs[i] + moved).clamp(-1, 1) - xs[i]
                total += float(loss.detach()) * len(idx)
            losses.append(total / len(xs))
        return deltas, losses

    def compute_deltas(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        started = time.perf_counter()
        deltas, losses = self.pgd(xs, self.start(xs), self.config.steps, self.name)
        self.stats = {"objective_first_last": [losses[0], losses[-1]], "seconds": time.perf_counter() - started}
        return deltas

    @torch.no_grad()
    def score(self, x: torch.Tensor, samples: int = 8, seed: int = 1234) -> float:
        """The method's objective at [N, 3, R, R] images x (what PGD pushes up, or down if not `maximize`), averaged
        over `samples` probe draws fixed by `seed`, so clean, noisy and cloaked images are compared on the same noise."""
        values = [float(self.objective(x, step_generator(seed, i, f"{self.name}/score"))) for i in range(samples)]
        return sum(values) / len(values)


# ---------------------------------------------------------------------------------------------- the folder


def _output_names(paths: Sequence[Path]) -> list[str]:
    """One PNG name per input: its stem, or the full name when two inputs share a stem."""
    stems = [p.stem for p in paths]
    return [f"{p.stem}.png" if stems.count(p.stem) == 1 else f"{p.name}.png" for p in paths]


def check_output_dir(images_dir: str | Path, out_dir: str | Path, overwrite: bool) -> None:
    """Refuse a non-empty out dir (unless overwrite), a file, or an out dir that is (or holds) the inputs."""
    images, out = Path(images_dir).resolve(), Path(out_dir).resolve()
    if out == images or out in images.parents:
        raise NocloneError(f"{out_dir}: the output folder must not be the input folder or contain it")
    if out.is_file():
        raise NocloneError(f"{out_dir}: exists and is a file, expected an output directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise NocloneError(f"{out_dir}/: output exists and is not empty (pass --overwrite to replace it)")
