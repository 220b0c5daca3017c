"""What every personalization attack shares: its config, the subject data, the DreamBooth loss, the run."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import ClassVar

import torch

from noclone.data.images import file_sha256, load_image_folder
from noclone.errors import NocloneError
from noclone.training.data import LatentSet, SubjectData, pipeline_resolution
from noclone.training.diffusion import diffusion_loss, prompt_condition, step_generator, training_scheduler
from noclone.training.distributed import current, place_pipeline
from noclone.training.loop import LoopConfig, run_training
from noclone.training.precision import compute_dtype, settle_pipeline, upcast_trainable

log = logging.getLogger(__name__)

MIN_SUBJECT_IMAGES = 2

# UNet layers a LoRA adapts, by `lora_targets` name. Here rather than in lora.py so that the config can validate the
# name without importing the LoRA module (which imports this one).
LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
LORA_TARGET_SETS = {
    "attention": LORA_TARGETS,  # diffusers' DreamBooth-LoRA script
    "all": LORA_TARGETS + ["proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2", "conv_shortcut",
                           "time_emb_proj"],  # + feed-forward, resnet convolutions (LoCon-like)
}


class PromptTemplates:
    """Instance and class prompts from `template`, `class_template`, `token` and `class_noun` fields."""

    template: str
    class_template: str
    token: str
    class_noun: str

    @property
    def instance_prompt(self) -> str:
        return self.template.format(token=self.token, class_noun=self.class_noun)

    @property
    def class_prompt(self) -> str:
        return self.class_template.format(class_noun=self.class_noun)


@dataclass
class PersonalizationConfig(PromptTemplates):
    """Settings of one personalization run; defaults are tuned for the sandbox model (64 px)."""

    class_noun: str = "person"
    token: str = "sks"
    template: str = "a photo of {token} {class_noun}"
    class_template: str = "a photo of a {class_noun}"
    steps: int = 200
    lr: float = 2e-4
    batch_size: int = 4
    seed: int = 0
    prior_preservation: bool = True
    prior_weight: float = 1.0
    num_class_images: int = 50
    class_image_steps: int = 25
    train_text_encoder: bool = False
    text_encoder_lr: float | None = None
    lora_rank: int = 4
    lora_alpha: float | None = None
    lora_targets: str = "attention"    # UNet layers a LoRA adapts: 'attention' | 'all' (+ feed-forward and resnet convs)
    checkpoint_every: int = 50
    progress: bool = True
    extra: dict = field(default_factory=dict)

    def fingerprint(self) -> str:
        fields = {k: v for k, v in asdict(self).items() if k not in ("progress", "checkpoint_every", "steps")}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]

    def validate(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise NocloneError("--steps and --batch-size must be at least 1")
        if not (0 < self.lr < 1):
            raise NocloneError(f"--lr {self.lr} is outside (0, 1)")
        if not self.token.strip() or " " in self.token:
            raise NocloneError(f"--token {self.token!r} must be one non-empty word")
        if self.lora_targets not in LORA_TARGET_SETS:
            raise NocloneError(f"--lora-targets {self.lora_targets!r}: choose from {', '.join(LORA_TARGET_SETS)}")


# Attack settings by target scale. "sandbox": the embedded 64 px model (the default everywhere). "sd15": the
# protocol of the APDM / Anti-DreamBooth papers on SD1.5 at 512 px (diffusers' DreamBooth script settings).
PRESETS: dict[str, dict[str, dict]] = {
    "sandbox": {
        # The sandbox text encoder was trained from scratch on a small caption set: with the UNet alone, prior
        # preservation pulls "sks person" back to "a person" (match rate 0.00 at 200 steps, lr 2e-4); training the
        # text encoder too binds the identifier (0.97 at 300 steps, lr 3e-4, text lr 1e-3; person, seed 0).
        "dreambooth": dict(steps=300, lr=3e-4, batch_size=4, num_class_images=50, train_text_encoder=True,
                           text_encoder_lr=1e-3),
        # LoRA on every UNet layer (rank 16) and, for the same reason, on the text encoder's attention. Measured on
        # the person (seed 0): attention only, rank 4, 200 steps: 0.09; all layers: 0.16; rank 16, 400 steps: 0.59;
        # 600 steps: 0.78.
        "lora": dict(steps=600, lr=1e-3, batch_size=4, num_class_images=50, lora_rank=16, lora_targets="all",
                     train_text_encoder=True, text_encoder_lr=1e-3),
        "ti": dict(steps=200, lr=5e-3, batch_size=4, num_class_images=50, prior_preservation=False),
    },
    "sd15": {
        "dreambooth": dict(steps=800, lr=5e-6, batch_size=1, num_class_images=200, class_image_steps=50),
        "lora": dict(steps=800, lr=1e-4, batch_size=1, num_class_images=200, class_image_steps=50, lora_rank=32),
        "ti": dict(steps=3000, lr=5e-4, batch_size=1, prior_preservation=False),
    },
}


def preset_config(method: str, preset: str = "sandbox", **overrides) -> PersonalizationConfig:
    """The preset's settings for `method`, with explicit overrides (None values are ignored)."""
    if preset not in PRESETS:
        raise NocloneError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    if method not in PRESETS[preset]:
        raise NocloneError(f"unknown method {method!r}; choose from {', '.join(PRESETS[preset])}")
    fields = {**PRESETS[preset][method], **{k: v for k, v in overrides.items() if v is not None}}
    return PersonalizationConfig(**fields)


def load_subject_images(folder: str | Path, min_count: int = MIN_SUBJECT_IMAGES):
    """The subject's photos (one clear error per bad file), as (paths, images)."""
    loaded = load_image_folder(folder, min_count=min_count)
    return [p for p, _ in loaded], [im for _, im in loaded]


def subject_fingerprint(paths) -> list[str]:
    """Hashes of the subject's photos, never the photos themselves."""
    return [file_sha256(p) for p in paths]


def build_subject_data(pipe, images, config: PersonalizationConfig, class_cache: Path | None = None) -> SubjectData:
    from noclone.class_images import class_images

    resolution = pipeline_resolution(pipe)
    instance = LatentSet.from_images(pipe.vae, images, config.instance_prompt, resolution)
    prior = None
    if config.prior_preservation:
        priors = class_images(pipe, config.class_prompt, config.num_class_images, seed=config.seed,
                              steps=config.class_image_steps, cache=class_cache, progress=config.progress)
        prior = LatentSet.from_images(pipe.vae, priors, config.class_prompt, resolution)
    return SubjectData(instance, prior)


def dreambooth_loss(unet, text_encoder, tokenizer, scheduler, data: SubjectData, generator: torch.Generator,
                    batch_size: int, prior_weight: float = 1.0, cond_cache: dict | None = None,
                    shard: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """L_per = L_simple(instance) + prior_weight * L_ppl(class): the DreamBooth objective (shared with defences).
    With `shard` (noclone.training.distributed), `batch_size` is the global batch: it is drawn whole from
    `generator` and this process computes its slice (the losses are its slice's means)."""

    def cond(prompt: str) -> torch.Tensor:
        return prompt_condition(text_encoder, tokenizer, prompt, cond_cache)

    latents = data.instance.batch(generator, batch_size)
    instance_cond = cond(data.instance.prompt).expand(batch_size, -1, -1)
    loss_instance = diffusion_loss(unet, scheduler, latents, instance_cond, generator, shard=shard)
    out = {"loss": loss_instance, "instance": loss_instance}
    if data.prior is not None and prior_weight > 0:
        prior_latents = data.prior.batch(generator, batch_size)
        prior_cond = cond(data.prior.prompt).expand(batch_size, -1, -1)
        loss_prior = diffusion_loss(unet, scheduler, prior_latents, prior_cond, generator, shard=shard)
        out["loss"] = loss_instance + prior_weight * loss_prior
        out["prior"] = loss_prior
    return out


class Personalization(ABC):
    """Base of DreamBooth / LoRA / textual inversion: subclasses choose what trains and how it is saved."""

    name: ClassVar[str] = "base"

    def __init__(self, config: PersonalizationConfig):
        config.validate()
        self.config = config

    # --- subclass hooks ---
    @abstractmethod
    def prepare(self, pipe) -> list[tuple[str, torch.nn.Parameter]]:
        """Set requires_grad and return the named trainable parameters."""

    def optimizer(self, params: list[tuple[str, torch.nn.Parameter]]) -> torch.optim.Optimizer:
        """AdamW with the UNet weights at `lr` and any text-encoder weights at `text_encoder_lr` (default `lr`)."""
        unet = [p for n, p in params if not n.startswith("text_encoder.")]
        text = [p for n, p in params if n.startswith("text_encoder.")]
        groups = [{"params": unet, "lr": self.config.lr}] if unet else []
        if text:
            groups.append({"params": text, "lr": self.config.text_encoder_lr or self.config.lr})
        return torch.optim.AdamW(groups, weight_decay=1e-2)

    @abstractmethod
    def save(self, pipe, out: Path, card: dict) -> None:
        """Write the personalized result (a pipeline directory or adapter weights) atomically to `out`."""

    def after_step(self, pipe, step: int) -> None:
        pass

    def _after_step(self, pipe, step: int, snapshots: dict[int, Callable] | None) -> None:
        self.after_step(pipe, step)
        if snapshots and step + 1 in snapshots:
            snapshots[step + 1](pipe)

    # --- the shared run ---
    def train(self, pipe, images, checkpoint_dir: Path | None = None, class_cache: Path | None = None,
              snapshots: dict[int, Callable] | None = None) -> list[dict]:
        """Fine-tune `pipe` in place on the subject's images; returns the loss history. A half pipeline trains fp32
        master weights under autocast and comes out fp32 (noclone.training.precision; LoRA adapters stay beside
        the half base). `snapshots` maps a step count k to `callback(pipe)`, called once k steps are done: with no
        lr schedule and every step's randomness drawn from its index, that state is exactly a k-step run's (a run
        resumed past k does not call it). Under `accelerate launch` with N processes each computes
        `batch_size` of a global batch of N x `batch_size` (noclone.training.distributed); only the main process
        writes the checkpoints."""
        config = self.config
        dist = current()
        place_pipeline(pipe)
        torch.manual_seed(config.seed)
        dtype = compute_dtype(pipe.unet, pipe.vae, pipe.text_encoder)
        pipe.vae.requires_grad_(False)
        pipe.unet.requires_grad_(False)
        pipe.text_encoder.requires_grad_(False)
        with dist.main_first():  # the main process generates the class images; the others read its cache
            data = build_subject_data(pipe, images, config, class_cache)
        params = self.prepare(pipe)
        upcast_trainable(p for _, p in params)
        optimizer = self.optimizer(params)
        cond_cache: dict = {}
        scheduler = training_scheduler(pipe)

        def step_fn(step: int) -> dict[str, torch.Tensor]:
            generator = step_generator(config.seed, step, self.name)
            return dreambooth_loss(pipe.unet, pipe.text_encoder, pipe.tokenizer, scheduler, data, generator,
                                   dist.global_batch(config.batch_size),
                                   config.prior_weight if config.prior_preservation else 0.0, cond_cache,
                                   shard=dist.shard if dist.enabled else None)

        if checkpoint_dir is not None:
            with dist.main_first():
                if dist.is_main:
                    _check_checkpoint_matches(checkpoint_dir, config, dist.world_size)
        history = run_training(
            params, optimizer, step_fn,
            LoopConfig(config.steps, checkpoint_dir, config.checkpoint_every, f"{self.name}", config.progress,
                       autocast=dtype),
            after_step=lambda step: self._after_step(pipe, step, snapshots),
        )
        for module in (pipe.unet, pipe.text_encoder):
            module.eval()
            module.requires_grad_(False)
        settle_pipeline(pipe)
        return history

    def run(self, pipe, images_dir: str | Path, out: str | Path, overwrite: bool = False,
            checkpoint_dir: str | Path | None = None,
            snapshots: dict[int, Callable[[Callable[[Path], None]], None]] | None = None) -> Path:
        """Load photos, train with checkpoints beside `out`, save atomically, drop the checkpoints. `snapshots`
        maps a step count k to `callback(save)`: `save(dir)` writes the k-step result the way `out` is written."""
        from noclone.models.pipeline import model_fingerprint

        out = Path(out)
        if out.exists() and any(out.iterdir()) and not overwrite:
            raise NocloneError(f"{out}/: output exists and is not empty (pass --overwrite to replace it)")
        paths, images = load_subject_images(images_dir)
        base_fingerprint = model_fingerprint(pipe)
        ckpt = Path(checkpoint_dir) if checkpoint_dir else out.parent / f".{out.name}.checkpoint"

        dist = current()

        def card(steps: int, history: list[dict] | None) -> dict:
            processes = ({"processes": dist.world_size, "global_batch_size": dist.global_batch(self.config.batch_size)}
                         if dist.enabled else {})
            return {"method": self.name, "config": {**asdict(self.config), "steps": steps}, **processes,
                    "base_model_fingerprint": base_fingerprint, "subject_sha256": subject_fingerprint(paths),
                    "instance_prompt": self.config.instance_prompt,
                    **({"loss_first_last": [history[0]["loss"], history[-1]["loss"]]} if history else
                       {"snapshot_of": self.config.steps})}

        def save(pipe, where, steps: int, history: list[dict] | None) -> None:
            if dist.is_main:  # under `accelerate launch` the processes hold equal weights: one writes them
                self.save(pipe, Path(where), card(steps, history))

        hooks = {k: (lambda pipe, k=k, hook=hook: hook(lambda where: save(pipe, where, k, None)))
                 for k, hook in (snapshots or {}).items() if 0 < k < self.config.steps}
        history = self.train(pipe, images, ckpt, snapshots=hooks)
        save(pipe, out, self.config.steps, history)
        if dist.is_main:
            shutil.rmtree(ckpt, ignore_errors=True)
        dist.barrier()  # every process returns once the output is written
        return out


def _check_checkpoint_matches(directory: Path, config: PersonalizationConfig, processes: int = 1) -> None:
    # keyed by the global batch: N processes at batch B/N resume what one process at batch B checkpointed
    keyed = config if processes == 1 else replace(config, batch_size=config.batch_size * processes)
    fingerprint = keyed.fingerprint()
    marker = directory / "config_fingerprint.txt"
    if marker.is_file() and marker.read_text().strip() != fingerprint:
        raise NocloneError(f"{directory}: checkpoint belongs to a run with other settings; delete it or change --out")
    directory.mkdir(parents=True, exist_ok=True)
    marker.write_text(fingerprint)
