"""Mixed precision as published SD training scripts do it: what trains is fp32, the frozen rest stays half.

The policy, for every trained weight in noclone (attacks, defences, cloak surrogates, the RID generator):

- `upcast_trainable`: each parameter with requires_grad=True is cast to fp32 in place ("master weights"; the same
  Parameter objects, so optimizers, name maps and checkpoints stay valid); AdamW state then is fp32 too. Frozen
  weights keep the pipeline's dtype. Without this, at lr 5e-6 most AdamW updates are below bf16 resolution
  (a weight of 0.05 moves in steps of 2e-4) and training silently does nothing.
- `autocast`: forward passes run under `torch.autocast` in the pipeline's half dtype (a no-op for fp32), so fp32
  trained layers and half frozen ones meet in one graph. Where autocast does not cover an op on CPU (layer_norm with
  fp32 input and half weights), the module holding trained weights is kept fp32 whole (textual inversion's encoder).
- `settle`: when a method ends, a pipeline whose UNet, VAE and text encoder now mix fp32 and half weights is made
  fp32 throughout, so it generates and saves as one dtype without rounding away what was learned (LoRA adapter
  weights do not count: peft casts around them and they are saved on their own, in fp32, as diffusers' scripts do).
  Code that trains weights it does not own for good (the decoder guard, given a VAE only; the simulated attacker,
  whose steps are undone) casts them back to their own dtype with `cast_parameters` when it is done.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext

import torch

HALF_DTYPES = (torch.float16, torch.bfloat16)


def _parameters(items: Iterable) -> list[torch.nn.Parameter]:
    """Flatten modules, parameters and iterables of them into a list of distinct parameters."""
    seen: dict[int, torch.nn.Parameter] = {}
    for item in items:
        if isinstance(item, torch.nn.Module):
            found = item.parameters()
        elif isinstance(item, torch.Tensor):
            found = [item]
        else:
            found = _parameters(item)
        for p in found:
            seen.setdefault(id(p), p)
    return list(seen.values())


def compute_dtype(*modules: torch.nn.Module) -> torch.dtype:
    """The half dtype (bf16/fp16) of the first half weight among `modules`, else fp32: what forwards autocast to."""
    for module in modules:
        for p in module.parameters():
            if p.dtype in HALF_DTYPES:
                return p.dtype
    return torch.float32


def upcast_trainable(*items) -> list[torch.nn.Parameter]:
    """Cast every parameter with requires_grad=True among `items` (modules, parameters, iterables) to fp32 in place;
    frozen ones keep their dtype. Returns the trainable parameters."""
    params = [p for p in _parameters(items) if p.requires_grad]
    cast_parameters([p for p in params if p.is_floating_point() and p.dtype != torch.float32], torch.float32)
    return params


def cast_parameters(params: Iterable[torch.nn.Parameter], dtype: torch.dtype) -> None:
    """Cast `params` to `dtype` in place (same Parameter objects; stale gradients are dropped)."""
    for p in params:
        if p.dtype != dtype:
            p.data = p.data.to(dtype)
            p.grad = None


def autocast(dtype: torch.dtype | None, device: torch.device | str = "cpu") -> AbstractContextManager:
    """`torch.autocast(device type, dtype)` when `dtype` is half; a no-op context for fp32 or None."""
    if dtype not in HALF_DTYPES:
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def _is_adapter(name: str) -> bool:
    return "lora_" in name


def settle(*modules: torch.nn.Module) -> torch.dtype:
    """After training: if the modules' weights (LoRA adapters aside) mix dtypes, cast every module to fp32.
    Returns the dtype they now share."""
    dtypes = {p.dtype for m in modules for n, p in m.named_parameters() if p.is_floating_point() and not _is_adapter(n)}
    if len(dtypes) == 1:
        return dtypes.pop()
    for module in modules:
        torch.nn.Module.to(module, torch.float32)  # torch's: diffusers' override warns on casting loaded models
    return torch.float32


def settle_pipeline(pipe) -> torch.dtype:
    """`settle` over a pipeline's UNet, VAE and text encoder."""
    return settle(*(m for m in (pipe.unet, pipe.vae, pipe.text_encoder) if m is not None))
