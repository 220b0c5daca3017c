"""Shared fixtures: a tiny random SD-architecture pipeline on disk and a folder of subject photos."""

from __future__ import annotations

import os
import warnings

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
warnings.filterwarnings("ignore", message=".*torchvision.*")


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    os.environ["NOCLONE_CACHE"] = str(tmp_path_factory.mktemp("noclone-cache"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A randomly initialised SD1-shaped pipeline (32 px) saved as a diffusers directory."""
    from noclone.models.architectures import build_pipeline

    out = tmp_path_factory.mktemp("tiny") / "model"
    build_pipeline("tiny", seed=0).save_pretrained(str(out), safe_serialization=True)
    return out


@pytest.fixture
def tiny_pipe(tiny_model_dir):
    from noclone.models.pipeline import load_pipeline

    return load_pipeline(tiny_model_dir, device="cpu")


@pytest.fixture(scope="session")
def subject_dir(tmp_path_factory):
    """Four sandbox renders of one held-out identity at 32 px."""
    from noclone.sandbox.render import render
    from noclone.sandbox.splits import held_out

    out = tmp_path_factory.mktemp("subject")
    for photo in range(4):
        render("person", held_out(7), photo, size=32).save(out / f"photo_{photo}.png")
    return out
