"""Model surgery: what an attacker who has the protected weights *and* a public base model can do before (or after)
fine-tuning, without knowing anything about the defence.

- `swap_vae`: the base model's VAE replaces the published one (removes anything living in the decoder).
- `swap_text_encoder`: the base model's text encoder replaces the published one.
- `graft`: one UNet block group (`down`, `mid`, `up` or `io` = conv_in, time embedding, conv_norm_out, conv_out)
  is copied back from the base model.
- `generic_finetune`: a short fine-tune of the UNet and text encoder on class images drawn by the base model with
  the plain class prompt (no identifier): the "continue pre-training" move that can wash a weight-space defence out.

Each operation changes the pipeline in place and returns a dict saying what it did (recorded with the result).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from noclone.errors import NocloneError

log = logging.getLogger(__name__)

OPERATIONS = ("swap_vae", "swap_text_encoder", "graft", "generic_finetune")
GRAFT_GROUPS = ("down", "mid", "up", "io")


@dataclass
class SurgeryConfig:
    """One surgery operation; `group` for `graft`; the fine-tune's length, lr and data for `generic_finetune`."""

    op: str
    group: str | None = None
    steps: int = 150
    lr: float = 3e-4
    text_encoder_lr: float = 1e-3
    n_images: int = 24
    seed: int = 0
    progress: bool = False

    def validate(self) -> None:
        if self.op not in OPERATIONS:
            raise NocloneError(f"unknown surgery {self.op!r}; choose from {', '.join(OPERATIONS)}")
        if self.op == "graft" and self.group not in GRAFT_GROUPS:
            raise NocloneError(f"surgery graft needs group: one of {', '.join(GRAFT_GROUPS)} (got {self.group!r})")
        if self.op != "graft" and self.group is not None:
            raise NocloneError(f"surgery {self.op}: 'group' is a graft setting")
        if self.steps < 1 or self.n_images < 2:
            raise NocloneError("surgery generic_finetune needs steps >= 1 and n_images >= 2")


def _group_prefixes(group: str) -> tuple[str, ...]:
    return {"down": ("down_blocks.",), "mid": ("mid_block.",), "up": ("up_blocks.",),
            "io": ("conv_in.", "time_embedding.", "conv_norm_out.", "conv_out.")}[group]


def _same_shapes(a: torch.nn.Module, b: torch.nn.Module, what: str) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    if sa.keys() != sb.keys() or any(sa[k].shape != sb[k].shape for k in sa):
        raise NocloneError(f"surgery: the base model's {what} has another architecture than the attacked model's")


def graft(unet: torch.nn.Module, base_unet: torch.nn.Module, group: str) -> int:
    """Copy one block group's weights from `base_unet` into `unet`; returns the number of tensors copied."""
    _same_shapes(unet, base_unet, "UNet")
    prefixes = _group_prefixes(group)
    source = base_unet.state_dict()
    copied = 0
    with torch.no_grad():
        for name, tensor in unet.state_dict().items():
            if name.startswith(prefixes):
                tensor.copy_(source[name].to(tensor.dtype))
                copied += 1
    if not copied:
        raise NocloneError(f"surgery graft: the UNet has no {group!r} block group")
    return copied


def _swap(pipe, base, name: str) -> None:
    mine, theirs = getattr(pipe, name), getattr(base, name)
    _same_shapes(mine, theirs, name.replace("_", " "))
    replacement = copy.deepcopy(theirs).to(device=mine.device, dtype=mine.dtype).eval().requires_grad_(False)
    setattr(pipe, name, replacement)
    pipe.register_modules(**{name: replacement})


def generic_finetune(pipe, base, config: SurgeryConfig, class_noun: str, class_cache: Path | None = None) -> dict:
    """Fine-tune `pipe` on class images the base model draws for "a photo of a <class>" (no identifier)."""
    from noclone.attacks.dreambooth import DreamBooth
    from noclone.attacks.base import PersonalizationConfig
    from noclone.class_images import class_images

    prompt = f"a photo of a {class_noun}"
    images = class_images(base, prompt, config.n_images, seed=10_000 + config.seed, cache=class_cache,
                          progress=config.progress)
    finetune = DreamBooth(PersonalizationConfig(
        class_noun=class_noun, template="a photo of a {class_noun}", steps=config.steps, lr=config.lr,
        batch_size=4, seed=config.seed, prior_preservation=False, train_text_encoder=True,
        text_encoder_lr=config.text_encoder_lr, progress=config.progress))
    history = finetune.train(pipe, images, checkpoint_dir=None, class_cache=class_cache)
    return {"prompt": prompt, "n_images": len(images), "steps": config.steps,
            "loss_first_last": [history[0]["loss"], history[-1]["loss"]]}


def apply_surgery(pipe, base, config: SurgeryConfig, class_noun: str = "person",
                  class_cache: Path | None = None) -> dict:
    """Apply one operation to `pipe` in place, taking the parts it needs from `base`; returns what it did."""
    config.validate()
    if base is None:
        raise NocloneError(f"surgery {config.op} needs the base model (--base)")
    if config.op == "swap_vae":
        _swap(pipe, base, "vae")
        return {"op": "swap_vae"}
    if config.op == "swap_text_encoder":
        _swap(pipe, base, "text_encoder")
        return {"op": "swap_text_encoder"}
    if config.op == "graft":
        return {"op": "graft", "group": config.group, "tensors": graft(pipe.unet, base.unet, config.group)}
    return {"op": "generic_finetune", **generic_finetune(pipe, base, config, class_noun, class_cache)}
