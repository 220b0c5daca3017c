"""Defence configs in sections (flat names still work), shipped recipes, and protect-model's --recipe / --config /
--list-recipes / --help-all. Nothing here trains: the run path is followed up to the config it would use."""

import json
from dataclasses import asdict, fields, replace
from pathlib import Path

import pytest

from noclone.cli import main
from noclone.defenses import recipe as recipes
from noclone.defenses.apdm import APDM, APDMConfig
from noclone.defenses.persguard import PersGuardConfig
from noclone.errors import NocloneError

CONFIGS = (APDMConfig, PersGuardConfig)
AUDITS = Path(__file__).resolve().parents[1] / "docs" / "audits"


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("noclone: error:"), err
    return err[0]


# ----------------------------------------------------------------------------------------- sections, flat names


@pytest.mark.parametrize("cls", CONFIGS)
def test_flat_names_map_one_to_one_onto_section_fields(cls):
    section_fields = {(name, f.name) for name, section in cls.sections().items() for f in fields(section)}
    assert sorted(cls.FLAT_KEYS.values()) == sorted(section_fields)  # every field has exactly one flat name
    top = {f.name for f in fields(cls)} - set(cls.sections())
    assert not set(cls.FLAT_KEYS) & top


@pytest.mark.parametrize("cls", CONFIGS)
def test_nested_and_flat_forms_round_trip(cls):
    for name in cls.PRESETS:
        config = cls.preset(name, seed=3)
        assert cls(**asdict(config)) == config  # the nested form (what cards record)
        assert cls(**json.loads(json.dumps(asdict(config)))) == config  # ... read back from JSON (lists)
        assert cls(**config.flat()) == config  # the flat form (bench YAML, checkpoints)
        assert replace(config) == config and replace(config) is not config


def test_flat_and_nested_overrides_agree_and_sections_keep_the_rest():
    flat = APDMConfig.preset("paper", outer_steps=5, decoder_lr=1e-4, l2p=False, implant="both")
    nested = APDMConfig.preset("paper", protection={"steps": 5}, guard={"lr": 1e-4, "implant": "both"},
                               l2p={"enabled": False})
    aliased = APDMConfig.preset("paper", protection={"outer_steps": 5}, guard={"decoder_lr": 1e-4, "implant": "both"},
                                l2p={"l2p": False})
    assert flat == nested == aliased
    assert nested.guard.attack_preset == "sd15" and nested.l2p.steps == 20  # the preset's other values stay
    assert (flat.outer_steps, flat.decoder_lr, flat.inner_steps) == (5, 1e-4, 20)  # flat reads
    assert not flat.l2p and APDMConfig().l2p  # `if config.l2p` reads as before
    changed = replace(flat, inner_steps=7)  # dataclasses.replace with a flat name
    assert changed.l2p.steps == 7 and changed.protection.steps == 5 and flat.l2p.steps == 20
    changed.decoder_blur = 0.2  # flat writes reach the section
    assert changed.guard.blur == 0.2 and flat.guard.blur == 0.0625
    guard = PersGuardConfig.preset("quick", br_weight=0.5, retention={"horizon": 3}, tokens=["sks", "xyz"])
    assert (guard.retention.weight, guard.br_horizon, guard.backdoor.tokens) == (0.5, 3, ("sks", "xyz"))


def test_unknown_settings_are_one_line_errors_naming_the_key():
    with pytest.raises(NocloneError, match=r"^unknown APDM settings: guard\.blurr$"):
        APDMConfig.preset("quick", guard={"blurr": 0.1})
    with pytest.raises(NocloneError, match=r"^unknown PersGuard settings: stepz$"):
        PersGuardConfig.preset("quick", stepz=3)
    with pytest.raises(NocloneError, match="give a mapping"):
        APDMConfig(repair=3)


def test_paper_settings_keep_their_values():
    paper = APDMConfig.preset("paper")
    assert (paper.protection.steps, paper.l2p.steps, paper.protection.lr, paper.l2p.lr, paper.protection.beta) == (
        800, 20, 5e-6, 5e-6, 1.0)
    assert (paper.batch_size, paper.num_class_images, paper.l2p.accumulate, paper.protection.reduction) == (
        1, 200, "sum", "elementwise")
    assert paper.l2p.enabled and paper.protection.paired and not paper.l2p.official_grad_quirk
    assert APDMConfig.preset("official").l2p.official_grad_quirk and APDMConfig.preset("official-sd21").l2p.steps == 10
    quick = PersGuardConfig()
    assert (quick.protection.steps, quick.retention.steps, quick.guard.steps, quick.backdoor.target) == (
        120, 2, 600, "pattern")


def test_identity_keeps_the_flat_names_older_checkpoints_hashed():
    identity = APDMConfig.preset("quick", implant="both").identity()
    assert identity["inner_steps"] == 4 and identity["decoder_blur"] == 0.0625 and "outer_steps" not in identity
    assert "protection" not in identity and "guard" not in identity
    assert PersGuardConfig().identity()["br_weight"] == 1.0


def test_bench_defences_take_flat_and_nested_settings():
    from noclone.bench.registry import defence

    defence("apdm").check({"preset": "quick", "outer_steps": 10, "decoder_blur": 0.1})
    defence("apdm").check({"preset": "quick", "protection": {"steps": 10}, "guard": {"decoder_lr": 1e-4}})
    defence("persguard").check({"preset": "quick", "target": "pattern", "br_weight": 0.5})
    with pytest.raises(NocloneError, match="guard.nope"):
        defence("apdm").check({"preset": "quick", "guard": {"nope": 1}})


# ------------------------------------------------------------------------------------------------ the recipes


def test_every_shipped_recipe_loads_and_says_what_it_was_measured_against():
    names = recipes.recipe_names()
    assert {"apdm-sandbox", "apdm-guard-sandbox", "persguard-sandbox", "apdm-sd15", "persguard-sd15"} <= set(names)
    for name in names:
        recipe = recipes.shipped(name)
        config = recipe.config()
        config.validate()
        assert type(config) is recipes.config_class(recipe.method) and config.preset_name == recipe.preset
        assert recipe.threat_model and recipe.measured and recipe.evidence and recipe.model
        assert "\n" not in recipe.threat_model + recipe.measured  # one line each
    assert recipes.shipped("apdm-sd15").config() == APDMConfig.preset("paper")
    assert "not measured here" in recipes.shipped("apdm-sd15").measured
    assert "not measured here" in recipes.shipped("persguard-sd15").measured
    assert "broken" in recipes.shipped("persguard-sandbox").measured
    assert "costs the class" in recipes.shipped("apdm-sandbox").measured


@pytest.mark.parametrize("name,audit", [("apdm-sandbox", "apdm"), ("apdm-guard-sandbox", "apdm-guard"),
                                        ("persguard-sandbox", "persguard-unet"),
                                        ("persguard-decoder-sandbox", "persguard-decoder")])
def test_sandbox_recipes_are_the_published_audits_settings(name, audit):
    card_path = AUDITS / audit / "protection.json"
    if not card_path.is_file():
        pytest.skip(f"{card_path} is not in this checkout")
    card = json.loads(card_path.read_text())
    recipe = recipes.shipped(name)
    assert recipe.evidence == f"docs/audits/{audit}/audit.json"
    ours = recipe.config().flat()
    published = card["hyperparameters"]  # written before the sections: flat names
    for key in ("progress", "preset_name"):
        ours.pop(key, None), published.pop(key, None)
    assert json.loads(json.dumps(ours)) == published


def test_recipe_files_refuse_bad_keys_types_and_methods(tmp_path):
    def load(text):
        path = tmp_path / "r.yaml"
        path.write_text(text)
        return recipes.from_file(path)

    good = load("method: apdm\nsettings:\n  protection: {steps: 300, lr: 5e-5}\n  decoder_blur: 0.1\n")
    assert good.config().protection.lr == 5e-5 and good.config().guard.blur == 0.1  # '5e-5' read as a number
    assert good.config(outer_steps=1).protection.steps == 1 and good.config("paper").protection.lr == 5e-5
    for text, needle in [("method: apdm\nsetings: {}\n", "unknown key 'setings'"),
                         ("method: apdm\nsettings: {guard: {blurr: 1}}\n", "unknown APDM setting guard.blurr"),
                         ("method: apdm\nsettings: {protection: {steps: many}}\n", "protection.steps: 'many' is not"),
                         ("method: dreambooth\n", "method 'dreambooth'"),
                         ("method: apdm\npreset: huge\n", "unknown APDM preset 'huge'"),
                         ("method: apdm\nsettings: {protection: {steps: 0}}\n", "--steps 0 must be at least 1"),
                         ("method: [\n", "not valid YAML")]:
        with pytest.raises(NocloneError, match=needle) as info:
            load(text)
        assert str(info.value).startswith(str(tmp_path / "r.yaml")) and "\n" not in str(info.value)
    with pytest.raises(NocloneError, match="known recipes: apdm-guard-sandbox"):
        recipes.shipped("nope")


# -------------------------------------------------------------------------------------------------- the CLI


def test_list_recipes_prints_each_with_its_threat_model(capsys):
    assert main(["protect-model", "--list-recipes"]) == 0
    out = capsys.readouterr().out
    for name in recipes.recipe_names():
        assert f"{name}  (" in out
    assert out.count("threat model:") == len(recipes.recipe_names())


def test_cli_refuses_bad_recipes_and_config_files_with_one_line(tmp_path, capsys):
    assert main(["protect-model", "--recipe", "nope", "--show"]) == 2
    assert "known recipes: apdm-guard-sandbox, apdm-sandbox" in _one_error_line(capsys)
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: apdm\nsettings:\n  guard:\n    blurr: 0.1\n")
    assert main(["protect-model", "--config", str(bad), "--show"]) == 2
    assert _one_error_line(capsys).endswith("bad.yaml: unknown APDM setting guard.blurr")
    assert main(["protect-model", "--config", str(tmp_path / "missing.yaml"), "--show"]) == 2
    assert "missing.yaml: no such recipe file" in _one_error_line(capsys)
    text = tmp_path / "notes.txt"
    text.write_text("x")
    assert main(["protect-model", "--config", str(text), "--show"]) == 2
    assert "a recipe is a .yaml file" in _one_error_line(capsys)
    assert main(["protect-model", "--recipe", "apdm-sandbox", "--config", str(bad), "--show"]) == 2
    assert "not both" in _one_error_line(capsys)
    assert main(["protect-model", "--recipe", "persguard-sandbox", "--method", "apdm", "--show"]) == 2
    assert "persguard recipe" in _one_error_line(capsys)
    assert main(["protect-model", "--recipe", "apdm-sandbox", "--target", "pattern", "--show"]) == 2
    assert "--target is a --method persguard setting" in _one_error_line(capsys)


def test_a_config_directory_is_still_the_checkpoint_config():
    from noclone.cli import build_parser
    from noclone.defenses.cli_protect import _recipe

    args = build_parser().parse_args(["protect-model", "--config", str(AUDITS.parent)])
    assert _recipe(args) is None and args.config == str(AUDITS.parent)


def test_help_shows_the_essentials_and_help_all_every_group(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["protect-model", "--help"])
    assert exc.value.code == 0
    short = capsys.readouterr().out
    for flag in ("--model", "--images", "--class-noun", "--out", "--method", "--recipe", "--config", "--preset",
                 "--seed", "--list-recipes", "--help-all"):
        assert flag in short, flag
    for flag in ("--decoder-blur", "--repair-steps", "--lr-per", "--br-weight", "--reference-dtype"):
        assert flag not in short, flag
    with pytest.raises(SystemExit) as exc:
        main(["protect-model", "--help-all"])
    assert exc.value.code == 0
    full = capsys.readouterr().out
    for heading in ("protection (", "L2P:", "repair (", "guard (", "PersGuard backdoor", "run:"):
        assert heading in full, heading
    for flag in ("--decoder-blur", "--repair-steps", "--lr-per", "--br-weight", "--reference-dtype", "--images"):
        assert flag in full, flag


def test_show_prints_what_a_recipe_run_would_use(tmp_path, capsys):
    assert main(["protect-model", "--recipe", "apdm-guard-sandbox", "--seed", "3", "--show"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith("  ")}
    assert rows["protection.steps"][1:] == ["300", "100", "*"] and rows["guard.implant"][1:] == ["both", "unet", "*"]
    assert rows["seed"][1] == "3" and "recipe 'apdm-guard-sandbox'" in out and "set on the command line: seed" in out
    own = tmp_path / "mine.yaml"
    own.write_text("method: persguard\nsettings:\n  retention: {weight: 0.5}\n  br_horizon: 3\n")
    assert main(["protect-model", "--config", str(own), "--steps", "9", "--show"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("  ")}
    assert rows["retention.weight"][1] == "0.5" and rows["retention.horizon"][1] == "3"
    assert rows["protection.steps"][1] == "9"


def test_a_recipe_reaches_the_run_and_its_card(tiny_model_dir, subject_dir, tmp_path, monkeypatch):
    seen = {}

    def no_training(self, pipe, subjects, *args, **kwargs):  # the run as it is, minus the protection itself
        seen["config"] = self.config
        return []

    monkeypatch.setattr(APDM, "protect", no_training)
    out = tmp_path / "protected"
    assert main(["-q", "protect-model", "--recipe", "apdm-guard-sandbox", "--model", str(tiny_model_dir), "--images",
                 str(subject_dir), "--class-noun", "person", "--decoder-blur", "0.1", "--out", str(out)]) == 0
    config = seen["config"]
    assert (config.protection.steps, config.guard.implant, config.guard.blur, config.preset_name) == (
        300, "both", 0.1, "quick")
    card = json.loads((out / "protection.json").read_text())
    assert card["recipe"]["name"] == "apdm-guard-sandbox" and card["recipe"]["source"] == "shipped"
    assert card["recipe"]["overridden_on_command_line"] == ["decoder_blur"]
    assert card["recipe"]["threat_model"] == recipes.shipped("apdm-guard-sandbox").threat_model
    assert card["hyperparameters"]["guard"]["implant"] == "both" and card["preset"] == "quick"
    assert card["settings"]["differs"]["protection"]["steps"] == {"value": 300, "default": 100}


def test_persguard_targets_come_from_the_recipe_unless_given(tmp_path):
    from noclone.cli import build_parser
    from noclone.defenses.cli_protect import _persguard_setup, _recipe

    own = tmp_path / "rabbit.yaml"
    own.write_text("method: persguard\nsettings:\n  backdoor: {target: target, target_class: rabbit}\n")
    args = build_parser().parse_args(["protect-model", "--config", str(own)])
    args.recipe_loaded = _recipe(args)
    config, backdoors, _ = _persguard_setup(args, 2)
    assert [(b.kind, b.target_class) for b in backdoors] == [("target", "rabbit")] * 2
    assert config.backdoor.target_class == "rabbit"
    args = build_parser().parse_args(["protect-model", "--config", str(own), "--target", "pattern"])
    args.recipe_loaded = _recipe(args)
    config, backdoors, _ = _persguard_setup(args, 1)
    assert backdoors[0].kind == "pattern" and config.backdoor.target_class is None
