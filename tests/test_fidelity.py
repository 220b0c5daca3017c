"""The fidelity card: the judges' thresholds (pure), and one end-to-end card on a tiny model (every effect runs)."""

from __future__ import annotations

import json

import pytest

from noclone.errors import NocloneError
from noclone.fidelity import effects as fx


def _rows(values: dict[str, list[float]], class_noun: str = "person", **labels) -> list[dict]:
    """Bench-like rows: {subject: [match rate per seed]}."""
    return [{"class_noun": class_noun, "subject": s, "seed": i, "identity_match_rate": v, "defence": "none",
             "transform": "none", "attack": "dreambooth", **labels}
            for s, seeds in values.items() for i, v in enumerate(seeds)]


def _ok(result: dict, name_part: str) -> bool | None:
    return next(c["ok"] for c in result["checks"] if name_part in c["name"])


def test_e1_worst_identity_and_mean_are_judged_per_class():
    good = {"dreambooth": _rows({"a": [1.0, 0.9], "b": [0.9, 1.0], "c": [0.7, 0.7]}),
            "lora": _rows({"a": [0.8, 0.8]}), "ti": _rows({"a": [0.5, 0.5]})}
    assert fx.judge_e1(good)["status"] == "fail"  # mean 0.867 < 0.90 although the worst is exactly 0.70
    assert _ok(fx.judge_e1(good), "worst identity") is True
    good["dreambooth"] = _rows({"a": [1.0, 1.0], "b": [1.0, 1.0], "c": [0.72, 0.70]})
    assert fx.judge_e1(good)["status"] == "pass"
    good["dreambooth"] = _rows({"a": [1.0, 1.0], "b": [1.0, 1.0], "c": [1.0, 1.0], "d": [0.69, 0.69]})
    assert _ok(fx.judge_e1(good), "worst identity") is False
    assert fx.judge_e1({})["status"] == "not measured"


def test_e4_halving_fdfr_and_rank():
    rows = (_rows({"a": [0.8, 0.8]}) + _rows({"a": [0.4, 0.4]}, defence="aspl")
            + _rows({"a": [0.3, 0.3]}, defence="fsmg") + _rows({"a": [0.9, 0.9]}, defence="photoguard"))
    for r in rows:
        r["fdfr"] = 0.5 if r["defence"] == "aspl" else 0.1
    assert fx.judge_e4(rows)["status"] == "pass"
    for r in rows:
        if r["defence"] == "aspl":
            r["identity_match_rate"] = 0.41  # 0.41 / 0.8 > 0.5: not halved
    assert _ok(fx.judge_e4(rows), "ASPL match / clean match") is False


def test_e5_needs_a_cloak_that_worked():
    rows = (_rows({"a": [0.9]}) + _rows({"a": [0.3]}, defence="aspl")
            + _rows({"a": [0.7]}, defence="aspl", transform="jpeg:75")
            + _rows({"a": [0.4]}, defence="aspl", transform="purify:0.1"))
    result = fx.judge_e5(rows)
    assert _ok(result, "jpeg:75") is True and _ok(result, "purify:0.1") is False and result["status"] == "fail"
    weak = (_rows({"a": [0.9]}) + _rows({"a": [0.85]}, defence="aspl")
            + _rows({"a": [0.9]}, defence="aspl", transform="jpeg:75"))
    result = fx.judge_e5(weak)
    assert result["status"] == "fail" and "nothing for a" in result["note"]
    assert _ok(result, "cloak took") is False and _ok(result, "jpeg:75") is None


def test_protection_judges():
    protected, other, clean = _rows({"a": [0.1, 0.2]}), _rows({"b": [0.85]}), _rows({"b": [0.9]})
    assert fx.judge_protection(protected, other, clean, "identity_match_rate", (2.2, 2.0))["status"] == "pass"
    assert fx.judge_protection(protected, other, clean, "identity_match_rate", (2.4, 2.0))["status"] == "fail"
    assert fx.judge_protection(protected, _rows({"b": [0.75]}), clean, "identity_match_rate", (2.0, 2.0))["status"] \
        == "fail"
    fired = [dict(r, backdoor_rate=0.9) for r in protected]
    quiet = [dict(r, backdoor_rate=0.05) for r in other]
    assert fx.judge_protection(fired, quiet, clean, "backdoor_rate")["status"] == "pass"
    assert fx.judge_protection(fired, fired, clean, "backdoor_rate")["status"] == "fail"


def test_config_refuses_bad_input(tmp_path):
    from noclone.fidelity.card import Card, FidelityConfig

    for bad, message in ((dict(effects=("E9",)), "unknown effect"), (dict(identities=0), "--identities"),
                         (dict(classes=("horse",)), "sandbox classes"), (dict(model=str(tmp_path / "nope")), "no such")):
        with pytest.raises(NocloneError, match=message):
            Card(FidelityConfig(out=str(tmp_path / "card"), **bad))


def test_cli_bad_input_is_one_line(tmp_path, capsys):
    from noclone.cli import main

    assert main(["sandbox", "fidelity", "--out", str(tmp_path / "c"), "--seeds", "0,x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--seeds" in err[0]


def test_tiny_card_end_to_end(tmp_path, tiny_model_dir):
    """Every effect measured on a tiny random model: the card is written, each effect has a verdict and figures,
    and a rerun measures nothing again."""
    from noclone.fidelity.card import Card, FidelityConfig

    tiny = {"steps": 2, "batch_size": 1, "num_class_images": 2, "class_image_steps": 2}
    config = FidelityConfig(
        model=str(tiny_model_dir), out=str(tmp_path / "card"), seeds=(0,), identities=2, classes=("person",),
        images=2, base_images=4, size=32, generation_steps=2, device="cpu", progress=False,
        effects=("E2", "E3", "E1", "E4", "E5", "E6", "E7"),  # stages outside a bench config first
        attack_settings={m: tiny for m in ("dreambooth", "lora", "ti")},
        defence_settings={"apdm": {"outer_steps": 1, "inner_steps": 1, **{k: tiny[k] for k in ("batch_size", "num_class_images", "class_image_steps")}},
                          "persguard": {"steps": 1, "num_class_images": 2, "class_image_steps": 2},
                          "aspl": {"steps": 1, "pgd_steps": 1, "surrogate_steps": 1},
                          "fsmg": {"steps": 1, "surrogate_steps": 1}, "advdm": {"steps": 1}, "photoguard": {"steps": 1}})
    card = Card(config).run()
    assert [e["key"] for e in card["effects"]] == list(fx.EFFECT_KEYS)
    for effect in card["effects"]:
        assert effect["status"] in ("pass", "fail"), effect
        assert effect["checks"] and any(c["value"] is not None for c in effect["checks"]), effect
    on_disk = json.loads((tmp_path / "card" / "fidelity.json").read_text())
    assert on_disk["effects"] == card["effects"]
    page = (tmp_path / "card" / "fidelity.html").read_text()
    assert "E7" in page and "data:image/jpeg;base64" in page
    assert 0 <= card["measurements"]["E1"]["vae_ceiling"]["person"]["worst"] <= 1
    e3 = card["measurements"]["E3"]
    assert e3["text"]["class_distance"] > 0 and e3["guidance"]["person"]["guidance_gap"] > 0
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "card" / "effects").iterdir()}
    Card(config).run()
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "card" / "effects").iterdir()} == mtimes
