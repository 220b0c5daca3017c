"""Where the package's shipped sandbox weights live, and how to get a CLIP tokenizer without a download."""

from __future__ import annotations

import os
from pathlib import Path

from noclone.errors import NocloneError

WEIGHTS = Path(__file__).parent / "weights"


def model_dir() -> Path:
    """The shipped sandbox Stable Diffusion pipeline (diffusers layout; UNet and VAE fp16, text encoder fp32)."""
    path = WEIGHTS / "model"
    if not (path / "model_index.json").is_file():
        raise NocloneError(f"{path}: the shipped sandbox model is missing from this installation")
    return path


def evaluator_dir() -> Path:
    return WEIGHTS / "evaluator"


def cache_dir() -> Path:
    root = Path(os.environ.get("NOCLONE_CACHE", Path.home() / ".cache" / "noclone"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def tokenizer_dir() -> Path:
    """The shipped model's CLIP tokenizer, or one built from the CLIP BPE file of an installed package."""
    shipped = WEIGHTS / "model" / "tokenizer"
    if (shipped / "tokenizer.json").is_file() or (shipped / "vocab.json").is_file():
        return shipped
    built = cache_dir() / "clip-tokenizer"
    if not (built / "vocab.json").is_file():
        from noclone.models.tokenizer import write_clip_tokenizer_files

        write_clip_tokenizer_files(built)
    return built
