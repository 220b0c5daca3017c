"""User-facing messages (issue 42): each test fails on the wording or behaviour the issue reported."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from noclone.cli import build_parser, main
from noclone.errors import NocloneError


def _one_error_line(capsys) -> str:
    """The single stderr line of a failed command (the CLI's rule for every bad input)."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("noclone: error:"), err
    return err[0]


def _renders(folder: Path, size: int, n: int = 2, identity: int = 3) -> Path:
    """n sandbox renders of one held-out identity at `size` px (a stand-in for 'real', bigger photos when > 64)."""
    from noclone.sandbox.render import render
    from noclone.sandbox.splits import held_out

    folder.mkdir(parents=True, exist_ok=True)
    for photo in range(n):
        render("person", held_out(identity), photo, size=size).save(folder / f"p{photo}.png")
    return folder


@pytest.fixture
def text_png_dir(tmp_path) -> Path:
    """A folder whose only 'image' is a text file named x.png."""
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "x.png").write_text("hello, I am not a picture\n")
    return folder


# ------------------------------------------------------------------------------------- 1. protect-images --method


def test_protect_images_without_method_names_the_methods(tmp_path, capsys):
    from noclone.cloak.cli import METHODS

    folder = _renders(tmp_path / "photos", 64, n=1)
    assert main(["protect-images", "--images", str(folder), "--out", str(tmp_path / "out")]) == 2
    line = _one_error_line(capsys)
    assert "None" not in line and "--method is required" in line
    assert all(method in line for method in METHODS)


# ------------------------------------------------------------------------------ 2. an undecodable file, both ways


def test_protect_model_and_protect_images_refuse_a_text_png_the_same_way(text_png_dir, tmp_path, capsys):
    expected = f"noclone: error: {text_png_dir / 'x.png'}: not an image (cannot identify image file)"
    assert main(["protect-model", "--images", str(text_png_dir), "--class-noun", "person",
                 "--out", str(tmp_path / "model")]) == 2
    assert _one_error_line(capsys) == expected  # was "found 1 image, need at least 2"
    assert main(["protect-images", "--method", "rid", "--images", str(text_png_dir), "--out", str(tmp_path / "o")]) == 2
    assert _one_error_line(capsys) == expected


def test_folder_check_names_a_non_image_before_counting(text_png_dir):
    from noclone.data.images import check_image_file, load_image_folder

    with pytest.raises(NocloneError) as info:
        load_image_folder(text_png_dir, min_count=2)
    assert str(info.value) == f"{text_png_dir / 'x.png'}: not an image (cannot identify image file)"
    with pytest.raises(NocloneError, match="not an image"):
        check_image_file(text_png_dir / "x.png")


def test_check_image_file_reads_the_size_of_a_real_image(tmp_path):
    from noclone.data.images import check_image_file

    folder = _renders(tmp_path / "photos", 48, n=1)
    assert check_image_file(folder / "p0.png") == (48, 48)


# ----------------------------------------------------------------------------------------------- 3. budgets

BUDGET_999 = "--budget 999: the L-inf budget must be between 0 and 1 in pixel units (e.g. 8/255 or 0.03)"


def test_budget_message_says_what_is_expected_on_every_path(tmp_path, capsys):
    from noclone.cloak.base import CloakConfig, parse_budget
    from noclone.cloak.rid import RIDConfig, RIDRecipe

    with pytest.raises(NocloneError) as info:
        parse_budget("999")
    assert str(info.value) == BUDGET_999
    for config in (CloakConfig(budget=999.0), RIDConfig(budget=999.0), RIDRecipe(budget=999.0)):
        with pytest.raises(NocloneError) as info:
            config.validate()
        assert str(info.value) == BUDGET_999, type(config).__name__
    folder = _renders(tmp_path / "photos", 64, n=1)
    out = ["--out", str(tmp_path / "out")]
    assert main(["protect-images", "--method", "rid", "--budget", "999", "--images", str(folder), *out]) == 2
    assert _one_error_line(capsys) == f"noclone: error: {BUDGET_999}"
    assert main(["rid", "train", "--sandbox-identities", "1", "--budget", "999", *out]) == 2
    assert _one_error_line(capsys) == f"noclone: error: {BUDGET_999}"


def test_budget_that_is_not_a_number_gets_the_same_explanation():
    from noclone.cloak.base import parse_budget, parse_step_size

    with pytest.raises(NocloneError, match=r"^--budget abc: the L-inf budget must be between 0 and 1 in pixel units"):
        parse_budget("abc")
    with pytest.raises(NocloneError, match=r"^--step-size 5: the PGD step size must be between 0 and 1 in pixel"):
        parse_step_size("5")


# -------------------------------------------------------------------------------------------- 4. noclone --help


def test_top_level_help_speaks_to_a_user():
    text = build_parser().format_help()
    assert "noclone: protect people's photos and models from being personalized (cloned)" in " ".join(text.split())
    assert "every subcommand maps onto" not in text  # the developer docstring
    start = text[text.index("start here:"):]
    for command in ("noclone demo", "noclone protect-images", "noclone protect-model", "noclone audit"):
        assert command in start


# ----------------------------------------------------------------------------------- 5. evaluate's printed table


def test_evaluate_prints_only_requested_metrics_and_keeps_the_json_complete(tmp_path, capsys):
    gen, ref = _renders(tmp_path / "gen", 64, identity=3), _renders(tmp_path / "ref", 64, identity=3)
    out = tmp_path / "eval.json"
    assert main(["evaluate", "--generated", str(gen), "--reference", str(ref), "--metrics", "ism",
                 "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "(n/a)" not in printed and "brisque" not in printed and "fdfr" not in printed
    assert "ism" in printed and "n_images" in printed and "n_references" in printed
    saved = json.loads(out.read_text())
    assert {"ism", "identity_match_rate", "fdfr", "brisque", "n_images"} <= set(saved)
    assert saved["fdfr"] is None and saved["brisque"] is None and saved["metrics"] == ["ism"]


def test_print_table_still_flags_a_requested_metric_that_is_undefined(capsys):
    from noclone.eval.evaluate import print_table

    result = {"ism": None, "identity_match_rate": 0.0, "fdfr": 1.0, "brisque": None, "n_images": 2,
              "n_references": 2, "backend": "dlib", "metrics": ["ism", "fdfr"], "details": {}}
    print_table(result)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in lines if line.split()[0] == "(n/a)"] == ["ism"]
    assert not any("brisque" in line for line in lines)


# -------------------------------------------------------------------- 6. the sandbox instruments on real photos


def test_shipped_rid_generator_warns_once_on_photos_bigger_than_its_world(tmp_path, caplog):
    from noclone.cloak import protect_folder
    from noclone.cloak.rid import RIDCloak

    big, small = _renders(tmp_path / "big", 128), _renders(tmp_path / "small", 64)
    with caplog.at_level(logging.WARNING):
        protect_folder("rid", big, tmp_path / "out-big")
    warnings = [r.getMessage() for r in caplog.records if "shipped RID generator" in r.getMessage()]
    assert len(warnings) == 1 and "noclone rid train" in warnings[0] and "Stable Diffusion" in warnings[0]
    assert json.loads((tmp_path / "out-big" / "cloak.json").read_text())["warnings"] == warnings
    protect_folder("rid", small, tmp_path / "out-small")
    assert json.loads((tmp_path / "out-small" / "cloak.json").read_text())["warnings"] == []

    from PIL import Image

    cloak = RIDCloak()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        for _ in range(2):  # the API path: once per cloak, however many calls
            cloak.protect([Image.open(big / "p0.png").convert("RGB")])
    assert len([r for r in caplog.records if "shipped RID generator" in r.getMessage()]) == 1
    assert len(cloak.warnings) == 1


def test_a_trained_rid_generator_is_not_warned_about(tmp_path):
    from PIL import Image

    from noclone.cloak.rid import RIDCloak, RIDConfig, RIDGenerator

    generator = RIDGenerator(RIDConfig(resolution=32, net=dict(channels=8)))
    generator.save_pretrained(tmp_path / "gen")
    cloak = RIDCloak(generator=tmp_path / "gen")
    cloak.protect([Image.new("RGB", (256, 200), (120, 90, 60))])
    assert cloak.warnings == [] and cloak.manifest()["warnings"] == []


def test_sandbox_evaluator_warns_on_images_that_are_not_64px(tmp_path, caplog, monkeypatch):
    import noclone.eval.evaluate as evaluate
    from noclone.eval.evaluate import evaluate_folders

    monkeypatch.setattr(evaluate, "_warned", set())  # the warning is once per process
    big, ref = _renders(tmp_path / "big", 128), _renders(tmp_path / "ref", 64)
    with caplog.at_level(logging.WARNING):
        result = evaluate_folders(big, ref, metrics=["ism"], json_out=tmp_path / "e.json")
        evaluate_folders(ref, big, metrics=["ism"])  # the references count too; logged once all the same
    logged = [r.getMessage() for r in caplog.records if "sandbox evaluator" in r.getMessage()]
    assert len(logged) == 1 and "meaningless" in logged[0] and "--backend dlib or arcface" in logged[0]
    assert result["warnings"] == logged
    assert json.loads((tmp_path / "e.json").read_text())["warnings"] == logged
    assert evaluate_folders(ref, ref, metrics=["ism"])["warnings"] == []
