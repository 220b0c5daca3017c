"""Command-line pieces every command group shares: the model arguments, loading that model, refusing a used --out.

The top-level `noclone.cli` and the command groups' own modules (protect-model, protect-images, rid, bench,
sandbox fidelity) import these from here, so no command module has to import the top-level command line.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from noclone.errors import NocloneError


def model_arg(value: str) -> str:
    return value


def add_model_args(p: argparse.ArgumentParser) -> None:
    """--model, --config, --allow-pickle, --device, --dtype."""
    p.add_argument("--model", default="sandbox", type=model_arg,
                   help="diffusers directory, .safetensors file, or 'sandbox' for the embedded model (default; "
                        "'sandbox-v1' pins v1; 'sandbox-v2-64' and 'sandbox-v2-64-zsnr' are candidate v2 worlds)")
    p.add_argument("--config", help="local diffusers directory describing an original-layout single-file checkpoint")
    p.add_argument("--allow-pickle", action="store_true", help="allow loading pickle checkpoints (.ckpt/.bin/.pt)")
    p.add_argument("--device", default="auto", help="auto (cuda, mps, cpu), cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default="auto", help="auto (bf16/fp16 on GPU, fp32 on CPU), fp32, fp16, bf16")


def load_model(args: argparse.Namespace, gradient_checkpointing: bool = False):
    """The pipeline named by the model arguments ('sandbox': the shipped model)."""
    from noclone.models.pipeline import load_pipeline
    from noclone.sandbox.assets import model_path

    path = model_path(args.model)
    return load_pipeline(path, device=args.device, dtype=args.dtype, allow_pickle=args.allow_pickle,
                         config=args.config, gradient_checkpointing=gradient_checkpointing)


def refuse_existing(out: str | Path, overwrite: bool) -> None:
    """One clear error for an --out that is a file, or a non-empty folder without --overwrite."""
    out = Path(out)
    if out.is_file():
        raise NocloneError(f"{out}: exists and is a file, expected an output directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise NocloneError(f"{out}/: output exists and is not empty (pass --overwrite to replace it)")
