"""PersGuard on the tiny 32 px pipeline (losses by hand, training, L_BR bookkeeping, resume, card, CLI) and the
backdoor checks on sandbox renders (each check separates its positives from its negatives)."""

import argparse
import copy
import json
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from noclone.defenses import Backdoor, PersGuard, PersGuardConfig, ProtectionSubject
from noclone.defenses.backdoor_checks import (
    PATTERN_THRESHOLD, add_pattern, backdoor_rate, pattern_present, pattern_scores, validate_detector_checks,
    validate_pattern_check,
)
from noclone.defenses.persguard import backdoor_loss, inpaint_from_border, trigger_prompt
from noclone.training.diffusion import distillation_loss
from noclone.errors import NocloneError
from noclone.training.data import LatentSet

torch.set_num_threads(1)


def _config(**kw):
    base = dict(steps=3, inner_steps=1, batch_size=1, num_class_images=2, num_target_images=2, class_image_steps=2,
                lr=1e-3, lr_per=1e-3, checkpoint_every=2, progress=False)
    base.update(kw)
    return PersGuardConfig(**base)


def _unet_state(pipe):
    return {k: v.detach().clone() for k, v in pipe.unet.state_dict().items()}


def _changed(before, after):
    return {k for k in before if not torch.equal(before[k], after[k])}


def _renders(tmp_path_factory, name, class_noun, identity, n=3, background=False):
    from noclone.sandbox.render import render, render_background
    from noclone.sandbox.splits import held_out

    out = tmp_path_factory.mktemp(name)
    draw = render_background if background else render
    for photo in range(n):
        draw(class_noun, held_out(identity), photo, size=32).save(out / f"{name}_{photo}.png")
    return out


@pytest.fixture(scope="session")
def dog_dir(tmp_path_factory):
    return _renders(tmp_path_factory, "dog", "dog", 3)


@pytest.fixture(scope="session")
def cat_dir(tmp_path_factory):
    return _renders(tmp_path_factory, "cat", "cat", 4)


@pytest.fixture(scope="session")
def background_dir(tmp_path_factory):
    """The backgrounds of the conftest subject's four photos (same sorted order)."""
    return _renders(tmp_path_factory, "bg", "person", 7, n=4, background=True)


@pytest.fixture
def person(subject_dir):
    return ProtectionSubject.from_folder(subject_dir, "person")


# ------------------------------------------------------------------------------------------------ the losses


class _Linear(torch.nn.Module):
    """eps(z, t, c) = w z + mean(c): a UNet stand-in whose losses are easy to write down."""

    def __init__(self, w: float):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(w))

    device = property(lambda self: self.w.device)
    dtype = property(lambda self: self.w.dtype)

    def forward(self, z, t, cond):
        return SimpleNamespace(sample=self.w * z + cond.mean(dim=(1, 2)).view(-1, 1, 1, 1))


def _noised_by_hand(scheduler, y, seed, batch):
    """The draws backdoor_loss makes from the generator: images, posterior noise (std 0 here), eps, t."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(y), (batch,), generator=g)
    torch.randn((batch, *y.shape[1:]), generator=g)
    x = y[idx]
    eps = torch.randn(x.shape, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    abar = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    return abar.sqrt() * x + (1 - abar).sqrt() * eps, eps


def test_losses_match_hand_computation():
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=1000)
    y = torch.randn(3, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    targets = LatentSet(y, torch.zeros_like(y), "backdoor target")
    cond = torch.full((1, 5, 6), 0.25)
    theta, f = _Linear(0.5), _Linear(2.0)

    # L_BB = E||eps_theta(z_t(y), t, c_trig) - eps||^2
    got = backdoor_loss(theta, scheduler, targets, cond, torch.Generator().manual_seed(3), 2)
    z, eps = _noised_by_hand(scheduler, y, 3, 2)
    assert got.item() == pytest.approx(((0.5 * z + 0.25 - eps) ** 2).mean().item(), rel=1e-5)

    # L_PP = E||eps_theta(z_t(x), t, c) - eps_f(z_t(x), t, c)||^2: here (0.5 - 2)^2 z^2, whatever the prompt
    g = torch.Generator().manual_seed(5)
    x = y[:2].clone()
    pp = distillation_loss(theta, f, scheduler, x, cond, g)
    g = torch.Generator().manual_seed(5)
    eps = torch.randn(x.shape, generator=g)
    t = torch.randint(0, 1000, (2,), generator=g)
    abar = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    z = abar.sqrt() * x + (1 - abar).sqrt() * eps
    assert pp.item() == pytest.approx(((1.5 * z) ** 2).mean().item(), rel=1e-5)
    pp.backward()
    assert theta.w.grad is not None and f.w.grad is None  # the teacher f is never trained
    assert theta.w.grad.item() == pytest.approx((2 * (-1.5) * z * z).mean().item(), rel=1e-4)  # d/dw (w - 2)^2 z^2


def test_trigger_prompts_white_and_gray_box(person):
    from noclone.training.diffusion import step_generator

    white = _config()
    assert {trigger_prompt(white, person, step_generator(0, s, "t")) for s in range(20)} == {"a photo of sks person"}
    gray = _config(tokens=("sks", "xyz"), templates=("a photo of {token} {class_noun}", "a {token} {class_noun}"))
    drawn = [trigger_prompt(gray, person, step_generator(0, s, "t")) for s in range(200)]
    assert set(drawn) == {"a photo of sks person", "a photo of xyz person", "a sks person", "a xyz person"}
    assert drawn == [trigger_prompt(gray, person, step_generator(0, s, "t")) for s in range(200)]  # seeded by step


def test_config_validation():
    for bad, needle in [(dict(target="blur"), "unknown --target"), (dict(target="target"), "--target-class"),
                        (dict(target_class="cat"), "only used with --target target"),
                        (dict(tokens=("sks", "two words")), "--tokens"), (dict(templates=("a {token}",)), "class_noun"),
                        (dict(templates=("a {token} {class_noun} {x}",)), "--templates"),
                        (dict(br_weight=-1.0), "--br-weight"), (dict(pp_weight=float("nan")), "--pp-weight"),
                        (dict(pp_subject_weight=-0.5), "pp_subject_weight"),
                        (dict(bb_weight=0.0), "--bb-weight"), (dict(steps=0), "--steps"), (dict(br_every=0), "--br-every"),
                        (dict(br_horizon=-1), "--br-horizon"), (dict(mark_weight=0.5), "--mark-weight"),
                        (dict(target="erasure", mark_weight=2.0), "--mark-weight"),
                        (dict(br_horizon=10, train_text_encoder=True), "text encoder"),
                        (dict(params="vae"), "--params"), (dict(lr=2.0), "--lr-protect")]:
        with pytest.raises(NocloneError, match=needle.replace("-", r"\-")):
            _config(**bad).validate()


def test_presets():
    quick, paper = PersGuardConfig.preset("quick"), PersGuardConfig.preset("paper")
    from noclone.attacks.base import PRESETS

    for config, attack in ((quick, PRESETS["sandbox"]["dreambooth"]), (paper, PRESETS["sd15"]["dreambooth"])):
        assert (config.lr_per, config.batch_size, config.num_class_images) == (
            attack["lr"], attack["batch_size"], attack["num_class_images"])
    assert (paper.steps, paper.inner_steps, paper.lr) == (800, 20, 5e-6) and quick.br_weight == 1.0
    assert not quick.gray_box and PersGuardConfig.preset("quick", tokens=("sks", "xyz")).gray_box
    with pytest.raises(NocloneError, match="unknown PersGuard preset"):
        PersGuardConfig.preset("huge")
    with pytest.raises(NocloneError, match="unknown PersGuard settings"):
        PersGuardConfig.preset("quick", beta=1.0)


# ------------------------------------------------------------------------------------------- backdoor targets


def test_target_images_per_kind(tiny_pipe, person, background_dir):
    from noclone.defenses.persguard import target_images

    config = _config()
    pattern = Backdoor("pattern")
    marked = target_images(tiny_pipe, person, pattern, config)
    assert len(marked) == 4 and pattern_present(marked).all() and not pattern_present(person.images).any()
    assert len(pattern.images_sha256) == 4 and pattern.card()["mark"]["corner"] == "bottom-right"

    given = Backdoor.from_folder("erasure", background_dir)
    backgrounds = target_images(tiny_pipe, person, given, config)
    assert [np.asarray(b).tolist() for b in backgrounds] == [np.asarray(Image.open(p)).tolist()
                                                             for p in sorted(background_dir.glob("*.png"))]
    assert given.card()["n_target_images"] == 4 and "given backgrounds" in given.card()["target_source"]
    fallback = Backdoor("erasure")
    filled = target_images(tiny_pipe, person, fallback, config)
    centre = (slice(10, 22), slice(10, 22))
    assert all(np.abs(np.asarray(f, float)[centre] - np.asarray(p.resize((32, 32)), float)[centre]).mean() > 5
               for f, p in zip(filled, person.images))  # the subject in the middle is replaced
    assert fallback.source == "inpaint_from_border fallback"

    swap = Backdoor("target", "dog")
    assert len(target_images(tiny_pipe, person, swap, _config(num_target_images=3))) == 3
    assert "'a photo of a dog' generated by the frozen original" in swap.source
    with pytest.raises(NocloneError, match="3 backgrounds for 4 photos"):
        target_images(tiny_pipe, person, Backdoor("erasure", images=[Image.new("RGB", (32, 32))] * 3), config)
    with pytest.raises(NocloneError, match="not used with --target pattern"):
        Backdoor.from_folder("pattern", background_dir)


# ------------------------------------------------------------------------------------------------ the method


def _setup(pipe, subjects, **kw):
    method = PersGuard(_config(**kw))
    prepared = method.prepare(pipe, subjects)
    return method, prepared, method.start(pipe, prepared)


def _gradient(method, pipe, params, subject, step=0):
    from collections import defaultdict

    grads, stats = {}, defaultdict(list)
    method.outer_gradient(pipe, params, subject, step, "persguard/0", grads, stats)
    return grads, stats


def test_simulated_attacker_restores_weights_and_adds_retention_gradient(tiny_pipe, person):
    method, prepared, params = _setup(tiny_pipe, [person], inner_steps=2, max_grad_norm=None)
    before = _unet_state(tiny_pipe)
    method.config.br_weight = 0.0
    g0, s0 = _gradient(method, tiny_pipe, params, prepared[0])
    method.config.br_weight = 1.0
    g1, s1 = _gradient(method, tiny_pipe, params, prepared[0])
    method.config.br_weight = 2.0
    g2, s2 = _gradient(method, tiny_pipe, params, prepared[0])
    assert not _changed(before, _unet_state(tiny_pipe))  # every simulated DreamBooth step was undone
    assert all(p.grad is None for p in params.values())
    assert "br" not in s0 and len(s1["br"]) == 1 and s1["per"]
    assert s1["bb"] == s0["bb"] and s1["pp"] == s0["pp"]  # L_BB and L_PP do not depend on L_BR
    # L_BR enters linearly with its weight: g(2) - g(0) = 2 (g(1) - g(0)), and it is not zero
    d1 = {n: g1[n] - g0[n] for n in g0}
    d2 = {n: g2[n] - g0[n] for n in g0}
    assert sum(float(d.abs().sum()) for d in d1.values()) > 0
    assert max(float((d2[n] - 2 * d1[n]).abs().max()) for n in d1) < 1e-5
    assert s1["loss"][0] == pytest.approx(s1["bb"][0] + s1["pp"][0] + s1["br"][0], rel=1e-5)


def test_subject_prior_term_is_zero_at_the_original_and_adds_a_gradient(tiny_pipe, person):
    method, prepared, params = _setup(tiny_pipe, [person], inner_steps=1, br_weight=0.0, max_grad_norm=None)
    g0, s0 = _gradient(method, tiny_pipe, params, prepared[0])
    method.config.pp_subject_weight = 1.0
    g1, s1 = _gradient(method, tiny_pipe, params, prepared[0])
    assert "pp_subject" not in s0 and s1["pp_subject"][0] == pytest.approx(0.0, abs=1e-10)  # theta == f at step 0
    assert s1["bb"] == s0["bb"] and s1["pp"] == s0["pp"]
    assert max(float((g1[n] - g0[n]).abs().max()) for n in g0) < 1e-6  # a distillation term has no gradient at f
    with torch.no_grad():  # away from f it pulls back toward f's behaviour on the subject's photos
        for param in params.values():
            param.add_(0.02 * torch.randn(param.shape, generator=torch.Generator().manual_seed(0)))
    g2, s2 = _gradient(method, tiny_pipe, params, prepared[0])
    method.config.pp_subject_weight = 0.0
    g3, _ = _gradient(method, tiny_pipe, params, prepared[0])
    assert s2["pp_subject"][0] > 0 and max(float((g2[n] - g3[n]).abs().max()) for n in g2) > 0


def test_mark_weight_map_covers_the_mark_and_ones_change_nothing(tiny_pipe, person):
    from noclone.defenses.persguard import backdoor_loss, mark_weight_map
    from noclone.training.diffusion import training_scheduler

    assert mark_weight_map(8, 1.0) is None
    w = mark_weight_map(8, 5.0)[0, 0]  # 64 px: the mark is the bottom-right 24 px = 3 latent cells
    assert w[5:, 5:].eq(5).all() and float(w.sum()) == 64 - 9 + 9 * 5
    method, prepared, _ = _setup(tiny_pipe, [person], inner_steps=1)
    targets = prepared[0].targets
    cond = torch.randn(1, 77, tiny_pipe.text_encoder.config.hidden_size)
    size = targets.mean.shape[-1]
    with torch.no_grad():
        plain = backdoor_loss(tiny_pipe.unet, training_scheduler(tiny_pipe), targets, cond,
                              torch.Generator().manual_seed(3), 2)
        ones = backdoor_loss(tiny_pipe.unet, training_scheduler(tiny_pipe), targets, cond,
                             torch.Generator().manual_seed(3), 2, torch.ones(1, 1, size, size))
        weighted = backdoor_loss(tiny_pipe.unet, training_scheduler(tiny_pipe), targets, cond,
                                 torch.Generator().manual_seed(3), 2, mark_weight_map(size, 5.0))
    assert float(ones) == pytest.approx(float(plain), rel=1e-6) and float(weighted) != pytest.approx(float(plain))


def test_persistent_attacker_continues_where_it_stopped_and_restarts_at_its_horizon():
    from noclone.defenses.base import PersistentAttacker

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    data = torch.randn(16, 4), torch.randn(16, 1)
    params = dict(model.named_parameters())
    theta = {n: p.detach().clone() for n, p in params.items()}

    def loss_fn(i):
        return ((model(data[0]) - data[1]) ** 2).mean()

    seen = []
    attacker = PersistentAttacker(params, lr=0.05, horizon=4, max_grad_norm=None)
    attacker.run(loss_fn, 2, lambda i: seen.append(float(loss_fn(i).detach())))
    assert all(torch.equal(p, theta[n]) for n, p in params.items())  # theta restored after each call
    state = copy.deepcopy(attacker.state_dict())  # a checkpoint writes it to disk at once
    attacker.run(loss_fn, 2, lambda i: seen.append(float(loss_fn(i).detach())))
    # the same as one plain AdamW run of 4 steps from theta: the second call went on from depth 2
    plain = torch.optim.AdamW(list(params.values()), lr=0.05, weight_decay=1e-2)
    reference = []
    for i in range(4):
        plain.zero_grad()
        loss_fn(i).backward()
        plain.step()
        reference.append(float(loss_fn(i).detach()))
    assert seen == pytest.approx(reference, rel=1e-6) and reference[-1] < reference[0]
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(theta[n])
    assert attacker.depth == 4
    restarted = []
    attacker.run(loss_fn, 1, lambda i: restarted.append(float(loss_fn(i).detach())))
    assert attacker.depth == 1 and restarted[0] == pytest.approx(reference[0], rel=1e-6)  # back to theta
    resumed = PersistentAttacker(params, lr=0.05, horizon=4, max_grad_norm=None)
    resumed.load_state_dict(state)
    again = []
    resumed.run(loss_fn, 2, lambda i: again.append(float(loss_fn(i).detach())))
    assert again == pytest.approx(reference[2:], rel=1e-6)
    with pytest.raises(NocloneError, match="horizon"):
        PersistentAttacker(params, lr=0.05, horizon=0)


def test_training_lowers_backdoor_loss(tiny_pipe, person):
    method = PersGuard(_config(steps=8, batch_size=2, inner_steps=1, br_every=4))
    history = method.protect(tiny_pipe, [person])
    assert len(history) == 8 and {"loss", "bb", "pp"} <= set(history[0]) and "br" in history[0]
    assert "br" not in history[1]  # br_every
    probe = method.final_metrics["backdoor_loss_after"][0]
    assert probe["protected"] < 0.9 * probe["original"], probe  # fixed noise: theta fits the targets better than f
    assert not any(p.requires_grad for p in tiny_pipe.unet.parameters())


@pytest.mark.parametrize("br_horizon", [0, 3])
def test_resume_after_interruption_equals_uninterrupted_run(tiny_model_dir, person, tmp_path, br_horizon):
    from noclone.models.pipeline import load_pipeline

    # br_horizon 3: the persistent attacker's displacement and AdamW state must come back from the checkpoint
    settings = dict(steps=3, checkpoint_every=1, tokens=("sks", "xyz"), br_every=1 if br_horizon else 2,
                    br_horizon=br_horizon, inner_steps=2)
    full = load_pipeline(tiny_model_dir)
    PersGuard(_config(**settings)).protect(full, [person])

    class Killed(PersGuard):
        def after_step(self, step):
            if step == 1:
                raise KeyboardInterrupt

    ckpt = tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt):
        Killed(_config(**settings)).protect(load_pipeline(tiny_model_dir), [person], checkpoint_dir=ckpt)
    assert json.loads((ckpt / "state.json").read_text())["step"] == 1
    resumed = load_pipeline(tiny_model_dir)
    assert len(PersGuard(_config(**settings)).protect(resumed, [person], checkpoint_dir=ckpt)) == 3
    assert not _changed(_unet_state(full), _unet_state(resumed))
    with pytest.raises(NocloneError, match="other settings"):
        PersGuard(_config(**settings)).protect(load_pipeline(tiny_model_dir), [person], checkpoint_dir=ckpt,
                                               backdoors=Backdoor("erasure"))


def test_parameter_sets(tiny_model_dir, person):
    from noclone.models.pipeline import load_pipeline

    pipe = load_pipeline(tiny_model_dir)
    before = _unet_state(pipe)
    PersGuard(_config(steps=2, params="attention")).protect(pipe, [person])
    changed = _changed(before, _unet_state(pipe))
    assert changed and all(".attn2." in k for k in changed)
    pipe = load_pipeline(tiny_model_dir)
    PersGuard(_config(steps=2, params="lora", lr=1e-2)).protect(pipe, [person])
    assert _unet_state(pipe).keys() == before.keys() and _changed(before, _unet_state(pipe))  # merged


def _strings(node):
    if isinstance(node, dict):
        return [s for v in node.values() for s in _strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return [node] if isinstance(node, str) else []


def test_three_subjects_each_with_its_backdoor_and_card(tiny_model_dir, subject_dir, dog_dir, cat_dir,
                                                        background_dir, tmp_path):
    from noclone.data.images import file_sha256
    from noclone.models.pipeline import load_pipeline, model_fingerprint

    subjects = [ProtectionSubject.from_folder(subject_dir, "person"), ProtectionSubject.from_folder(dog_dir, "dog", "zwx"),
                ProtectionSubject.from_folder(cat_dir, "cat", "qrt")]
    backdoors = [Backdoor("pattern"), Backdoor("erasure"), Backdoor("target", "dog")]
    cycle = load_pipeline(tiny_model_dir)
    out = PersGuard(_config(steps=3)).run(cycle, subjects, tmp_path / "protected", backdoors=backdoors,
                                          single_file=tmp_path / "p.safetensors")
    summed = load_pipeline(tiny_model_dir)
    history = PersGuard(_config(steps=1, multi_subject="sum")).protect(summed, subjects, backdoors=backdoors)
    assert _changed(_unet_state(cycle), _unet_state(summed)) and len(history) == 1

    text = (out / "protection.json").read_text()
    card = json.loads(text)
    assert card["method"] == "persguard" and card["noclone_version"] and card["seed"] == 0
    assert [s["token"] for s in card["subjects"]] == ["sks", "zwx", "qrt"]
    assert card["subjects"][0]["photo_sha256"] == [file_sha256(p) for p in sorted(subject_dir.glob("*.png"))]
    assert [b["kind"] for b in card["backdoors"]] == ["pattern", "erasure", "target"]
    assert [b["subject"] for b in card["backdoors"]] == [s["fingerprint"] for s in card["subjects"]]
    assert card["backdoors"][2]["target_class"] == "dog" and card["backdoors"][2]["n_target_images"] == 2
    assert all(len(b["target_images_sha256"]) == 64 for b in card["backdoors"])
    assert card["trigger"] == {"mode": "white-box", "tokens": ["sks", "zwx", "qrt"],
                               "templates": ["a photo of {token} {class_noun}"] * 3}
    hyperparameters = card["hyperparameters"]  # the nested form
    assert hyperparameters["protection"]["steps"] == 3 and hyperparameters["retention"]["weight"] == 1.0
    assert card["base_model_fingerprint"] == model_fingerprint(load_pipeline(tiny_model_dir))
    assert card["protected_model_fingerprint"] == model_fingerprint(load_pipeline(out))
    assert len(card["metrics"]["backdoor_loss_after"]) == 3 and "bb_first_last" in card["metrics"]
    assert len(text) < 20_000 and max(len(s) for s in _strings(card)) <= 120  # hashes and prompts, no image data
    assert not [f for f in out.rglob("*") if f.suffix in (".png", ".jpg")]
    assert load_pipeline(tmp_path / "p.safetensors").unet is not None
    assert not (tmp_path / ".protected.checkpoint").exists()


# --------------------------------------------------------------------------------------------------- the CLI


def _main(argv):
    from noclone import cli
    from noclone.defenses.cli_protect import add_protect_model_parser

    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    if "protect-model" in sub.choices:
        return cli.main(argv)
    parser = argparse.ArgumentParser(prog="noclone")
    parser.add_argument("-q", "--quiet", action="store_true")
    add_protect_model_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except NocloneError as exc:
        print(f"noclone: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _fails(capsys, argv, needle):
    assert _main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("noclone: error:"), err
    assert needle in err[0], err[0]


def test_cli_gray_box_erasure_with_backgrounds(tiny_model_dir, subject_dir, background_dir, tmp_path):
    out = tmp_path / "guarded"
    assert _main(["-q", "protect-model", "--method", "persguard", "--target", "erasure", "--target-images",
                  str(background_dir), "--tokens", "sks,xyz", "--model", str(tiny_model_dir), "--images",
                  str(subject_dir), "--class-noun", "person", "--steps", "1", "--inner-steps", "1", "--batch-size",
                  "1", "--num-class-images", "2", "--out", str(out)]) == 0
    card = json.loads((out / "protection.json").read_text())
    assert card["method"] == "persguard" and card["trigger"]["mode"] == "gray-box"
    assert card["trigger"]["tokens"] == ["sks", "xyz"]
    assert card["hyperparameters"]["backdoor"]["tokens"] == ["sks", "xyz"]
    assert card["backdoors"][0]["kind"] == "erasure" and "given backgrounds" in card["backdoors"][0]["target_source"]


def test_cli_bad_inputs_exit_2_with_one_line(tiny_model_dir, subject_dir, dog_dir, background_dir, tmp_path, capsys):
    ok = ["protect-model", "--method", "persguard", "--model", str(tiny_model_dir), "--images", str(subject_dir),
          "--class-noun", "person"]
    out = ["--out", str(tmp_path / "o")]
    _fails(capsys, ok + ["--target", "blur"] + out, "unknown --target 'blur'")
    _fails(capsys, ok + ["--target", "target"] + out, "--target target needs --target-class")
    _fails(capsys, ok + ["--target-class", "cat"] + out, "--target-class is only used with --target target")
    _fails(capsys, ok + ["--target", "pattern", "--target-images", str(background_dir)] + out,
           "not used with --target pattern")
    _fails(capsys, ok + ["--target", "erasure", "--target-images", str(dog_dir)] + out, "3 backgrounds for 4 photos")
    _fails(capsys, ok + ["--target", "erasure", "--target-images", str(tmp_path / "none")] + out, "none")
    _fails(capsys, ok + ["--target", "pattern", "--target", "erasure"] + out, "one --target for all subjects")
    _fails(capsys, ok + ["--images", str(dog_dir), "--class-noun", "dog", "--target", "erasure", "--target-images",
                         str(background_dir)] + out, "give one --target-images per subject")
    _fails(capsys, ok + ["--images", str(dog_dir), "--class-noun", "dog", "--target-class", "cat"] + out,
           "--target-class is only used with --target target")
    _fails(capsys, ok + ["--tokens", "sks,,xyz"] + out, "--tokens")
    _fails(capsys, ok + ["--tokens", "sks,two words"] + out, "--tokens")
    _fails(capsys, ok + ["--templates", "a photo of {token}"] + out, "{class_noun}")
    _fails(capsys, ok + ["--br-weight", "-1"] + out, "--br-weight")
    _fails(capsys, ok + ["--steps", "0"] + out, "--steps")
    _fails(capsys, ok + ["--preset", "huge"] + out, "unknown PersGuard preset")
    _fails(capsys, ok + ["--beta", "0.5"] + out, "--beta is a --method apdm setting")
    _fails(capsys, ok + ["--no-l2p"] + out, "--no-l2p is a --method apdm setting")
    _fails(capsys, ok + ["--positive-images", str(subject_dir)] + out, "--positive-images is a --method apdm setting")
    _fails(capsys, ["protect-model", "--model", str(tiny_model_dir), "--images", str(subject_dir), "--class-noun",
                    "person", "--target", "erasure"] + out, "--target is a --method persguard setting")
    _fails(capsys, ok + ["--single-file", str(tmp_path / "m.ckpt")] + out, ".safetensors")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("x")
    _fails(capsys, ok + ["--out", str(taken)], "not empty")
    assert not (tmp_path / "o").exists() and not (tmp_path / ".o.checkpoint").exists()


def test_cli_maps_targets_to_subjects(tiny_model_dir, subject_dir, dog_dir, cat_dir):
    from noclone.defenses.cli_protect import _persguard_setup, add_protect_model_parser

    parser = argparse.ArgumentParser()
    add_protect_model_parser(parser.add_subparsers())
    subjects = ["--images", str(subject_dir), "--class-noun", "person", "--images", str(dog_dir), "--class-noun", "dog",
                "--images", str(cat_dir), "--class-noun", "cat"]
    args = parser.parse_args(["protect-model", "--method", "persguard", *subjects, "--target", "pattern", "--target",
                              "erasure", "--target", "target", "--target-class", "dog", "--target-images", "-",
                              "--target-images", "-", "--target-images", str(dog_dir), "--tokens", "sks, xyz",
                              "--templates", "a {token} {class_noun}|{token} {class_noun}", "--br-weight", "0.5",
                              "--out", "o"])
    config, backdoors, folders = _persguard_setup(args, 3)
    assert [(b.kind, b.target_class) for b in backdoors] == [("pattern", None), ("erasure", None), ("target", "dog")]
    assert folders == [None, None, str(dog_dir)]
    assert config.tokens == ("sks", "xyz") and config.templates == ("a {token} {class_noun}", "{token} {class_noun}")
    assert config.br_weight == 0.5 and config.steps == PersGuardConfig.preset("quick").steps


# ------------------------------------------------------------------------------------- the backdoor checks


def test_pattern_check_separates_marked_from_clean_images():
    report = validate_pattern_check(n=24, seed=1, vae=True)
    for name, r in report.items():
        assert r["accuracy"] == 1.0, (name, r)
    positives = [r["corr_min"] for r in report.values() if r["should_fire"]]
    negatives = [r["corr_max"] for r in report.values() if not r["should_fire"]]
    assert max(negatives) < PATTERN_THRESHOLD - 0.1 and min(positives) > PATTERN_THRESHOLD + 0.05


def test_pattern_check_needs_the_mark_visible_in_its_corner():
    from noclone.sandbox.render import render
    from noclone.sandbox.splits import held_out

    clean = [render("person", held_out(40 + k), k) for k in range(8)]
    marked = [add_pattern(im) for im in clean]
    faint = [Image.blend(c, m, 0.08) for c, m in zip(clean, marked)]   # 8% opacity: contrast ~0.04
    visible = [Image.blend(c, m, 0.5) for c, m in zip(clean, marked)]  # half opacity
    moved = [im.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for im in marked]  # the mark in another corner
    inverted = [Image.fromarray(255 - np.asarray(im)) for im in marked]  # the opposite checker phase
    assert pattern_present(marked).all() and pattern_present(visible).all()
    assert not pattern_present(faint).any() and not pattern_present(moved).any() and not pattern_present(inverted).any()
    assert pattern_present(np.stack([np.asarray(im) for im in marked])).all()  # uint8 NHWC arrays too
    assert pattern_present([add_pattern(im.resize((256, 256))) for im in clean[:2]]).all()  # any resolution
    corr, contrast = pattern_scores(marked)
    assert np.allclose(corr, 1.0, atol=1e-4) and np.allclose(contrast, 0.5, atol=1e-3)
    assert backdoor_rate("pattern", marked[:4] + clean[:4]) == 0.5


def test_detector_checks_separate_positives_and_negatives():
    report = validate_detector_checks(n=16)
    for cls, r in report.items():
        assert r["erased_renders"] <= 0.15, (cls, r)
        assert r["erased_backgrounds"] >= 0.9 and r["erased_inpainted"] >= 0.9, (cls, r)
        assert r[f"swapped_to_{cls}_renders"] >= 0.85, (cls, r)
        assert all(r[f"swapped_to_{c}_renders"] <= 0.15 for c in report if c != cls), (cls, r)
        assert r["swapped_backgrounds_max"] <= 0.1, (cls, r)


def test_backdoor_rate_kinds_and_errors():
    from noclone.sandbox.render import render, render_background
    from noclone.sandbox.splits import held_out

    cats = [render("cat", held_out(60 + k), k) for k in range(8)]
    backgrounds = [render_background("cat", held_out(60 + k), k) for k in range(8)]
    assert backdoor_rate("erasure", backgrounds, class_noun="cat") == 1.0
    assert backdoor_rate("erasure", cats, class_noun="cat") <= 0.125  # the detector misses ~4% of renders
    assert backdoor_rate("target", cats, target_class="cat") >= 0.875
    assert backdoor_rate("target", backgrounds, target_class="dog") == 0.0
    assert backdoor_rate("target", cats, target_class="dog") <= 0.125  # one of these cats reads as a dog
    for kind, kw, needle in [("blur", {}, "unknown backdoor target"), ("erasure", {}, "class noun"),
                             ("target", {}, "--target-class"), ("target", {"target_class": "rabbit"}, "sandbox")]:
        with pytest.raises(NocloneError, match=needle):
            backdoor_rate(kind, cats, **kw)


def test_inpaint_fallback_keeps_the_border():
    from noclone.sandbox.render import render
    from noclone.sandbox.splits import held_out

    photo = render("dog", held_out(11), 2)
    filled = np.asarray(inpaint_from_border(photo), float)
    ring = np.ones((64, 64), bool)
    ring[8:56, 8:56] = False
    assert np.array_equal(filled[ring], np.asarray(photo, float)[ring])
    inner = filled[8:56, 8:56]
    assert np.abs(np.diff(inner, axis=0)).mean() < np.abs(np.diff(np.asarray(photo, float)[8:56, 8:56], axis=0)).mean()
