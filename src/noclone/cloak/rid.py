r"""RID (Real-time Identity Defender, arXiv 2412.09844): a network that outputs a protective perturbation in one pass.

Generator: delta_phi(x) = eta * tanh(net_phi(x)), x in [-1, 1]. `budget` is in [0, 1] pixel units as everywhere in
noclone, so eta = 2 * budget in the [-1, 1] space the net works in (RID's code applies eta there: its "12/255" is
6/255 in pixels). Architectures: a light residual U-Net ('conv', default, CPU-fast), a DiT ('dit', small by
default) or the paper's DiT ('dit-paper': patch 16, hidden 1152, depth 14, 8 heads, 512 px); see
`noclone.cloak.rid_nets`. The last layer starts at zero, so delta starts at 0.

Training presets (`RIDRecipe.PRESETS`, `noclone rid train --preset NAME --show`): 'sandbox' (default: conv, the
first model's resolution, 8/255), 'paper' (dit-paper at 512 px, budget 6/255 = the paper's 12/255 in [-1, 1]
space, AdamW 3e-4; what the paper does not state keeps the sandbox value), 'official' ('paper' plus what the
released code does: weight decay 1e-2, linear lr warm-up over 500 steps, no gradient clipping, fp32 models) and
'paper-sd21' / 'official-sd21' (ours: the same at SD2.1's 768 px; the paper trains at 512 with SD2.1-base in its
ensemble). Warm-up: lr * min(1, step / warmup_steps), then constant (diffusers' constant_with_warmup).

Training (only phi trains; the diffusion models are frozen), for each model k of an ensemble (a list of pipelines):

    x_def = clip(x + delta_phi(x), -1, 1);  z_0 = E_k(x_def).mean * s_k   (gradient flows through the encoder)
    t ~ U{t_min..t_max-1}, eps ~ N(0, I), z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps, empty prompt ""
    g   = -w(t) (eps_k(z_t, t, "") - eps),  w(t) = 1 - abar_t       (Adv-SDS: the UNet Jacobian is skipped)
    L_k = 0.5 * mean || z_t - stopgrad(z_t - g) ||^2                 (d L_k / d z_t = g / numel)
    L_reg = mean || delta_phi(x) - delta_aspl(x) ||^2 / eta^2         (optional: images with ASPL targets)
    L = mean([w_r * L_reg, L_1, ..., L_K])                           (AdamW, lr 3e-4)

Descending L_k moves z_t along +w(t)(eps_pred - eps): up the denoising loss, the adversarial mirror of SDS.
v-prediction models are handled by converting their output to an epsilon prediction. Choices: the encoder's
posterior mean (not a sample); the mean (not sum) reduction, with L_reg divided by eta^2 so both terms are O(1);
the logged `mse` is the frozen model's denoising error on x_def (it should rise). Ensemble models at another
resolution than the generator's see x_def resized (antialiased) to theirs.

Inference at any size (one forward pass per image, batched by working size): the image is resized so its short
side is the generator's training resolution, the net runs there, and the perturbation is resized back and added at
the original resolution (`noclone.cloak.base`). `save_pretrained`/`from_pretrained`: config.json + fp16
safetensors. Training runs in `noclone.training.loop.run_training` (seeded steps, checkpoints, resume).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from noclone.cloak.base import Cloak, CloakConfig, parse_budget
from noclone.cloak.rid_nets import ARCHS, DIT_PAPER, DIT_PAPER_RESOLUTION, build_net, count_parameters
from noclone.errors import NocloneError
from noclone.training.diffusion import encode_prompts, predicted_noise, step_generator, training_scheduler
from noclone.training.distributed import Distributed, current, place_pipeline
from noclone.training.loop import LoopConfig, run_training
from noclone.training.precision import upcast_trainable

log = logging.getLogger(__name__)

WEIGHTS_NAME = "generator.safetensors"
CONFIG_NAME = "config.json"
SHIPPED_GENERATOR = Path(__file__).parent / "weights" / "rid"
# tiny-but-real defaults per architecture; the paper's DiT is rid_nets.DIT_PAPER
DEFAULT_NET = {"conv": dict(channels=32, blocks=1), "dit": dict(patch=8, hidden=192, depth=4, heads=4),
               "dit-paper": dict(DIT_PAPER)}


# ------------------------------------------------------------------------------------------------ generator


@dataclass
class RIDConfig:
    """What defines a generator: architecture, its settings, the budget eta is built from, the working resolution."""

    arch: str = "conv"
    budget: float = 8 / 255          # [0, 1] pixel units; eta = 2 * budget in [-1, 1] space
    resolution: int = 64             # training resolution = working resolution (short side) at inference
    net: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)  # provenance written by training (models, steps, data)

    def validate(self) -> None:
        if self.arch not in ARCHS:
            raise NocloneError(f"unknown RID architecture {self.arch!r}; choose from {', '.join(ARCHS)}")
        parse_budget(self.budget)
        if not isinstance(self.resolution, int) or self.resolution < 8:
            raise NocloneError(f"RID resolution {self.resolution!r} must be an integer of at least 8")

    def net_kwargs(self) -> dict:
        return {**DEFAULT_NET[self.arch], **self.net}


class RIDGenerator(nn.Module):
    """delta(x) = eta * tanh(net(x)) for [N, 3, H, W] images in [-1, 1]; eta = 2 * budget."""

    def __init__(self, config: RIDConfig | None = None, **settings):
        super().__init__()
        config = config or RIDConfig(**settings)
        config.validate()
        # the resolved architecture settings are saved, so later default changes cannot break a saved generator
        self.config = replace(config, net=config.net_kwargs(), info=dict(config.info))
        self.net = build_net(config.arch, **config.net_kwargs())

    @property
    def eta(self) -> float:
        return 2.0 * self.config.budget

    def forward(self, x: torch.Tensor, budget: float | None = None) -> torch.Tensor:
        eta = self.eta if budget is None else 2.0 * budget
        return eta * torch.tanh(self.net(x))

    def save_pretrained(self, out: str | Path, overwrite: bool = False) -> Path:
        """Write config.json + fp16 generator.safetensors into `out` atomically."""
        from safetensors.torch import save_file

        from noclone.data.atomic import atomic_output_dir

        state = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in self.net.state_dict().items()}
        with atomic_output_dir(out, overwrite=overwrite) as tmp:
            save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "noclone": "rid"})
            (tmp / CONFIG_NAME).write_text(json.dumps({"model_type": "noclone-rid", **asdict(self.config),
                                                       "parameters": count_parameters(self.net)}, indent=2))
        return Path(out)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> "RIDGenerator":
        """Load a generator directory written by `save_pretrained` (weights cast to fp32)."""
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / CONFIG_NAME).is_file() or not (path / WEIGHTS_NAME).is_file():
            raise NocloneError(f"{path}/: not a RID generator directory (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
        try:
            raw = json.loads((path / CONFIG_NAME).read_text())
        except ValueError as exc:
            raise NocloneError(f"{path / CONFIG_NAME}: unreadable ({exc})") from None
        known = {f.name for f in fields(RIDConfig)}
        generator = cls(RIDConfig(**{k: v for k, v in raw.items() if k in known}))
        state = load_file(str(path / WEIGHTS_NAME))
        try:
            generator.net.load_state_dict({k: v.float() for k, v in state.items()})
        except RuntimeError as exc:
            raise NocloneError(f"{path}/: weights do not match config.json ({str(exc).splitlines()[0]})") from None
        return generator.to(device).eval().requires_grad_(False)


def load_generator(generator: "str | Path | RIDGenerator | None" = None) -> RIDGenerator:
    """A generator object, a directory, or None for the shipped sandbox generator."""
    if isinstance(generator, RIDGenerator):
        return generator
    if generator is None:
        if not (SHIPPED_GENERATOR / WEIGHTS_NAME).is_file():
            raise NocloneError("no shipped RID generator in this installation; pass --generator DIR "
                               "(train one with `noclone rid train`)")
        generator = SHIPPED_GENERATOR
    path = Path(generator)
    if not path.exists():
        raise NocloneError(f"{path}: no such RID generator directory")
    return RIDGenerator.from_pretrained(path)


# ---------------------------------------------------------------------------------------------- inference


class RIDCloak(Cloak):
    """RID as a cloak: one forward pass of a trained generator per image (no diffusion model needed)."""

    name: ClassVar[str] = "rid"
    needs_model: ClassVar[bool] = False
    # inference is one forward pass: a preset changes nothing here (the generator carries its budget); what a RID
    # preset means is how the generator was trained (`RIDRecipe.PRESETS`)
    PRESETS: ClassVar[dict[str, dict]] = {"sandbox": {}, "paper": {}, "paper-sd21": {}, "official": {},
                                          "official-sd21": {}}

    def __init__(self, model=None, config: CloakConfig | None = None, preset: str = "sandbox",
                 generator: "str | Path | RIDGenerator | None" = None, **settings):
        for name in ("steps", "step_size", "random_start"):
            if settings.get(name) is not None:
                raise NocloneError(f"rid is a single forward pass: the {name.replace('_', '-')} setting does not apply")
            settings.pop(name, None)
        self.generator = load_generator(generator)
        settings.setdefault("budget", None)
        if settings["budget"] is None:
            settings["budget"] = self.generator.config.budget
        super().__init__(None, config, preset, **settings)
        self.generator_source = str(generator) if isinstance(generator, (str, Path)) else (
            "shipped" if generator is None else "object")
        self.shipped = generator is None or (isinstance(generator, (str, Path))
                                             and Path(generator).resolve() == SHIPPED_GENERATOR.resolve())

    def input_warnings(self, sizes: Sequence[tuple[int, int]]) -> list[str]:
        """The shipped generator only knows the 64 px sandbox world: say so when the photos are bigger (real ones)."""
        res = self.generator.config.resolution
        if not self.shipped or all(max(size) <= res for size in sizes):
            return []
        return [f"the shipped RID generator was trained against the {res} px sandbox model only; on real photos "
                f"(these are larger than {res} px) its cloak is not expected to protect against Stable Diffusion "
                "(train one with `noclone rid train`)"]

    @property
    def resolution(self) -> int:
        return self.generator.config.resolution

    @torch.no_grad()
    def compute_deltas(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        started = time.perf_counter()
        gen = self.generator.eval()
        device = next(gen.parameters()).device
        out: list[torch.Tensor | None] = [None] * len(xs)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, x in enumerate(xs):
            groups.setdefault(tuple(x.shape[-2:]), []).append(i)
        for idx in groups.values():
            for start in range(0, len(idx), self.config.batch_size):
                chunk = idx[start : start + self.config.batch_size]
                batch = torch.cat([xs[i] for i in chunk]).to(device)
                deltas = gen(batch, self.config.budget).float().cpu()
                for i, d in zip(chunk, deltas):
                    out[i] = d.unsqueeze(0)
        self.stats = {"seconds": time.perf_counter() - started}
        return out  # type: ignore[return-value]

    def manifest(self) -> dict:
        info = super().manifest()
        for key in ("steps", "step_size", "random_start"):
            info["settings"].pop(key, None)
        info["generator"] = {"source": self.generator_source, **asdict(self.generator.config),
                             "parameters": count_parameters(self.generator.net)}
        return info


# ----------------------------------------------------------------------------------------------- training


@dataclass
class RIDTrainConfig:
    """RID training settings (the paper: AdamW 3e-4 for Adv-SDS, batch 1-3 per GPU, 512 px, days on 8 A100s)."""

    steps: int = 1000
    batch_size: int = 8
    lr: float = 3e-4
    weight_decay: float = 0.0
    reg_weight: float = 1.0          # w_r (L_reg is already divided by eta^2)
    reg_batch_size: int = 2
    prompt: str = ""                 # the paper's empty prompt
    t_min: int = 0
    t_max: int | None = None         # None: the model's num_train_timesteps
    seed: int = 0
    checkpoint_every: int = 100
    max_grad_norm: float | None = 1.0  # None: no gradient clipping
    warmup_steps: int = 0            # linear lr warm-up: lr * min(1, step / warmup_steps), then constant
    max_seconds: float | None = None  # stop early (keeping the weights reached) when this much time has passed
    progress: bool = True

    def validate(self) -> None:
        from noclone.presets import check_max_grad_norm

        check_max_grad_norm(self.max_grad_norm)
        checks = [
            (self.warmup_steps >= 0, f"--warmup-steps {self.warmup_steps} must be >= 0"),
            (self.weight_decay >= 0, f"--weight-decay {self.weight_decay} must be >= 0"),
            (self.max_seconds is None or self.max_seconds > 0, "the time limit must be positive"),
            (self.steps >= 1, f"--steps {self.steps} must be at least 1"),
            (self.batch_size >= 1 and self.reg_batch_size >= 1, "batch sizes must be at least 1"),
            (0 < self.lr < 1, f"--lr {self.lr} is outside (0, 1)"),
            (self.reg_weight >= 0, "reg_weight must be >= 0"),
            (self.t_min >= 0 and (self.t_max is None or self.t_max > self.t_min), "need 0 <= t_min < t_max"),
            (self.checkpoint_every >= 1, "--checkpoint-every must be at least 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise NocloneError(message)


RID_DTYPES = ("auto", "fp32", "bf16", "fp16")
# The paper's generator and budget: the DiT of rid_nets.DIT_PAPER at 512 px, eps 12/255 in [-1, 1] space (6/255 in
# pixels), AdamW lr 3e-4 (the default); batch 1-3 per GPU on 8 GPUs: batch 8 (the default). Steps: not stated.
RID_PAPER = dict(arch="dit-paper", budget=6 / 255, resolution=DIT_PAPER_RESOLUTION)
# What the released code (Guohanzhong/RID) does that the paper does not state
RID_OFFICIAL_QUIRKS = dict(weight_decay=1e-2, warmup_steps=500, max_grad_norm=None, dtype="fp32")


@dataclass
class RIDRecipe(RIDTrainConfig):
    """A RID training run as one preset: the generator (arch, budget, resolution), the dtype the frozen models
    load in, and the training settings (`train_config()`). `noclone rid train --preset NAME [--show]`."""

    arch: str = "conv"
    budget: float = 8 / 255
    resolution: int | None = None    # None: the first model's
    dtype: str = "auto"              # 'auto': --dtype as given
    preset_name: str | None = None

    PRESETS: ClassVar[dict[str, dict]] = {
        "sandbox": {},
        "paper": RID_PAPER,
        "paper-sd21": {**RID_PAPER, "resolution": 768},
        "official": {**RID_PAPER, **RID_OFFICIAL_QUIRKS},
        "official-sd21": {**RID_PAPER, **RID_OFFICIAL_QUIRKS, "resolution": 768},
    }
    DEFAULT_PRESET: ClassVar[str] = "sandbox"

    @classmethod
    def preset(cls, name: str, **overrides) -> "RIDRecipe":
        from noclone.defenses.base import config_from_preset

        return replace(config_from_preset(cls, name, "RID", overrides), preset_name=name)

    @classmethod
    def show(cls, name: str) -> str:
        from noclone.presets import format_table, table_rows

        notes = ["'official' mirrors the released code (weight decay, warm-up, no clipping, fp32), not the paper"
                 ] if name.startswith("official") else []
        if name.endswith("sd21"):
            notes.append("the sd21 variants are ours: the same recipe at SD2.1's 768 px")
        return format_table(f"RID preset {name!r} (generator training)",
                            table_rows(cls.preset(name), cls.preset(cls.DEFAULT_PRESET)), cls.DEFAULT_PRESET, notes)

    def validate(self) -> None:
        super().validate()
        if self.arch not in ARCHS:
            raise NocloneError(f"unknown --arch {self.arch!r}; choose from {', '.join(ARCHS)}")
        if self.dtype not in RID_DTYPES:
            raise NocloneError(f"dtype {self.dtype!r}: choose from {', '.join(RID_DTYPES)}")
        if self.resolution is not None and (not isinstance(self.resolution, int) or self.resolution < 8):
            raise NocloneError(f"--resolution {self.resolution!r} must be an integer of at least 8")
        parse_budget(self.budget)

    def train_config(self) -> RIDTrainConfig:
        return RIDTrainConfig(**{f.name: getattr(self, f.name) for f in fields(RIDTrainConfig)})

    def card_entry(self) -> dict:
        """`preset` and `settings` (what differs from the default preset) for the generator's config.json."""
        from noclone.presets import card_entry

        return card_entry(self.preset_name, self, RIDRecipe.preset(self.DEFAULT_PRESET), self.DEFAULT_PRESET)


@dataclass
class RegressionTargets:
    """Images with image-wise perturbations (e.g. ASPL's) for L_reg: [M, 3, R, R] each, [-1, 1] units."""

    images: torch.Tensor
    deltas: torch.Tensor


def _freeze(pipe) -> None:
    for module in (pipe.vae, pipe.unet, pipe.text_encoder):
        module.eval().requires_grad_(False)


def adv_sds_loss(pipe, x_def: torch.Tensor, cond: torch.Tensor, generator: torch.Generator, t_min: int = 0,
                 t_max: int | None = None, dist: Distributed | None = None) -> dict[str, torch.Tensor]:
    """L_k = 0.5 mean||z_t - sg(z_t - g)||^2, g = -(1 - abar_t)(eps_pred - eps), for one frozen pipeline.
    With `dist` (several processes), `x_def` is this process's shard: noise and timesteps are drawn for the global
    batch, as one process would, and cut to the same shard."""
    from noclone.training.data import pipeline_resolution

    vae, unet, scheduler = pipe.vae, pipe.unet, training_scheduler(pipe)
    res = pipeline_resolution(pipe)
    if tuple(x_def.shape[-2:]) != (res, res):
        x_def = F.interpolate(x_def, size=(res, res), mode="bilinear", align_corners=False, antialias=True)
    device = unet.device
    z0 = vae.encode(x_def.to(vae.device, vae.dtype)).latent_dist.mean.float().to(device) * vae.config.scaling_factor
    n = len(z0) if dist is None else dist.global_batch(len(z0))
    shard = (lambda v: v) if dist is None else dist.shard
    noise = shard(torch.randn((n, *z0.shape[1:]), generator=generator)).to(device)
    t = shard(torch.randint(t_min, t_max or scheduler.config.num_train_timesteps, (n,), generator=generator)).to(device)
    n = len(z0)
    z_t = scheduler.add_noise(z0, noise, t)
    with torch.no_grad():
        out = unet(z_t.detach().to(unet.dtype), t, cond.expand(n, -1, -1).to(device, unet.dtype)).sample.float()
        eps_pred = predicted_noise(scheduler, out, z_t.detach(), t)
        w = (1 - scheduler.alphas_cumprod.to(device)[t].float()).view(-1, 1, 1, 1)
        g = -w * (eps_pred - noise)
        mse = F.mse_loss(eps_pred, noise)
    loss = 0.5 * F.mse_loss(z_t, (z_t - g).detach())
    return {"loss": loss, "mse": mse}


def train_rid(generator: RIDGenerator, pipes: Sequence, images: torch.Tensor, config: RIDTrainConfig | None = None,
              targets: RegressionTargets | None = None, checkpoint_dir: str | Path | None = None,
              after_step: Callable[[int], None] | None = None) -> list[dict]:
    """Train `generator` in place on [N, 3, R, R] images against frozen pipelines; returns the per-step history."""
    config = config or RIDTrainConfig()
    config.validate()
    if not pipes:
        raise NocloneError("RID training needs at least one diffusion model")
    if images.ndim != 4 or images.shape[1] != 3 or len(images) == 0:
        raise NocloneError(f"RID training images must be a non-empty [N, 3, R, R] tensor, got {list(images.shape)}")
    dist = current()
    for pipe in pipes:
        place_pipeline(pipe)
        _freeze(pipe)
    device = pipes[0].unet.device
    generator.to(device).train().requires_grad_(True)
    upcast_trainable(generator)  # fp32 master weights whatever the frozen pipelines' dtype (their inputs are cast)
    conds = []
    with torch.no_grad():
        for pipe in pipes:
            conds.append(encode_prompts(pipe.text_encoder, pipe.tokenizer, [config.prompt]))
    eta2 = generator.eta ** 2
    optimizer = torch.optim.AdamW(generator.parameters(), lr=config.lr, weight_decay=config.weight_decay)

    def step_fn(step: int) -> dict[str, torch.Tensor]:
        if config.warmup_steps:  # set from the step index, so a resumed run has the same schedule
            for group in optimizer.param_groups:
                group["lr"] = config.lr * min(1.0, step / config.warmup_steps)
        g = step_generator(config.seed, step, "rid/data")
        # the global batch (N processes x batch_size) is drawn whole; this process trains on its slice
        x = dist.shard(images[torch.randint(0, len(images), (dist.global_batch(config.batch_size),), generator=g)])
        x = x.to(device)
        x_def = (x + generator(x)).clamp(-1, 1)
        terms, mses = [], []
        for k, pipe in enumerate(pipes):
            out = adv_sds_loss(pipe, x_def, conds[k], step_generator(config.seed, step, f"rid/model{k}"),
                               config.t_min, config.t_max, dist if dist.enabled else None)
            terms.append(out["loss"])
            mses.append(out["mse"])
        record = {"sds": torch.stack(terms).mean().detach(), "mse": torch.stack(mses).mean()}
        if targets is not None and config.reg_weight > 0:
            ridx = dist.shard(torch.randint(0, len(targets.images), (dist.global_batch(config.reg_batch_size),),
                                            generator=g))
            pred = generator(targets.images[ridx].to(device))
            reg = F.mse_loss(pred, targets.deltas[ridx].to(device)) / eta2
            terms.append(config.reg_weight * reg)
            record["reg"] = reg.detach()
        record["loss"] = torch.stack(terms).mean()
        return record

    # the time limit is the loop's deadline: under several processes it is one collective decision
    deadline = None if config.max_seconds is None else time.time() + config.max_seconds
    try:
        history = run_training(
            list(generator.named_parameters()), optimizer, step_fn,
            LoopConfig(config.steps, Path(checkpoint_dir) if checkpoint_dir else None, config.checkpoint_every, "rid",
                       config.progress, config.max_grad_norm, deadline=deadline),
            after_step=after_step,
        )
    finally:
        generator.eval().requires_grad_(False)
    if len(history) < config.steps:
        log.warning("rid: time limit reached, stopping after step %d of %d", len(history), config.steps)
    return history


@torch.no_grad()
def rid_objective(generator: RIDGenerator, pipes: Sequence, images: torch.Tensor, samples: int = 4,
                  seed: int = 1234, prompt: str = "") -> float:
    """Minus the frozen models' mean denoising error on x + delta(x) at fixed probe noise (lower = stronger)."""
    total = 0.0
    images = images.to(next(generator.parameters()).device)
    x_def = (images + generator(images)).clamp(-1, 1)
    for k, pipe in enumerate(pipes):
        cond = encode_prompts(pipe.text_encoder, pipe.tokenizer, [prompt])
        for i in range(samples):
            total += float(adv_sds_loss(pipe, x_def, cond, step_generator(seed, i, f"probe{k}"))["mse"])
    return -total / (samples * len(pipes))


# ------------------------------------------------------------------------------------------- training data


def sandbox_training_images(n_identities: int, photos: int = 4, size: int = 64) -> torch.Tensor:
    """[n * photos, 3, size, size] renders of evaluator-range identities (never the held-out range), classes mixed."""
    from noclone.sandbox.render import CLASSES, render_array
    from noclone.sandbox.splits import EVALUATOR_IDENTITIES

    if n_identities < 1 or photos < 1:
        raise NocloneError("--sandbox-identities and photos per identity must be at least 1")
    arrays = []
    for i in range(n_identities):
        identity = EVALUATOR_IDENTITIES.start + i
        arrays.append(render_array(CLASSES[i % len(CLASSES)], [identity] * photos, list(range(photos)), size))
    batch = torch.from_numpy(np.concatenate(arrays)).permute(0, 3, 1, 2).float()
    return batch / 127.5 - 1.0


def folder_training_images(folders: Sequence[str | Path], resolution: int) -> torch.Tensor:
    """Every photo of the folders, centre-cropped to resolution (the attacker's preprocessing), in [-1, 1]."""
    from noclone.data.images import images_to_tensor, load_image_folder

    tensors = [images_to_tensor([im for _, im in load_image_folder(folder, min_count=1)], resolution)
               for folder in folders]
    return torch.cat(tensors)


def aspl_targets(pipe, images: torch.Tensor, subjects: int, photos: int, budget: float, seed: int = 0,
                 **settings: Any) -> RegressionTargets:
    """ASPL (sandbox preset) perturbations for the first `subjects` groups of `photos` consecutive images."""
    from noclone.cloak.aspl import ASPL

    cloak = ASPL(pipe, budget=budget, seed=seed, **settings)
    chosen, deltas = [], []
    for s in range(subjects):
        group = images[s * photos : (s + 1) * photos]
        if len(group) == 0:
            break
        deltas += cloak.compute_deltas([x.unsqueeze(0) for x in group])
        chosen.append(group)
    if not chosen:
        raise NocloneError("no images for ASPL regression targets")
    return RegressionTargets(torch.cat(chosen), torch.cat(deltas))


# ------------------------------------------------------------------------------------------ the whole run


def train_rid_generator(out: str | Path, models: Sequence, *, folders: Sequence[str | Path] = (),
                        sandbox_identities: int = 0, photos_per_identity: int = 4, arch: str = "conv",
                        budget: float = 8 / 255, resolution: int | None = None, net: dict | None = None,
                        train: RIDTrainConfig | None = None, regression_subjects: int = 0,
                        overwrite: bool = False, checkpoint_dir: str | Path | None = None,
                        recipe: "RIDRecipe | None" = None) -> Path:
    """Train a RID generator against `models` (pipelines, paths or 'sandbox') and save it to `out` (fp16).

    Data: the photos of `folders` and/or `sandbox_identities` x `photos_per_identity` sandbox renders
    (evaluator-range identities). `regression_subjects` > 0 adds L_reg toward ASPL perturbations (sandbox preset,
    against the first model) of that many groups of `photos_per_identity` images. Checkpoints go beside `out`
    and a rerun resumes; they are removed once the generator is written. `recipe`: the preset the settings came
    from, recorded in config.json (`info.preset`, `info.settings`).
    """
    import shutil

    from noclone.cloak.base import check_output_dir, resolve_model
    from noclone.defenses.base import check_checkpoint
    from noclone.models.pipeline import model_fingerprint
    from noclone.training.data import pipeline_resolution
    from noclone.training.loop import smoothed

    train = train or RIDTrainConfig()
    train.validate()
    out = Path(out)
    if out.is_file() or (out.is_dir() and any(out.iterdir()) and not overwrite):
        raise NocloneError(f"{out}/: output exists and is not empty (pass --overwrite to replace it)")
    for folder in folders:
        check_output_dir(folder, out, overwrite=True)
    if not folders and sandbox_identities < 1:
        raise NocloneError("no training images: give --images DIR or --sandbox-identities N")
    if not models:
        raise NocloneError("RID training needs at least one diffusion model (--models)")
    budget = parse_budget(budget)
    pipes = [resolve_model(m) for m in models]
    resolution = resolution or (DIT_PAPER_RESOLUTION if arch == "dit-paper" else pipeline_resolution(pipes[0]))
    parts = []
    if sandbox_identities:
        parts.append(sandbox_training_images(sandbox_identities, photos_per_identity, resolution))
    if folders:
        parts.append(folder_training_images(folders, resolution))
    images = torch.cat(parts)
    config = RIDConfig(arch=arch, budget=budget, resolution=resolution, net=dict(net or {}))
    torch.manual_seed(train.seed)
    generator = RIDGenerator(config)
    started = time.perf_counter()
    targets = None
    if regression_subjects > 0:
        targets = aspl_targets(pipes[0], images, regression_subjects, photos_per_identity, budget, seed=train.seed)
    fingerprints = [model_fingerprint(p) for p in pipes]
    ckpt = Path(checkpoint_dir) if checkpoint_dir else out.parent / f".{out.name}.checkpoint"
    transient = ("steps", "progress", "checkpoint_every", "max_seconds")
    train_identity = {k: v for k, v in asdict(train).items() if k not in transient}
    dist = current()
    if dist.enabled:  # keyed by the global batch: N processes at B/N resume one process's run at B, and back
        train_identity.update(batch_size=dist.global_batch(train.batch_size),
                              reg_batch_size=dist.global_batch(train.reg_batch_size))
    if not train.warmup_steps:  # added with the presets: older checkpoints lack it
        train_identity.pop("warmup_steps")
    identity = {"generator": asdict(config), "train": train_identity,
                "models": fingerprints, "images": len(images), "folders": [str(f) for f in folders],
                "sandbox_identities": sandbox_identities, "regression_subjects": regression_subjects}
    with dist.main_first():
        if dist.is_main:
            check_checkpoint(ckpt, identity)
    history = train_rid(generator, pipes, images, train, targets, ckpt)
    mse_first, mse_last = smoothed(history, "mse")
    generator.config.info = {
        "models": fingerprints, "steps": train.steps, "steps_in_this_run": len(history), "batch_size": train.batch_size, "lr": train.lr,
        "images": len(images), "sandbox_identities": sandbox_identities, "folders": [str(f) for f in folders],
        "regression_subjects": regression_subjects, "seed": train.seed,
        "denoising_mse_first_last": [mse_first, mse_last], "seconds": round(time.perf_counter() - started, 1),
    }
    if dist.enabled:
        generator.config.info.update(processes=dist.world_size, global_batch_size=dist.global_batch(train.batch_size))
    if recipe is not None:
        generator.config.info.update(recipe.card_entry())
    if dist.is_main:  # the processes hold equal weights: one writes them
        generator.save_pretrained(out, overwrite=overwrite)
        shutil.rmtree(ckpt, ignore_errors=True)
    dist.barrier()
    log.info("RID generator written to %s (denoising mse on protected images %.4f -> %.4f)", out, mse_first, mse_last)
    return out
