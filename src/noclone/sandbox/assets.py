"""Where the package's shipped sandbox weights live, and how to get a CLIP tokenizer without a download."""

from __future__ import annotations

import os
from pathlib import Path

from noclone.errors import NocloneError

WEIGHTS = Path(__file__).parent / "weights"


# Names of the shipped models. 'sandbox' is the default world; 'sandbox-v1' pins v1, so scripts and published
# figures keep their model when the default changes. 'sandbox-v2-64' is a candidate world (v2's captions, rare
# tokens and denoiser at 64 px; docs/fidelity.md); 'sandbox-v2-64-zsnr' is the same world with v-prediction at zero
# terminal SNR. Neither is the default until its fidelity card passes more than v1's.
SHIPPED_MODELS = {"sandbox": "model", "sandbox-v1": "model", "sandbox-v2-64": "model-v2-64",
                  "sandbox-v2-64-zsnr": "model-v2-64-zsnr"}


def model_dir(name: str = "sandbox") -> Path:
    """A shipped sandbox Stable Diffusion pipeline by name (diffusers layout; UNet and VAE fp16, text encoder fp32)."""
    if name not in SHIPPED_MODELS:
        raise NocloneError(f"unknown shipped model {name!r}; choose from {', '.join(SHIPPED_MODELS)}")
    path = WEIGHTS / SHIPPED_MODELS[name]
    if not (path / "model_index.json").is_file():
        raise NocloneError(f"{path}: the shipped sandbox model is missing from this installation")
    return path


def is_shipped(model) -> bool:
    """Whether a --model value names a shipped model ('sandbox', 'sandbox-v1') rather than a path."""
    return str(model) in SHIPPED_MODELS


def model_path(model) -> Path:
    """The directory a --model value stands for: a shipped model's, or the path itself."""
    return model_dir(str(model)) if is_shipped(model) else Path(model)


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
