"""Presets that say what they reproduce: 'paper' (the paper) vs 'official' (the released code), --show, cards.

The APDM official gradient (outer gradient = protection gradient + the inner personalization gradient) is
checked by tests/test_apdm.py::test_official_grad_quirk_adds_the_personalization_gradient; here the 'official'
preset is checked to switch it on, together with no clipping on either path.
"""

import json

import pytest
import torch

from noclone.cli import main
from noclone.cloak.aspl import ASPL
from noclone.cloak.rid import RIDCloak, RIDRecipe
from noclone.defenses import APDM, APDMConfig, ProtectionSubject
from noclone.defenses.apdm import styled_subject
from noclone.errors import NocloneError
from noclone.presets import differing, parse_max_grad_norm

torch.set_num_threads(1)

NAMES = ("paper", "paper-sd21", "official", "official-sd21")
TINY_APDM = dict(outer_steps=1, inner_steps=1, batch_size=1, num_class_images=2, class_image_steps=1,
                 lr_protect=1e-3, lr_per=1e-3, progress=False)
TINY_ASPL = dict(steps=1, pgd_steps=1, surrogate_steps=1, prior_preservation=False, progress=False)


@pytest.fixture(scope="module")
def clean_dir(tmp_path_factory):
    """Three other clean photos of the subject of `subject_dir` (set A of the official ASPL script)."""
    from noclone.sandbox.render import render
    from noclone.sandbox.splits import held_out

    out = tmp_path_factory.mktemp("clean")
    for photo in range(10, 13):
        render("person", held_out(7), photo, size=32).save(out / f"clean_{photo}.png")
    return out


# -------------------------------------------------------------------------------------------- presets as data


def test_every_preset_resolves():
    for name in ("quick", *NAMES):
        config = APDMConfig.preset(name)
        config.validate()
        assert config.preset_name == name
    for name in ("sandbox", *NAMES):
        RIDRecipe.preset(name).validate()
        assert ASPL.preset_config(name).budget > 0
        assert name in RIDCloak.PRESETS
    with pytest.raises(NocloneError, match="unknown APDM preset"):
        APDMConfig.preset("offical")
    with pytest.raises(NocloneError, match="unknown RID preset"):
        RIDRecipe.preset("offical")


def test_official_differs_from_paper_exactly_in_the_quirks():
    apdm = {n: APDMConfig.preset(n) for n in ("quick", *NAMES)}
    assert differing(apdm["official"], apdm["paper"]) == {
        "l2p.official_grad_quirk": {"value": True, "default": False},
        "max_grad_norm": {"value": None, "default": 1.0},
        "prompt_style": {"value": "official", "default": "plain"},
        "dtype": {"value": "fp32", "default": "auto"}}
    assert differing(apdm["official-sd21"], apdm["official"]) == {"l2p.steps": {"value": 10, "default": 20}}
    assert differing(apdm["paper-sd21"], apdm["paper"]) == {}  # the paper runs SD2.1 with N_per 20 too
    # the existing presets are unchanged: the paper clips at 1.0, follows Algorithm 1, plain prompts
    assert (apdm["paper"].max_grad_norm, apdm["paper"].official_grad_quirk, apdm["paper"].prompt_style) == (
        1.0, False, "plain")
    assert differing(apdm["quick"], APDMConfig()) == {}

    rid = {n: RIDRecipe.preset(n) for n in ("sandbox", *NAMES)}
    assert differing(rid["official"], rid["paper"]) == {
        "weight_decay": {"value": 1e-2, "default": 0.0}, "warmup_steps": {"value": 500, "default": 0},
        "max_grad_norm": {"value": None, "default": 1.0}, "dtype": {"value": "fp32", "default": "auto"}}
    assert (rid["paper"].arch, rid["paper"].resolution, rid["paper"].budget) == ("dit-paper", 512, 6 / 255)
    assert differing(rid["paper-sd21"], rid["paper"]) == {"resolution": {"value": 768, "default": 512}}
    assert differing(rid["official-sd21"], rid["official"]) == {"resolution": {"value": 768, "default": 512}}
    assert differing(rid["sandbox"], RIDRecipe()) == {}

    aspl = {n: ASPL.preset_config(n) for n in ("sandbox", *NAMES)}
    assert differing(aspl["official"], aspl["paper"]) == {
        "clean_set": {"value": True, "default": False}, "train_text_encoder": {"value": True, "default": False},
        "dtype": {"value": "fp32", "default": "auto"}}
    assert differing(aspl["paper-sd21"], aspl["paper"]) == {} == differing(aspl["official-sd21"], aspl["official"])
    assert aspl["paper"].max_grad_norm == aspl["official"].max_grad_norm == 1.0  # the official script clips too


@pytest.mark.parametrize("argv,differs", [
    (["protect-model", "--method", "apdm", "--preset", "official", "--show"], "l2p.official_grad_quirk"),
    (["protect-model", "--preset", "official-sd21", "--show"], "l2p.steps"),
    (["protect-model", "--show"], None),
    (["protect-images", "--method", "aspl", "--preset", "official", "--show"], "train_text_encoder"),
    (["protect-images", "--method", "rid", "--preset", "paper", "--show"], "arch"),
    (["rid", "train", "--preset", "official", "--show"], "warmup_steps"),
])
def test_show_prints_the_table_and_exits_0(argv, differs, capsys):
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "setting" in out and "default (" in out
    rows = {line.split()[0]: line for line in out.splitlines()[3:] if line.startswith("  ")}
    assert "max_grad_norm" in rows
    if differs:
        assert rows[differs].rstrip().endswith("*"), rows[differs]
    else:
        assert "0 setting(s) differ" in out


def test_show_needs_no_other_argument_but_a_run_still_does(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["rid", "train", "--preset", "official"])  # no --out: argparse's exit 2, as before
    assert exc.value.code == 2
    with pytest.raises(SystemExit):
        main(["protect-images", "--method", "aspl", "--model", "sandbox"])  # no --images / --out
    assert main(["protect-images", "--method", "aspl", "--preset", "nope", "--show"]) == 2
    assert "unknown preset" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- clipping


def test_max_grad_norm_none_means_no_clipping():
    from noclone.defenses.base import simulate_personalization
    from noclone.training.loop import LoopConfig, run_training

    assert parse_max_grad_norm("none") is None and parse_max_grad_norm("2.5") == 2.5
    for bad in ("0", "-1", "x", "nan"):
        with pytest.raises(NocloneError, match="--max-grad-norm"):
            parse_max_grad_norm(bad)

    def inner_grad_norm(max_grad_norm):  # the simulated attacker's path (official quirk: the .grad is kept)
        w = torch.nn.Parameter(torch.zeros(10))
        seen = []
        simulate_personalization({"w": w}, lambda i: 100.0 * w.sum(), 1, 1e-3,
                                 lambda i: seen.append(float(w.grad.norm())), keep_personalization_grads=True,
                                 max_grad_norm=max_grad_norm)
        return seen[0]

    assert inner_grad_norm(None) == pytest.approx(100 * 10 ** 0.5) and inner_grad_norm(1.0) == pytest.approx(1.0)

    def outer_grad_norm(max_grad_norm):  # the protection path (the training loop)
        w = torch.nn.Parameter(torch.zeros(10))
        seen = []
        run_training([("w", w)], torch.optim.SGD([w], lr=0.0), lambda step: {"loss": 100.0 * w.sum()},
                     LoopConfig(1, progress=False, max_grad_norm=max_grad_norm),
                     after_step=lambda step: seen.append(float(w.grad.norm())))
        return seen[0]

    assert outer_grad_norm(None) == pytest.approx(100 * 10 ** 0.5) and outer_grad_norm(1.0) == pytest.approx(1.0)


def test_apdm_official_preset_runs_both_paths_unclipped_with_the_quirk(tiny_pipe, subject_dir, monkeypatch):
    import noclone.defenses.apdm as apdm

    seen = {}
    real_inner, real_loop = apdm.simulate_personalization, apdm.run_training

    def inner(*args, **kwargs):
        seen["inner"] = (kwargs["max_grad_norm"], kwargs["keep_personalization_grads"])
        return real_inner(*args, **kwargs)

    def loop(params, optimizer, step_fn, config, **kwargs):
        seen["outer"] = config.max_grad_norm
        return real_loop(params, optimizer, step_fn, config, **kwargs)

    monkeypatch.setattr(apdm, "simulate_personalization", inner)
    monkeypatch.setattr(apdm, "run_training", loop)
    person = ProtectionSubject.from_folder(subject_dir, "person")
    method = APDM(APDMConfig.preset("official", **TINY_APDM))
    method.protect(tiny_pipe, [person])
    assert seen == {"inner": (None, True), "outer": None}
    assert method.subjects[0].data.instance.prompt == 'a photo of "sks_person"'


def test_cli_max_grad_norm_reaches_the_configs():
    from noclone.cli import build_parser
    from noclone.defenses.cli_protect import _apdm_config

    args = build_parser().parse_args(["protect-model", "--preset", "paper", "--max-grad-norm", "none"])
    assert _apdm_config(args).max_grad_norm is None
    args = build_parser().parse_args(["protect-model", "--preset", "official", "--max-grad-norm", "0.5"])
    assert _apdm_config(args).max_grad_norm == 0.5


# --------------------------------------------------------------------------------------------------- APDM


def test_official_prompt_style_strings():
    def subject(noun, token="sks"):
        return ProtectionSubject(images=[], class_noun=noun, token=token)

    official = styled_subject(subject("person"), "official")
    assert official.instance_prompt == 'a photo of "sks_person"'
    assert official.class_prompt == "a photo of a person"  # the class prompt is not changed
    assert styled_subject(subject("teddy bear", "t@t"), "official").instance_prompt == 'a photo of "t@t_teddy_bear"'
    assert styled_subject(subject("person"), "plain").instance_prompt == "a photo of sks person"
    braces = styled_subject(subject("{x}"), "official")
    assert braces.instance_prompt == 'a photo of "sks_{x}"'
    with pytest.raises(NocloneError, match="prompt style"):
        styled_subject(ProtectionSubject(images=[], class_noun="person", template="{class_noun} {token}"), "official")


def test_protection_card_records_the_preset_and_its_settings(tiny_model_dir, subject_dir, tmp_path):
    from noclone.models.pipeline import load_pipeline

    person = ProtectionSubject.from_folder(subject_dir, "person")
    out = APDM(APDMConfig.preset("official", **TINY_APDM)).run(load_pipeline(tiny_model_dir), [person],
                                                                 tmp_path / "protected")
    card = json.loads((out / "protection.json").read_text())
    assert card["preset"] == "official" and card["settings"]["compared_with"] == "quick"
    differs = card["settings"]["differs"]
    assert differs["l2p"]["official_grad_quirk"] == {"value": True, "default": False}
    assert differs["max_grad_norm"] == {"value": None, "default": 1.0}
    assert card["hyperparameters"]["prompt_style"] == "official"
    assert card["subjects"][0]["instance_prompt"] == 'a photo of "sks_person"'


# ---------------------------------------------------------------------------------------------------- RID


def test_rid_dit_paper_has_8_heads_at_512():
    from noclone.cloak.rid import RIDConfig
    from noclone.cloak.rid_nets import ARCHS, build_net

    assert "dit-paper" in ARCHS
    kwargs = RIDConfig(arch="dit-paper").net_kwargs()
    assert (kwargs["heads"], kwargs["hidden"], kwargs["depth"], kwargs["patch"]) == (8, 1152, 14, 16)
    with torch.device("meta"):  # the shape only: no 232 M parameters allocated
        net = build_net("dit-paper")
    assert len(net.blocks) == 14 and {b.heads for b in net.blocks} == {8}
    assert RIDRecipe.preset("paper").resolution == 512


def test_rid_cli_accepts_dit_paper(capsys):
    assert main(["rid", "train", "--arch", "dit-paper", "--preset", "paper", "--show"]) == 0
    capsys.readouterr()
    assert main(["rid", "train", "--arch", "vit", "--sandbox-identities", "1", "--out", "x"]) == 2
    assert "dit-paper" in capsys.readouterr().err


def test_rid_official_training_warms_up_decays_weights_and_does_not_clip(tiny_pipe, monkeypatch):
    import noclone.cloak.rid as rid

    recipe = RIDRecipe.preset("official", arch="conv", resolution=32, steps=3, batch_size=1, warmup_steps=2,
                              progress=False)
    seen = {"lr": []}
    real = rid.run_training

    def loop(params, optimizer, step_fn, config, after_step=None, **kwargs):
        seen["max_grad_norm"], seen["weight_decay"] = config.max_grad_norm, optimizer.param_groups[0]["weight_decay"]

        def after(step):
            seen["lr"].append(optimizer.param_groups[0]["lr"])
            if after_step is not None:
                after_step(step)

        return real(params, optimizer, step_fn, config, after_step=after, **kwargs)

    monkeypatch.setattr(rid, "run_training", loop)
    generator = rid.RIDGenerator(rid.RIDConfig(arch="conv", resolution=32, net=dict(channels=8)))
    rid.train_rid(generator, [tiny_pipe], torch.rand(2, 3, 32, 32) * 2 - 1, recipe.train_config())
    assert seen["max_grad_norm"] is None and seen["weight_decay"] == 1e-2
    assert seen["lr"] == pytest.approx([0.0, 1.5e-4, 3e-4])  # lr * min(1, step / warmup), then constant


# --------------------------------------------------------------------------------------------------- ASPL


def _spy_surrogate(monkeypatch):
    import noclone.cloak.aspl as aspl

    calls = []
    real = aspl.dreambooth_steps

    def spy(cloak, unet, data, steps, stream, text_encoder=None):
        calls.append({"stream": stream, "latents": data.instance.mean.clone(), "text_encoder": text_encoder})
        return real(cloak, unet, data, steps, stream, text_encoder=text_encoder)

    monkeypatch.setattr(aspl, "dreambooth_steps", spy)
    return calls


def test_aspl_clean_set_trains_the_surrogate_on_it_with_the_text_encoder(tiny_pipe, subject_dir, clean_dir, tmp_path,
                                                                        monkeypatch):
    from noclone.attacks.base import load_subject_images
    from noclone.cloak import protect_folder
    from noclone.cloak.base import to_working
    from noclone.cloak.fsmg import clean_subject_data

    calls = _spy_surrogate(monkeypatch)
    text_before = {k: v.clone() for k, v in tiny_pipe.text_encoder.state_dict().items()}
    out = protect_folder("aspl", subject_dir, tmp_path / "out", tiny_pipe, preset="official", clean_images=clean_dir,
                         **TINY_ASPL)
    surrogate = [c for c in calls if "/surrogate/" in c["stream"]]
    model = [c for c in calls if "/model/" in c["stream"]]
    assert len(surrogate) == len(model) == 1
    # f' learns from the 3 clean photos of set A; f from the 4 perturbed photos of set B
    probe = ASPL(tiny_pipe, preset="official", clean_images=clean_dir, **TINY_ASPL)
    expected = clean_subject_data(probe, [to_working(im, probe.resolution) for im in load_subject_images(clean_dir)[1]])
    assert torch.allclose(surrogate[0]["latents"], expected.instance.mean)
    assert len(model[0]["latents"]) == 4
    # both fine-tune their own copy of the text encoder; the pipeline's stays as it was
    te = surrogate[0]["text_encoder"]
    assert te is not None and te is not tiny_pipe.text_encoder and model[0]["text_encoder"] is not None
    assert any(not torch.equal(v, te.state_dict()[k]) for k, v in text_before.items())
    assert all(torch.equal(v, tiny_pipe.text_encoder.state_dict()[k]) for k, v in text_before.items())
    manifest = json.loads((out / "cloak.json").read_text())
    assert manifest["preset"] == "official" and manifest["settings"]["train_text_encoder"]
    assert manifest["preset_settings"]["differs"]["clean_set"] == {"value": True, "default": False}
    assert manifest["clean_set"]["n_photos"] == 3 and len(manifest["clean_set"]["photo_sha256"]) == 3


def test_aspl_default_is_unchanged_and_official_needs_the_clean_set(tiny_pipe, subject_dir, monkeypatch):
    from noclone.cloak.base import pil_to_tensor

    calls = _spy_surrogate(monkeypatch)
    cloak = ASPL(tiny_pipe, **TINY_ASPL)
    assert not cloak.config.clean_set and not cloak.config.train_text_encoder and cloak.config.max_grad_norm == 1.0
    from noclone.attacks.base import load_subject_images

    cloak.perturb(torch.cat([pil_to_tensor(im) for im in load_subject_images(subject_dir)[1]]))
    surrogate = next(c for c in calls if "/surrogate/" in c["stream"])
    assert len(surrogate["latents"]) == 4 and surrogate["text_encoder"] is None  # the photos themselves, frozen TE
    with pytest.raises(NocloneError, match="--clean-images"):
        ASPL(tiny_pipe, preset="official")
