"""One training loop for attacks and defences: seeded steps, progress bar, checkpoint every K steps, resume, and
data parallelism over processes under `accelerate launch` (noclone.training.distributed)."""

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
from noclone.training.distributed import current
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
                    history: list[dict], extra: dict | None = None, stateful=None,
                    stateful_state: dict | None = None) -> None:
    """`stateful_state`: `stateful.state_dict()` already taken (under several processes every process takes it,
    so that a state_dict may gather from the others; only the main process writes)."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: p.detach().to("cpu").contiguous() for name, p in params.items()}
    atomic_write_bytes(directory / "params.safetensors", lambda f: f.write(_safetensors_bytes(tensors)))
    atomic_write_bytes(directory / "optimizer.pt", lambda f: torch.save(optimizer.state_dict(), f))
    if stateful is not None or stateful_state is not None:
        state = stateful_state if stateful_state is not None else stateful.state_dict()
        atomic_write_bytes(directory / "extra_state.pt", lambda f: torch.save(state, f))
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

    Under a launcher (`accelerate launch`, several processes; noclone.training.distributed) the gradients are
    averaged over the processes after each backward, so `step_fn` should compute only this process's shard of the
    step's global batch (`current().shard`); one that does not still trains correctly, each process repeating the
    same work. The history holds the mean losses over processes; only the main process writes checkpoints and shows
    the bar; every process reads a checkpoint to resume, and all start from the main process's weights.
    """
    params = _trainable(named_params)
    upcast_trainable(params.values())
    device = next(iter(params.values())).device
    dist = current()
    start, history = 0, []
    ckpt = config.checkpoint_dir
    if ckpt is not None and (ckpt / "state.json").is_file():
        start, history = load_checkpoint(ckpt, params, optimizer, stateful)
        log.info("resuming %s from step %d", config.description, start)
    if dist.enabled:
        dist.broadcast_(params.values())  # one set of starting weights, however each process initialised its own
    bar = tqdm(total=config.steps, initial=start, desc=config.description,
               disable=not config.progress or not dist.is_main, leave=False)
    for step in range(start, config.steps):
        optimizer.zero_grad(set_to_none=True)
        with autocast(config.autocast, device):
            losses = step_fn(step)
        loss = losses["loss"]
        out_of_time = None
        if dist.enabled:  # every process takes the same decisions: the check follows the losses' all-reduce
            if not config.manual_backward:
                loss.backward()
            record, out_of_time = _synchronise(dist, losses, params, config, step)
            if not math.isfinite(record["loss"]):
                raise NocloneError(f"{config.description}: loss became {record['loss']} at step {step} (mean over "
                                   f"{dist.world_size} processes); lower the learning rate")
            dist.all_reduce_mean_(p.grad for p in params.values() if p.grad is not None)
        else:
            if not torch.isfinite(loss):
                raise NocloneError(f"{config.description}: loss became {loss.item()} at step {step}; lower the "
                                   "learning rate")
            if not config.manual_backward:
                loss.backward()
        if config.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(list(params.values()), config.max_grad_norm)
        optimizer.step()
        if after_step is not None:
            after_step(step)
        if not dist.enabled:
            record = {k: float(v.detach()) for k, v in losses.items()}
        history.append(record)
        bar.set_postfix({k: f"{v:.4f}" for k, v in record.items()}, refresh=False)
        bar.update(1)
        done = step + 1
        if out_of_time is None:
            out_of_time = config.deadline is not None and time.time() >= config.deadline and done < config.steps
        if ckpt is not None and (done % config.checkpoint_every == 0 or done == config.steps or out_of_time):
            if not dist.enabled:
                save_checkpoint(ckpt, done, params, optimizer, history, stateful=stateful)
            else:  # `stateful.state_dict()` on every process (it may gather its parts from the others); one writes
                state = stateful.state_dict() if stateful is not None else None
                if dist.is_main:
                    save_checkpoint(ckpt, done, params, optimizer, history, stateful_state=state)
        if out_of_time:
            log.info("%s: time budget reached at step %d of %d (rerun to resume)", config.description, done,
                     config.steps)
            break
    bar.close()
    dist.barrier()  # the last checkpoint is on disk before any process goes on
    return history


def _synchronise(dist, losses: dict[str, torch.Tensor], params: dict[str, torch.nn.Parameter], config: LoopConfig,
                 step: int) -> tuple[dict[str, float], bool]:
    """One small all-reduce per step, after the backward: the losses' mean over processes, whether any process is
    past the deadline, and a check that the processes agree on which parameters got gradients (the gradients'
    all-reduce would otherwise mix mismatched buckets or hang)."""
    names = list(losses)
    with_grad = sum(p.grad is not None for p in params.values())
    out_of_time = config.deadline is not None and time.time() >= config.deadline and step + 1 < config.steps
    local = torch.stack([losses[k].detach().float().reshape(()).cpu() for k in names]
                        + [torch.tensor(float(with_grad)), torch.tensor(float(with_grad) ** 2),
                           torch.tensor(float(out_of_time))])
    total = dist.all_reduce_sum(local).cpu()
    n = dist.world_size
    counted, squares = float(total[len(names)]), float(total[len(names) + 1])
    if abs(counted**2 - n * squares) > 0.5:
        raise NocloneError(f"{config.description}: the processes disagree on which weights train (step {step})")
    record = {k: float(total[i]) / n for i, k in enumerate(names)}
    return record, bool(total[len(names) + 2] > 0)


def smoothed(history: list[dict], key: str = "loss", window: int = 20) -> tuple[float, float]:
    """Mean of `key` over the first and the last `window` steps (to show a loss went down)."""
    values = [h[key] for h in history if key in h and math.isfinite(h[key])]
    if not values:
        raise NocloneError(f"no {key!r} values in the history")
    w = max(1, min(window, len(values) // 2 or 1))
    return sum(values[:w]) / w, sum(values[-w:]) / w
