"""One training loop for attacks and defences: seeded steps, progress bar, checkpoint every K steps, resume."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from noclone.data.atomic import atomic_write_bytes, atomic_write_json
from noclone.errors import NocloneError
from noclone.training.precision import autocast, upcast_trainable

log = logging.getLogger(__name__)


@dataclass
class LoopConfig:
    steps: int
    checkpoint_dir: Path | None = None
    checkpoint_every: int = 50
    description: str = "training"
    progress: bool = True
    max_grad_norm: float | None = 1.0
    # True: `step_fn` fills the parameters' `.grad` itself (e.g. gradients gathered at other weights, as in
    # APDM's learning-to-protect) and the loop does not call `loss.backward()`; clipping and the step still apply.
    manual_backward: bool = False
    # the pipeline's half dtype: `step_fn` runs under autocast in it (noclone.training.precision); None/fp32: none
    autocast: torch.dtype | None = None
    # wall-clock time (time.time()) after which the loop checkpoints and returns early; a rerun resumes from there
    deadline: float | None = None


def _trainable(named_params: Iterable[tuple[str, torch.nn.Parameter]]) -> dict[str, torch.nn.Parameter]:
    params = {name: p for name, p in named_params if p.requires_grad}
    if not params:
        raise NocloneError("nothing to train: no parameter requires gradients")
    return params


def save_checkpoint(directory: Path, step: int, params: dict[str, torch.nn.Parameter], optimizer,
                    history: list[dict], extra: dict | None = None, stateful=None) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: p.detach().to("cpu").contiguous() for name, p in params.items()}
    atomic_write_bytes(directory / "params.safetensors", lambda f: f.write(_safetensors_bytes(tensors)))
    atomic_write_bytes(directory / "optimizer.pt", lambda f: torch.save(optimizer.state_dict(), f))
    if stateful is not None:
        atomic_write_bytes(directory / "extra_state.pt", lambda f: torch.save(stateful.state_dict(), f))
    atomic_write_json(directory / "state.json", {"step": step, "history": history, **(extra or {})})


def _safetensors_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save(tensors)


def load_checkpoint(directory: Path, params: dict[str, torch.nn.Parameter], optimizer,
                    stateful=None) -> tuple[int, list[dict]]:
    """Restore parameters, optimizer state (and `stateful`'s state) in place; returns (step, history)."""
    state = json.loads((directory / "state.json").read_text())
    saved = load_file(str(directory / "params.safetensors"))
    if set(saved) != set(params):
        raise NocloneError(f"{directory}: checkpoint does not match this run's trainable parameters")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name].to(p.device, p.dtype))
    # weights_only: optimizer state is tensors and plain containers; never unpickle arbitrary objects
    optimizer.load_state_dict(torch.load(directory / "optimizer.pt", weights_only=True, map_location="cpu"))
    if stateful is not None:
        if not (directory / "extra_state.pt").is_file():
            raise NocloneError(f"{directory}: checkpoint lacks extra_state.pt (written by another version); delete it")
        stateful.load_state_dict(torch.load(directory / "extra_state.pt", weights_only=True, map_location="cpu"))
    return int(state["step"]), list(state["history"])


def run_training(
    named_params: Iterable[tuple[str, torch.nn.Parameter]],
    optimizer: torch.optim.Optimizer,
    step_fn: Callable[[int], dict[str, torch.Tensor]],
    config: LoopConfig,
    after_step: Callable[[int], None] | None = None,
    stateful=None,
) -> list[dict]:
    """Run `config.steps` optimizer steps of `step_fn(step) -> {"loss": tensor, ...}`; resume from a checkpoint.

    `step_fn` must draw all randomness from the step index (see `step_generator`) so that a resumed run
    equals an uninterrupted one. With `config.manual_backward` the step function sets the gradients of the
    parameters itself (they are cleared before each call) and the returned "loss" is only checked and recorded.
    The trainable parameters are cast to fp32 first (master weights, so checkpoints and optimizer state are fp32
    too) and `step_fn` runs under autocast in `config.autocast` (see noclone.training.precision).
    `stateful` (an object with `state_dict` / `load_state_dict`, e.g. a persistent simulated attacker) is saved
    and restored with each checkpoint. Returns the per-step history of float losses.
    """
    params = _trainable(named_params)
    upcast_trainable(params.values())
    device = next(iter(params.values())).device
    start, history = 0, []
    ckpt = config.checkpoint_dir
    if ckpt is not None and (ckpt / "state.json").is_file():
        start, history = load_checkpoint(ckpt, params, optimizer, stateful)
        log.info("resuming %s from step %d", config.description, start)
    bar = tqdm(total=config.steps, initial=start, desc=config.description, disable=not config.progress, leave=False)
    for step in range(start, config.steps):
        optimizer.zero_grad(set_to_none=True)
        with autocast(config.autocast, device):
            losses = step_fn(step)
        loss = losses["loss"]
        if not torch.isfinite(loss):
            raise NocloneError(f"{config.description}: loss became {loss.item()} at step {step}; lower the learning rate")
        if not config.manual_backward:
            loss.backward()
        if config.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(list(params.values()), config.max_grad_norm)
        optimizer.step()
        if after_step is not None:
            after_step(step)
        record = {k: float(v.detach()) for k, v in losses.items()}
        history.append(record)
        bar.set_postfix({k: f"{v:.4f}" for k, v in record.items()}, refresh=False)
        bar.update(1)
        done = step + 1
        out_of_time = config.deadline is not None and time.time() >= config.deadline and done < config.steps
        if ckpt is not None and (done % config.checkpoint_every == 0 or done == config.steps or out_of_time):
            save_checkpoint(ckpt, done, params, optimizer, history, stateful=stateful)
        if out_of_time:
            log.info("%s: time budget reached at step %d of %d (rerun to resume)", config.description, done,
                     config.steps)
            break
    bar.close()
    return history


def smoothed(history: list[dict], key: str = "loss", window: int = 20) -> tuple[float, float]:
    """Mean of `key` over the first and the last `window` steps (to show a loss went down)."""
    values = [h[key] for h in history if key in h and math.isfinite(h[key])]
    if not values:
        raise NocloneError(f"no {key!r} values in the history")
    w = max(1, min(window, len(values) // 2 or 1))
    return sum(values[:w]) / w, sum(values[-w:]) / w
