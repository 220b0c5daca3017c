"""The attacker's model-based transforms in noclone.attacks.purify: GrIDPure and noisy upscaling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from noclone.attacks import purify as purify_module
from noclone.attacks.purify import DEFAULTS, MODEL_TRANSFORMS, apply_transform, parse_transform
from noclone.errors import NocloneError
from noclone.sandbox.render import render
from noclone.sandbox.splits import held_out

torch.set_num_threads(1)

FAST = dict(strength=0.2, steps=10)  # two denoising steps per img2img call


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    """The tiny 32 px pipeline (VAE factor 2, UNet /2: sides are multiples of 4), loaded once for this file."""
    from noclone.models.pipeline import load_pipeline

    return load_pipeline(tiny_model_dir, device="cpu")


def _photo(index: int, size: tuple[int, int], mode: str = "RGB") -> Image.Image:
    image = render("person", held_out(7), index, size=64).convert(mode)
    return image.resize(size, Image.Resampling.BICUBIC) if image.size != size else image


def _photos() -> list[Image.Image]:
    """Odd sizes (70x50 is resized to 44x32 for the model, 88x64 for a 2-grid) and a grayscale input."""
    return [_photo(0, (70, 50)), _photo(1, (32, 32)), _photo(2, (37, 53), "L")]


def _arrays(images) -> list[np.ndarray]:
    return [np.asarray(im.convert("RGB"), np.int16) for im in images]


def _same(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(_arrays(a), _arrays(b), strict=True))


# ------------------------------------------------------------------------------------------ settings


def test_parse_main_settings_and_keys():
    assert parse_transform("gridpure:0.2") == ("gridpure", {"strength": 0.2})
    assert parse_transform("upscale:0.1") == ("upscale", {"std": 0.1})
    assert parse_transform("gridpure:grid=3,iterations=2,steps=20") == (
        "gridpure", {"grid": 3, "iterations": 2, "steps": 20})
    assert parse_transform("upscale:factor=0.25,strength=0.3,prompt=a photo") == (
        "upscale", {"factor": 0.25, "strength": 0.3, "prompt": "a photo"})
    assert parse_transform("upscale:std=0") == ("upscale", {"std": 0.0})
    assert parse_transform("gridpure") == ("gridpure", {}) and parse_transform("upscale") == ("upscale", {})
    assert DEFAULTS["gridpure"] == {"strength": 0.1, "steps": 50, "grid": 2, "iterations": 1, "prompt": "",
                                    "guidance": 1.0}
    assert DEFAULTS["upscale"] == {"std": 0.05, "factor": 0.5, "strength": 0.1, "steps": 50, "prompt": "",
                                   "guidance": 1.0}
    assert {"gridpure", "upscale", "purify"} <= set(MODEL_TRANSFORMS)


@pytest.mark.parametrize("spec", [
    "gridpure:0", "gridpure:1.5", "gridpure:nan", "gridpure:strength=0.1,steps=5", "gridpure:steps=0",
    "gridpure:grid=0", "gridpure:grid=-1", "gridpure:grid=1.5", "gridpure:iterations=0", "gridpure:iterations=x",
    "gridpure:std=0.1", "gridpure:0.1,0.2",
    "upscale:-0.1", "upscale:2", "upscale:std=nan", "upscale:factor=0", "upscale:factor=1.5", "upscale:strength=0",
    "upscale:strength=1.5", "upscale:strength=0.1,steps=5", "upscale:grid=2", "upscale:factor=x",
])
def test_bad_settings_are_refused_in_one_line(spec):
    with pytest.raises(NocloneError) as error:
        parse_transform(spec)
    assert str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("name,settings", [
    ("gridpure", {"grid": 2.0}), ("gridpure", {"grid": True}), ("gridpure", {"iterations": 0}),
    ("gridpure", {"strength": float("nan")}), ("upscale", {"std": 1.5}), ("upscale", {"factor": 0.0}),
    ("upscale", {"grid": 2}), ("gridpure", {}), ("upscale", {}),  # the last two: no model
])
def test_apply_refuses_bad_settings_and_a_missing_model(name, settings):
    photo = _photo(0, (32, 32))
    before = np.asarray(photo).copy()
    with pytest.raises(NocloneError) as error:
        apply_transform(name, [photo], model=None, **settings)
    assert "\n" not in str(error.value)
    if not settings:
        assert name in str(error.value) and "model" in str(error.value)
    assert np.array_equal(np.asarray(photo), before)


# ------------------------------------------------------------------------------------------ the contract


@pytest.mark.parametrize("name,settings", [("gridpure", FAST), ("upscale", {**FAST, "std": 0.05, "factor": 0.5})])
def test_sizes_modes_inputs_and_seeds(pipe, name, settings):
    photos = _photos()
    before = [(p.mode, p.size, p.tobytes()) for p in photos]
    out = apply_transform(name, photos, model=pipe, seed=3, **settings)
    assert [o.size for o in out] == [p.size for p in photos] and all(o.mode == "RGB" for o in out)
    assert all(o is not p for o, p in zip(out, photos))
    assert [(p.mode, p.size, p.tobytes()) for p in photos] == before  # inputs untouched
    assert all(not np.array_equal(o, p) for o, p in zip(_arrays(out), _arrays(photos)))
    assert _same(out, apply_transform(name, photos, model=pipe, seed=3, **settings))
    other = apply_transform(name, photos, model=pipe, seed=4, **settings)
    assert all(not np.array_equal(a, b) for a, b in zip(_arrays(out), _arrays(other)))


# ------------------------------------------------------------------------------------------ gridpure


def test_gridpure_with_one_cell_is_purify(pipe):
    photos = _photos()
    plain = apply_transform("purify", photos, model=pipe, seed=5, **FAST)
    assert _same(apply_transform("gridpure", photos, model=pipe, seed=5, grid=1, **FAST), plain)
    # the comparison can tell them apart: a 2-grid, or a second round, is not plain purify
    assert not _same(apply_transform("gridpure", photos[:1], model=pipe, seed=5, grid=2, **FAST), plain[:1])
    twice = apply_transform("gridpure", photos[:1], model=pipe, seed=5, grid=1, iterations=2, **FAST)
    assert not _same(twice, plain[:1])


def _spy(monkeypatch, respond):
    """Replace the img2img call: record each patch's size and answer with respond(patch)."""
    calls = []

    def fake(img2img, work, generator, strength, steps, prompt, guidance):
        calls.append(work.size)
        return respond(work)

    monkeypatch.setattr(purify_module, "_denoise", fake)
    return calls


@pytest.mark.parametrize("grid,iterations", [(1, 1), (2, 1), (2, 2), (3, 1)])
def test_gridpure_patches_tile_the_image(pipe, monkeypatch, grid, iterations):
    # 70x50 -> model size 44x32; the grid x model-size image is cut into (2 grid - 1)^2 patches of 44x32
    calls = _spy(monkeypatch, lambda work: work.copy())
    photo = _photo(0, (44 * grid, 32 * grid))  # already at the working size: no resizing anywhere
    out = apply_transform("gridpure", [photo], model=pipe, grid=grid, iterations=iterations)
    assert calls == [(44, 32)] * ((2 * grid - 1) ** 2 * iterations)
    assert _same(out, [photo])  # identity patches, put back where they came from and averaged: the image itself

    calls.clear()
    _spy(monkeypatch, lambda work: Image.new("RGB", work.size, (200, 10, 90)))
    flat = np.asarray(apply_transform("gridpure", [_photo(0, (70, 50))], model=pipe, grid=grid)[0])
    assert (flat == np.array([200, 10, 90], np.uint8)).all()  # every pixel came from a purified patch


def test_gridpure_averages_overlaps(pipe, monkeypatch):
    # patch k (row-major) comes back flat at 20 k: each pixel is the mean over the patches that cover it
    calls = _spy(monkeypatch, lambda work: Image.new("RGB", work.size, (20 * len(calls) - 20,) * 3))
    out = np.asarray(apply_transform("gridpure", [_photo(0, (88, 64))], model=pipe, grid=2)[0], np.float64)[..., 0]
    expected_sum, expected_count = np.zeros((64, 88)), np.zeros((64, 88))
    for k in range(9):
        y, x = 16 * (k // 3), 22 * (k % 3)  # stride: half of a 44x32 patch
        expected_sum[y:y + 32, x:x + 44] += 20 * k
        expected_count[y:y + 32, x:x + 44] += 1
    assert len(calls) == 9 and np.array_equal(out, np.rint(expected_sum / expected_count))
    assert out[0, 0] == 0 and out[20, 30] == (0 + 20 + 60 + 80) / 4 and out[63, 87] == 160


def test_gridpure_purifies_every_region(pipe):
    photo = _photo(3, (64, 64))  # the tiny model's 2-grid working size: unpurified pixels would come back unchanged
    out = apply_transform("gridpure", [photo], model=pipe, seed=0, grid=2, **FAST)[0]
    diff = np.abs(np.asarray(out, np.int16) - np.asarray(photo, np.int16))
    blocks = diff.reshape(4, 16, 4, 16, 3).mean(axis=(1, 3, 4))  # 16 px blocks: each corner is in one patch only
    assert (blocks > 1.0).all(), blocks


# ------------------------------------------------------------------------------------------ upscale


def test_upscale_degrades_then_restores(pipe, monkeypatch):
    # at the model's sizes, so the diffusion step sees exactly the degraded image
    photos = [_photo(0, (32, 32)), _photo(1, (44, 32))]
    degraded = apply_transform("resize", apply_transform("noise", photos, seed=7, std=0.1), factor=0.5)
    assert not _same(degraded, photos)

    restored = apply_transform("upscale", photos, model=pipe, seed=7, std=0.1, factor=0.5, strength=0.1, steps=10)
    assert not _same(restored, degraded)  # even one denoising step changes the noisy, blurred image

    calls = _spy(monkeypatch, lambda work: work.copy())
    assert _same(apply_transform("upscale", photos, model=pipe, seed=7, std=0.1, factor=0.5), degraded)
    assert calls == [(32, 32), (44, 32)]
