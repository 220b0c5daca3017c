"""Image-level protection (noclone.cloak) and the attacker's photo transforms (noclone.attacks.purify)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from noclone.attacks.purify import apply_transform, parse_transform
from noclone.cli import main
from noclone.cloak import get_cloak, parse_budget, protect_folder
from noclone.cloak.rid import (
    RegressionTargets, RIDCloak, RIDConfig, RIDGenerator, RIDTrainConfig, rid_objective, sandbox_training_images,
    train_rid,
)
from noclone.cloak.rid_nets import paper_dit_parameters
from noclone.data.images import file_sha256, images_to_tensor
from noclone.errors import NocloneError
from noclone.sandbox.render import render
from noclone.sandbox.splits import held_out

torch.set_num_threads(1)

# a few steps of each method: enough to move every pixel, small enough for a CPU test
QUICK = {
    "advdm": dict(steps=3),
    "photoguard": dict(steps=3),
    "fsmg": dict(steps=3, surrogate_steps=2),
    "aspl": dict(steps=2, pgd_steps=2, surrogate_steps=1),
}


def _photos(n: int = 3, size: int = 32) -> list[Image.Image]:
    return [render("person", held_out(7), i, size=size) for i in range(n)]


def _odd() -> Image.Image:
    return render("person", held_out(7), 9, size=64).resize((53, 37), Image.Resampling.BICUBIC)


def _linf(a: Image.Image, b: Image.Image) -> int:
    return int(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max())


def _random_generator(resolution: int = 32, **config) -> RIDGenerator:
    """An untrained generator whose output layer is not zero (so it perturbs)."""
    torch.manual_seed(0)
    generator = RIDGenerator(RIDConfig(resolution=resolution, **config))
    head = generator.net.head[2] if config.get("arch", "conv") == "conv" else generator.net.head
    with torch.no_grad():
        head.weight.normal_(0, 0.05)
    return generator.eval()


def _fails(capsys, argv, needle):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("noclone: error:"), err
    assert needle in err[0], err[0]


# ------------------------------------------------------------------------------------------------ budgets


def test_budget_parsing_and_units():
    assert parse_budget("8/255") == pytest.approx(8 / 255)
    assert parse_budget("0.03") == 0.03 and parse_budget(0.05) == 0.05
    for bad in ("2", "-1", "abc", "0", "1/0", "nan", "0.001"):
        with pytest.raises(NocloneError):
            parse_budget(bad)
    config = get_cloak("rid", generator=_random_generator()).config
    assert config.budget == pytest.approx(8 / 255) and config.eps == pytest.approx(16 / 255)  # [-1, 1] units


# -------------------------------------------------------------------------------------- optimization methods


@pytest.mark.parametrize("method", list(QUICK))
def test_method_stays_in_budget_keeps_sizes_and_is_deterministic(method, tiny_pipe):
    photos = _photos(2) + [_odd()]
    before = [np.asarray(p).copy() for p in photos]
    out = get_cloak(method, tiny_pipe, **QUICK[method]).protect(photos)
    assert [o.size for o in out] == [p.size for p in photos] and all(o.mode == "RGB" for o in out)
    assert all(_linf(o, p) <= 8 for o, p in zip(out, photos))
    assert all(_linf(o, p) > 0 for o, p in zip(out, photos))
    assert all(np.array_equal(np.asarray(p), b) for p, b in zip(photos, before))  # inputs untouched
    again = get_cloak(method, tiny_pipe, **QUICK[method]).protect(photos)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(out, again))
    # the pipeline the caller passed is not changed (surrogates are copies)
    assert not any(p.grad is not None for p in tiny_pipe.unet.parameters())


@pytest.mark.parametrize("method,settings", [
    ("advdm", dict(steps=10)),
    ("photoguard", dict(steps=10)),
    ("fsmg", dict(steps=10, surrogate_steps=5)),
    ("aspl", dict(steps=3, pgd_steps=3, surrogate_steps=2)),
])
def test_method_beats_clean_and_random_noise_on_its_own_loss(method, settings, tiny_pipe):
    x = images_to_tensor(_photos(4), 32)
    cloak = get_cloak(method, tiny_pipe, budget="16/255", step_size="2/255", **settings)
    adv = cloak.perturb(x)
    assert adv.shape == x.shape and float((adv - x).abs().max()) <= cloak.config.eps + 1e-6
    signs = torch.randint(0, 2, x.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    noisy = (x + signs * cloak.config.eps).clamp(-1, 1)
    clean, rand, cloaked = (cloak.score(v, samples=8) for v in (x, noisy, adv))  # same probe noise for all three
    if cloak.maximize:
        assert cloaked > max(clean, rand), (clean, rand, cloaked)
    else:
        assert cloaked < min(clean, rand), (clean, rand, cloaked)


def test_tensor_api_keeps_odd_shapes(tiny_pipe):
    x = torch.rand(2, 3, 37, 53) * 2 - 1
    adv = get_cloak("advdm", tiny_pipe, steps=2)(x)
    assert adv.shape == x.shape and float((adv - x).abs().max()) <= 16 / 255 + 1e-6 and not torch.equal(adv, x)
    with pytest.raises(NocloneError):
        get_cloak("advdm", tiny_pipe)(torch.zeros(3, 32, 32))
    with pytest.raises(NocloneError):
        get_cloak("aspl")  # no model
    with pytest.raises(NocloneError):
        get_cloak("glaze", tiny_pipe)
    with pytest.raises(NocloneError):
        get_cloak("advdm", tiny_pipe, nonsense=1)
    assert get_cloak("aspl", tiny_pipe, preset="paper").config.budget == 0.025  # eps 0.05 in [-1, 1] space


# ------------------------------------------------------------------------------------------------------ RID


def test_rid_any_size_within_budget_batched():
    cloak = RIDCloak(generator=_random_generator())
    photos = _photos(2) + [_odd(), _photos(1, 64)[0].resize((640, 480))]
    out = cloak.protect(photos)
    assert [o.size for o in out] == [(32, 32), (32, 32), (53, 37), (640, 480)]
    assert all(0 < _linf(o, p) <= 8 for o, p in zip(out, photos))
    again = RIDCloak(generator=_random_generator(), budget="4/255").protect(photos)
    assert all(_linf(o, p) <= 4 for o, p in zip(again, photos))
    with pytest.raises(NocloneError, match="forward pass"):
        RIDCloak(generator=_random_generator(), steps=10)
    dit = RIDCloak(generator=_random_generator(arch="dit", net=dict(patch=4, hidden=32, depth=1, heads=2)))
    assert all(o.size == p.size and 0 < _linf(o, p) <= 8 for o, p in zip(dit.protect(photos), photos))


def test_rid_dit_trains(tiny_pipe):
    images = sandbox_training_images(1, photos=2, size=32)
    generator = RIDGenerator(RIDConfig(arch="dit", resolution=32, net=dict(patch=4, hidden=32, depth=1, heads=2)))
    history = train_rid(generator, [tiny_pipe, tiny_pipe], images, RIDTrainConfig(steps=2, batch_size=2, progress=False))
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    assert any(p.abs().sum() > 0 for p in generator.net.head.parameters())  # moved off its zero init


@pytest.mark.parametrize("arch,net", [("conv", dict(channels=16)), ("dit", dict(patch=4, hidden=32, depth=1, heads=2))])
def test_rid_save_load_round_trip(arch, net, tmp_path):
    generator = _random_generator(arch=arch, net=net)
    generator.save_pretrained(tmp_path / "g")
    assert (tmp_path / "g" / "generator.safetensors").stat().st_size < 5_000_000
    loaded = RIDGenerator.from_pretrained(tmp_path / "g")
    assert loaded.config.arch == arch and loaded.config.net.items() >= net.items() and loaded.config.budget == generator.config.budget
    x = torch.rand(2, 3, 37, 53) * 2 - 1  # any size, both architectures
    with torch.no_grad():
        a, b = generator(x), loaded(x)
        assert a.shape == x.shape and torch.allclose(a, b, atol=1e-3 * generator.eta)  # fp16 weights
        assert torch.equal(b, RIDGenerator.from_pretrained(tmp_path / "g")(x))
    with pytest.raises(NocloneError):
        RIDGenerator.from_pretrained(tmp_path / "missing")
    assert 2.0e8 < paper_dit_parameters() < 2.5e8  # the paper's DiT shape, adaLN vectors instead of MLP(0)


def test_rid_training_raises_the_denoising_error():
    # Adv-SDS drops the UNet Jacobian, which is only right for a trained denoiser: use the shipped sandbox model
    # (a random tiny UNet's prediction barely depends on its input, so no first-order method can move it).
    from noclone.cloak.base import resolve_model

    pipe = resolve_model("sandbox")
    images = sandbox_training_images(4, photos=2, size=64)
    generator = RIDGenerator(RIDConfig(resolution=64, budget=16 / 255, net=dict(channels=16)))
    before = rid_objective(generator, [pipe], images)
    history = train_rid(generator, [pipe], images, RIDTrainConfig(steps=12, batch_size=4, lr=2e-3, progress=False))
    after = rid_objective(generator, [pipe], images)
    # objective = -denoising error of the frozen model on x + delta(x), with the same probe noise before and after
    assert after < before * 1.05, (before, after)
    assert set(history[0]) == {"loss", "sds", "mse"}


def test_rid_regression_loss_goes_down(tiny_pipe):
    images = sandbox_training_images(2, photos=2, size=32)
    generator = RIDGenerator(RIDConfig(resolution=32))
    targets = RegressionTargets(images, -0.5 * generator.eta * images)  # a learnable image-wise perturbation
    history = train_rid(generator, [tiny_pipe], images, RIDTrainConfig(steps=15, batch_size=2, lr=3e-3, reg_weight=10,
                                                                       reg_batch_size=4, progress=False), targets)
    assert history[-1]["reg"] < 0.8 * history[0]["reg"], [h["reg"] for h in history]


def test_rid_resume_after_interrupt_equals_uninterrupted(tiny_pipe, tmp_path):
    images = sandbox_training_images(2, photos=2, size=32)
    config = RIDTrainConfig(steps=6, batch_size=2, checkpoint_every=2, progress=False)

    def new_generator():
        torch.manual_seed(0)
        return RIDGenerator(RIDConfig(resolution=32))

    full = new_generator()
    train_rid(full, [tiny_pipe], images, config)

    def interrupt(step):
        if step == 4:
            raise KeyboardInterrupt

    resumed = new_generator()
    with pytest.raises(KeyboardInterrupt):
        train_rid(resumed, [tiny_pipe], images, config, checkpoint_dir=tmp_path / "ckpt", after_step=interrupt)
    assert json.loads((tmp_path / "ckpt" / "state.json").read_text())["step"] == 4
    fresh = RIDGenerator(RIDConfig(resolution=32))  # its initial weights are replaced by the checkpoint's
    history = train_rid(fresh, [tiny_pipe], images, config, checkpoint_dir=tmp_path / "ckpt")
    assert len(history) == 6
    for (name, a), b in zip(full.state_dict().items(), fresh.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name


# ------------------------------------------------------------------------------------------ folders and CLI


def test_protect_folder_strips_metadata_and_keeps_inputs(tmp_path, tiny_model_dir):
    photos = tmp_path / "photos"
    photos.mkdir()
    exif = Image.Exif()
    exif[0x010E] = "private description"
    _photos(1, 64)[0].resize((53, 37)).save(photos / "a.jpg", exif=exif.tobytes(), quality=95)
    _photos(2)[1].save(photos / "b.png")
    hashes = {p.name: file_sha256(p) for p in photos.iterdir()}
    generator = _random_generator()
    out = protect_folder("rid", photos, tmp_path / "out", generator=generator)
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png", "cloak.json"]
    assert {p.name: file_sha256(p) for p in photos.iterdir()} == hashes
    with Image.open(out / "a.png") as im:
        assert im.size == (53, 37) and "exif" not in im.info and len(im.getexif()) == 0
    manifest = json.loads((out / "cloak.json").read_text())
    assert manifest["method"] == "rid" and [i["sha256"] for i in manifest["inputs"]] == [hashes["a.jpg"], hashes["b.png"]]
    assert all(0 < o["linf_255"] <= 8 for o in manifest["outputs"]) and manifest["timings"]["per_image_s"] >= 0
    assert len((out / "cloak.json").read_text()) < 20_000  # hashes and settings, never image data
    with pytest.raises(NocloneError, match="not empty"):
        protect_folder("rid", photos, out, generator=generator)
    with pytest.raises(NocloneError, match="input folder"):
        protect_folder("rid", photos, photos, generator=generator, overwrite=True)
    adv = protect_folder("photoguard", photos, tmp_path / "pg", model=tiny_model_dir, steps=2)
    assert json.loads((adv / "cloak.json").read_text())["model_fingerprint"]


def test_cli_protect_images_and_rid_train(tiny_model_dir, subject_dir, tmp_path):
    gen = tmp_path / "gen"
    assert main(["-q", "rid", "train", "--models", str(tiny_model_dir), "--sandbox-identities", "2",
                 "--photos-per-identity", "2", "--steps", "2", "--batch-size", "2", "--out", str(gen)]) == 0
    config = json.loads((gen / "config.json").read_text())
    assert config["resolution"] == 32 and config["info"]["steps"] == 2
    assert not list(tmp_path.glob(".*checkpoint*"))
    out = tmp_path / "rid"
    assert main(["-q", "protect-images", "--method", "rid", "--generator", str(gen), "--images", str(subject_dir),
                 "--out", str(out)]) == 0
    assert len(list(out.glob("*.png"))) == 4
    out = tmp_path / "advdm"
    assert main(["-q", "protect-images", "--method", "advdm", "--model", str(tiny_model_dir), "--steps", "1",
                 "--budget", "4/255", "--images", str(subject_dir), "--out", str(out)]) == 0
    manifest = json.loads((out / "cloak.json").read_text())
    assert manifest["settings"]["steps"] == 1 and manifest["settings"]["budget_255"] == pytest.approx(4)


def test_cli_bad_inputs_exit_2_with_one_line(tiny_model_dir, subject_dir, tmp_path, capsys):
    o = ["--out", str(tmp_path / "o")]
    ok = ["protect-images", "--images", str(subject_dir)]
    _fails(capsys, ok + ["--method", "aspl"] + o, "needs --model")
    for budget in ("2", "-1", "abc"):
        _fails(capsys, ok + ["--method", "advdm", "--model", str(tiny_model_dir), "--budget", budget] + o, "--budget")
    _fails(capsys, ok + ["--method", "advdm", "--model", str(tiny_model_dir), "--step-size", "x"] + o, "--step-size")
    _fails(capsys, ok + ["--method", "glaze"] + o, "unknown --method")
    _fails(capsys, ok + o, "--method is required")
    _fails(capsys, ["protect-images", "--method", "rid", "--images", str(tmp_path / "nope")] + o, "nope")
    _fails(capsys, ok + ["--method", "rid", "--generator", str(tmp_path / "nogen")] + o, "nogen")
    _fails(capsys, ok + ["--method", "advdm", "--model", str(tmp_path / "nomodel")] + o, "no such model")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    _fails(capsys, ok + ["--method", "advdm", "--model", str(tiny_model_dir), "--out", str(taken)], "--overwrite")
    assert (taken / "keep.txt").read_text() == "mine"
    _fails(capsys, ["rid", "train", "--models", str(tiny_model_dir)] + o, "--sandbox-identities")
    _fails(capsys, ["rid", "train", "--models", str(tiny_model_dir), "--sandbox-identities", "1", "--arch", "vit"] + o, "--arch")
    _fails(capsys, ["rid", "train", "--models", str(tiny_model_dir), "--sandbox-identities", "1", "--budget", "2"] + o, "--budget")
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".*tmp*"))


# ------------------------------------------------------------------------------------------ purification


@pytest.mark.parametrize("spec", ["jpeg", "jpeg:50", "resize:0.5", "blur:1.5", "flip", "noise:0.05"])
def test_transforms_keep_sizes_and_are_deterministic(spec):
    photos = [_photos(1)[0], _odd()]
    name, settings = parse_transform(spec)
    out = apply_transform(name, photos, seed=3, **settings)
    assert [o.size for o in out] == [p.size for p in photos] and all(o.mode == "RGB" for o in out)
    assert all(not np.array_equal(np.asarray(o), np.asarray(p)) for o, p in zip(out, photos))
    again = apply_transform(name, photos, seed=3, **settings)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(out, again))
    if name == "flip":
        back = apply_transform("flip", out)
        assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(back, photos))


def test_parse_transform():
    assert parse_transform("jpeg:75") == ("jpeg", {"quality": 75})
    assert parse_transform("purify:strength=0.2,steps=20") == ("purify", {"strength": 0.2, "steps": 20})
    assert parse_transform("resize") == ("resize", {})
    for bad in ("sharpen", "jpeg:abc", "jpeg:0", "resize:2", "blur:x=1", "flip:3", "purify:0",
                "purify:strength=0.1,steps=2"):
        with pytest.raises(NocloneError):
            parse_transform(bad)
    with pytest.raises(NocloneError):
        apply_transform("purify", _photos(1))  # no model


def test_diffusion_purification(tiny_pipe):
    photos = [_photos(1)[0], _odd()]
    out = apply_transform("purify", photos, model=tiny_pipe, seed=1, strength=0.2, steps=10)
    assert [o.size for o in out] == [p.size for p in photos]
    assert all(not np.array_equal(np.asarray(o), np.asarray(p)) for o, p in zip(out, photos))
    again = apply_transform("purify", photos, model=tiny_pipe, seed=1, strength=0.2, steps=10)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(out, again))
