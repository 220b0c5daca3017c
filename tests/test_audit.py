"""`noclone audit` on the tiny 32 px pipeline: the battery's parsing, the verdict's arithmetic, model surgery, both
audit levels end to end, resume, shards, and one-line refusals."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml

from noclone.audit.battery import Attacker, load_battery, parse_battery
from noclone.audit.threats import THREAT_MODELS, defence_key, threat_model
from noclone.audit.verdict import steps_to_reach, verdict
from noclone.cli import main
from noclone.errors import NocloneError

TINY = {"batch_size": 1, "num_class_images": 2, "class_image_steps": 2, "steps": 2}


# ------------------------------------------------------------------------------------------------ the battery


def test_shipped_batteries_parse_and_cover_the_issue():
    quick, full = load_battery("quick"), load_battery("full")
    assert quick.relearning == [0.5, 1.0, 2.0, 4.0] and quick.attack == "dreambooth"
    kinds = {a.kind for a in full.attackers}
    assert kinds == {"personalization", "surgery", "purification"}
    assert quick.unprotected == "all" and full.unprotected == "all"
    ops = {(a.op, a.group) for a in full.attackers if a.kind == "surgery"}
    assert {("swap_vae", None), ("swap_text_encoder", None), ("graft", "down"), ("graft", "mid"), ("graft", "up"),
            ("generic_finetune", None)} <= ops
    transforms = {a.transform for a in full.attackers if a.kind == "purification"}
    assert {"jpeg:75", "jpeg:50", "resize:0.5", "purify:0.1"} <= transforms and any("gridpure" in t for t in transforms)
    assert {a.method for a in full.attackers} == {"dreambooth", "lora", "ti"}
    # levels: surgery only against weights, purification and mixed-in clean photos only against cloaks
    model_names = {a.name for a in full.for_level("model")}
    cloak_names = {a.name for a in full.for_level("cloak")}
    assert "vae-swap" in model_names and "vae-swap" not in cloak_names
    assert "jpeg-75" in cloak_names and "jpeg-75" not in model_names and "clean-mixed-in" not in model_names


@pytest.mark.parametrize("change, expected", [
    (lambda b: b["attackers"].append({"name": "x", "kind": "magic"}), "kind 'magic'"),
    (lambda b: b["attackers"].append({"name": "x", "kind": "surgery", "op": "graft"}), "graft needs group"),
    (lambda b: b["attackers"].append({"name": "x", "kind": "surgery", "op": "swap_vae", "when": "later"}), "when"),
    (lambda b: b["attackers"].append({"name": "x", "kind": "purification"}), "needs a transform"),
    (lambda b: b["attackers"].append({"name": "x", "kind": "purification", "transform": "jpeg:500"}), "quality"),
    (lambda b: b["attackers"].append({"name": "x", "lr_mult": -1}), "lr_mult"),
    (lambda b: b["attackers"].append({"name": "x", "token": "two words"}), "token"),
    (lambda b: b["attackers"].append({"name": "x", "op": "swap_vae"}), "surgery settings"),
    (lambda b: b["attackers"].append({"name": "preset"}), "share a name"),
    (lambda b: b["attackers"].append({"name": "x", "colour": 1}), "unknown key(s) colour"),
    (lambda b: b.update(relearning=[2, 4]), "must include 1"),
    (lambda b: b.update(unprotected="some"), "unprotected must be"),
])
def test_battery_errors_name_the_attacker(change, expected):
    raw = {"attackers": [{"name": "preset"}], "relearning": [1]}
    change(raw)
    with pytest.raises(NocloneError, match=None) as info:
        parse_battery(raw, "mine")
    assert expected in str(info.value) and "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------------ the verdict


def _row(side, attacker, match, length=1.0, seed=0, **extra):
    return {"job": f"{side}.{attacker}.x{length:g}.s{seed}", "side": side, "attacker": attacker, "length": length,
            "seed": seed, "identity_match_rate": match, **extra}


def test_steps_to_reach_interpolates_and_says_never():
    curve = [(0.5, 0.0), (1.0, 0.1), (2.0, 0.5), (4.0, 0.9)]
    assert steps_to_reach(curve, 0.3) == pytest.approx(1.5)
    assert steps_to_reach(curve, 0.9) == 4.0
    assert steps_to_reach(curve, 0.95) is None
    assert steps_to_reach([(0.5, 0.8)], 0.6) == 0.5
    assert steps_to_reach(curve, None) is None


def test_verdict_worst_case_claims_and_collateral():
    attackers = {"preset": Attacker("preset", "personalization"),
                 "vae-swap": Attacker("vae-swap", "surgery", op="swap_vae", when="after"),
                 "lr-3x": Attacker("lr-3x", "personalization", lr_mult=3)}
    rows = [_row("protected", "preset", 0.05), _row("protected", "preset", 0.15, seed=1),
            _row("protected", "vae-swap", 0.9), _row("protected", "lr-3x", 0.3), _row("unprotected", "lr-3x", 0.95),
            _row("unprotected", "preset", 0.8), _row("protected", "preset", 0.7, length=4.0),
            _row("unprotected", "preset", 0.9, length=4.0),
            _row("collateral-protected", "preset", 0.5), _row("collateral-unprotected", "preset", 0.75),
            {"job": "g", "side": "generic-protected", "attacker": None, "length": 1.0, "seed": 0, "fid": 3.0}]
    v = verdict(rows, attackers, threat_model("apdm+decoder"), 0.2, [1.0, 4.0])
    assert v["passed"] is False
    assert v["worst"] == {"attacker": "vae-swap", "identity_match_rate": 0.9}
    assert v["worst_within_claim"] == {"attacker": "lr-3x", "identity_match_rate": 0.3}
    preset = next(t for t in v["table"] if t["attacker"] == "preset")
    assert preset["identity_match_rate"] == pytest.approx(0.1) and preset["n_seeds"] == 2
    assert preset["drop_vs_unprotected"] == pytest.approx(0.7)
    lr3 = next(t for t in v["table"] if t["attacker"] == "lr-3x")  # its own unprotected reference, not the preset's
    assert lr3["unprotected_is_own"] and lr3["drop_vs_unprotected"] == pytest.approx(0.65)
    assert not next(t for t in v["table"] if t["attacker"] == "vae-swap")["unprotected_is_own"]
    assert v["relearning"]["curves"]["protected"] == [[1.0, 0.1], [4.0, 0.7]]
    assert v["relearning"]["length_to_reach_unprotected"] is None  # 0.7 never reaches 0.8
    assert v["collateral"]["other_subject_change"] == pytest.approx(-0.25)
    assert v["collateral"]["generic_protected"] == {"fid": 3.0}
    # the same rows judged against plain APDM: the VAE swap is inside its claim
    v2 = verdict(rows, attackers, threat_model("apdm"), 0.95, [1.0, 4.0])
    assert v2["passed"] is True and v2["worst_within_claim"]["attacker"] == "vae-swap"
    assert verdict([], attackers, threat_model("apdm"), 0.2, [1.0])["passed"] is None


def test_threat_models_from_cards():
    assert defence_key("model", {"method": "apdm", "implant": "unet"}) == "apdm"
    assert defence_key("model", {"method": "apdm", "implant": "both"}) == "apdm+decoder"
    assert defence_key("model", {"method": "persguard", "implant": "decoder"}) == "persguard-decoder"
    assert defence_key("cloak", {"method": "rid"}) == "rid"
    assert defence_key("cloak", None) == "unknown" and defence_key("model", {"method": "?"}) == "unknown"
    swap = Attacker("vae-swap", "surgery", op="swap_vae")
    assert THREAT_MODELS["apdm+decoder"].outside(swap) and not THREAT_MODELS["apdm"].outside(swap)
    mixed = Attacker("mixed", "personalization", mix_clean=0.4)
    assert THREAT_MODELS["aspl"].outside(mixed) and not THREAT_MODELS["aspl"].outside(Attacker("p", "personalization"))


# ------------------------------------------------------------------------------------------------ surgery


@pytest.fixture(scope="module")
def base_model_dir(tmp_path_factory):
    """Another random tiny pipeline: the 'unprotected original' of the audits below."""
    from noclone.models.architectures import build_pipeline

    out = tmp_path_factory.mktemp("tiny-base") / "model"
    build_pipeline("tiny", seed=1).save_pretrained(str(out), safe_serialization=True)
    return out


def test_surgery_changes_exactly_what_it_says(tiny_model_dir, base_model_dir):
    from noclone.attacks.surgery import SurgeryConfig, apply_surgery
    from noclone.models.pipeline import load_pipeline

    base = load_pipeline(base_model_dir, device="cpu")
    before = load_pipeline(tiny_model_dir, device="cpu")
    sd0 = {k: v.clone() for k, v in before.unet.state_dict().items()}

    pipe = load_pipeline(tiny_model_dir, device="cpu")
    apply_surgery(pipe, base, SurgeryConfig("graft", "up"))
    for name, tensor in pipe.unet.state_dict().items():
        expected = base.unet.state_dict()[name] if name.startswith("up_blocks.") else sd0[name]
        assert torch.equal(tensor, expected), name

    pipe = load_pipeline(tiny_model_dir, device="cpu")
    apply_surgery(pipe, base, SurgeryConfig("swap_vae"))
    assert all(torch.equal(a, b) for a, b in zip(pipe.vae.state_dict().values(), base.vae.state_dict().values()))
    assert all(torch.equal(a, b) for a, b in zip(pipe.unet.state_dict().values(), sd0.values()))

    pipe = load_pipeline(tiny_model_dir, device="cpu")
    done = apply_surgery(pipe, base, SurgeryConfig("generic_finetune", steps=2, n_images=2))
    assert done["steps"] == 2 and done["n_images"] == 2
    assert any(not torch.equal(a, b) for a, b in zip(pipe.unet.state_dict().values(), sd0.values()))

    with pytest.raises(NocloneError, match="needs the base model"):
        apply_surgery(pipe, None, SurgeryConfig("swap_vae"))
    with pytest.raises(NocloneError, match="group"):
        SurgeryConfig("graft", "sideways").validate()


# ------------------------------------------------------------------------------------------------ end to end


def _battery_file(tmp_path, attackers, relearning=(1, 2), unprotected="preset"):
    path = tmp_path / "battery.yaml"
    path.write_text(yaml.safe_dump({"attack": "dreambooth", "attack_settings": TINY, "relearning": list(relearning),
                                    "class_words": {"person": "human"}, "attackers": attackers,
                                    "unprotected": unprotected}))
    return path


def _protected(tmp_path, tiny_model_dir, card):
    model = tmp_path / "protected"
    shutil.copytree(tiny_model_dir, model)
    (model / "protection.json").write_text(json.dumps(card))
    return model


MODEL_ATTACKERS = [{"name": "preset"}, {"name": "new-identifier", "token": "phol"},
                   {"name": "other-word", "class_word": True},
                   {"name": "vae-swap", "kind": "surgery", "op": "swap_vae", "when": "after"},
                   {"name": "graft-up", "kind": "surgery", "op": "graft", "group": "up"},
                   {"name": "lora", "method": "lora", "settings": {"lora_rank": 2}},
                   {"name": "jpeg", "kind": "purification", "transform": "jpeg:75"}]


def _model_args(tmp_path, tiny_model_dir, base_model_dir, subject_dir, out, battery):
    protected = _protected(tmp_path, tiny_model_dir, {"method": "apdm", "implant": "both",
                                                      "subjects": [{"class_noun": "person"}]})
    return ["-q", "audit", "--model", str(protected), "--images", str(subject_dir), "--base", str(base_model_dir),
            "--other-images", str(subject_dir), "--battery", str(battery), "--images-per-prompt", "2",
            "--generation-steps", "2", "--generic-samples", "4", "--device", "cpu", "--out", str(out)]


def test_model_level_audit_end_to_end_and_resume(tmp_path, capsys, monkeypatch, tiny_model_dir, base_model_dir,
                                                 subject_dir):
    out = tmp_path / "audit"
    args = _model_args(tmp_path, tiny_model_dir, base_model_dir, subject_dir, out,
                       _battery_file(tmp_path, MODEL_ATTACKERS, unprotected="all"))
    assert main(args) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "audit: " in printed and "audit.html" in printed
    result = json.loads((out / "audit.json").read_text())
    assert result["level"] == "model" and result["defence"] == "apdm+decoder" and not result["missing_jobs"]
    names = {t["attacker"] for t in result["table"]}
    assert names == {"preset", "new-identifier", "other-word", "vae-swap", "graft-up", "lora"}  # no purification
    rows = {r["job"]: r for r in result["rows"]}
    assert rows["protected.new-identifier.x1.s0"]["prompts"] == ["a photo of phol person"]
    assert rows["protected.other-word.x1.s0"]["prompts"] == ["a photo of sks human"]
    assert rows["protected.preset.x2.s0"]["steps"] == 2 * rows["protected.preset.x1.s0"]["steps"]
    assert {"unprotected.preset.x1.s0", "unprotected.preset.x2.s0", "collateral-protected.preset.x1.s0",
            "collateral-unprotected.preset.x1.s0", "generic-protected.samples.x1.s0", "generic-base.samples.x1.s0",
            "generic-floor.samples.x1.s0"} <= set(rows)
    assert rows["generic-protected.samples.x1.s0"]["fid"] is not None
    own = {j for j in rows if j.startswith("unprotected.")}  # every personalization also without the protection
    assert own == {"unprotected.preset.x1.s0", "unprotected.preset.x2.s0", "unprotected.new-identifier.x1.s0",
                   "unprotected.other-word.x1.s0", "unprotected.lora.x1.s0"}
    vae = next(t for t in result["table"] if t["attacker"] == "vae-swap")
    assert not vae["within_claim"] and "VAE" in vae["outside_claim"][0]
    worst = max(result["table"], key=lambda t: t["identity_match_rate"])
    assert result["worst"]["identity_match_rate"] == worst["identity_match_rate"]
    assert result["passed"] is (worst["identity_match_rate"] <= 0.2)
    # the VAE swap really generated with the base model's VAE: its images differ from the preset's
    from noclone.data.images import load_image_folder

    import numpy as np

    a = [np.asarray(im) for _, im in load_image_folder(out / rows["protected.vae-swap.x1.s0"]["images"])]
    b = [np.asarray(im) for _, im in load_image_folder(out / rows["protected.preset.x1.s0"]["images"])]
    assert any(not np.array_equal(x, y) for x, y in zip(a, b))
    card = json.loads((out / "protection.json").read_text())
    assert card["method"] == "apdm" and card["audit"]["worst"] == result["worst"]
    assert (out / "audit-relearning.png").stat().st_size > 1000
    page = (out / "audit.html").read_text()
    assert "audit-relearning.png" in page and "vae-swap" in page and "data:image/jpeg" in page
    assert "the subject: references" in page and "the subject: subject photos" in page
    assert "What it costs:" in page and "another subject of the class clones at" in page
    # the input model is untouched
    assert json.loads((tmp_path / "protected" / "protection.json").read_text()).get("audit") is None

    # rerun: nothing trains again (every row is found); with the rows gone they come back from the cache alone
    def boom(*a, **k):
        raise AssertionError("trained again")

    monkeypatch.setattr("noclone.attacks.base.Personalization.train", boom)
    assert main(args) == 0
    shutil.rmtree(out / "rows")
    assert main(args) == 0
    again = json.loads((out / "audit.json").read_text())
    assert [t["identity_match_rate"] for t in again["table"]] == [t["identity_match_rate"] for t in result["table"]]


def test_cloak_level_audit_mixes_clean_photos_and_purifies(tmp_path, capsys, monkeypatch, tiny_model_dir,
                                                           subject_dir):
    from noclone.attacks.purify import apply_transform
    from noclone.data.images import _image_files, file_sha256, load_image_folder

    cloaked = tmp_path / "cloaked"
    cloaked.mkdir()
    for path, image in load_image_folder(subject_dir):
        apply_transform("noise", [image], seed=3, std=0.1)[0].save(cloaked / f"{path.stem}.png")
    (cloaked / "cloak.json").write_text(json.dumps({"method": "aspl", "settings": {"class_noun": "person"}}))
    attackers = [{"name": "preset"}, {"name": "clean-mixed-in", "mix_clean": 0.5},
                 {"name": "jpeg", "kind": "purification", "transform": "jpeg:75"},
                 {"name": "vae-swap", "kind": "surgery", "op": "swap_vae", "when": "after"}]
    out = tmp_path / "audit"
    args = ["-q", "audit", "--cloaked", str(cloaked), "--clean", str(subject_dir), "--model", str(tiny_model_dir),
            "--battery", str(_battery_file(tmp_path, attackers, relearning=[1])), "--images-per-prompt", "2",
            "--generation-steps", "2", "--device", "cpu", "--out", str(out)]
    before = {p.name: file_sha256(p) for p in _image_files(cloaked)}
    assert main(args) == 0, capsys.readouterr().err
    result = json.loads((out / "audit.json").read_text())
    assert result["defence"] == "aspl" and result["inputs"]["class_noun"] == "person"  # read from cloak.json
    assert {t["attacker"] for t in result["table"]} == {"preset", "clean-mixed-in", "jpeg"}  # no surgery on cloaks
    mixed = next(t for t in result["table"] if t["attacker"] == "clean-mixed-in")
    assert not mixed["within_claim"]
    assert result["unprotected_match"] is not None  # the clean photos are the reference
    # the mixed set: half the photos are the clean ones, byte for byte
    stage = next((out / "cache" / "mixed_photos").iterdir()) / "images"
    clean_hashes = {file_sha256(p) for p in _image_files(subject_dir)}
    cloaked_hashes = set(before.values())
    mixed_hashes = [file_sha256(p) for p in _image_files(stage)]
    assert sum(h in clean_hashes for h in mixed_hashes) == 2 and sum(h in cloaked_hashes for h in mixed_hashes) == 2
    assert {p.name: file_sha256(p) for p in _image_files(cloaked)} == before  # inputs never modified


def test_shards_split_the_jobs_and_the_verdict_waits_for_both(tmp_path, capsys, tiny_model_dir, base_model_dir,
                                                              subject_dir):
    out = tmp_path / "audit"
    battery = _battery_file(tmp_path, [{"name": "preset"}, {"name": "lr-3x", "lr_mult": 3}], relearning=[1])
    args = _model_args(tmp_path, tiny_model_dir, base_model_dir, subject_dir, out, battery)
    assert main(args + ["--shard", "1/2"]) == 0
    first = json.loads((out / "audit.json").read_text())
    assert first["missing_jobs"] and "still to run" in capsys.readouterr().out
    assert main(args + ["--shard", "2/2"]) == 0
    second = json.loads((out / "audit.json").read_text())
    assert not second["missing_jobs"]
    assert {r["job"] for r in second["rows"]} >= set(first["missing_jobs"])


@pytest.mark.parametrize("extra, expected", [
    (["--cloaked", "{subject}"], "give --images"),
    ([], None),
    (["--threshold", "1.5"], "--threshold"),
    (["--battery", "nosuch"], "not a shipped battery"),
    (["--seeds", "0,0"], "--seeds"),
    (["--base", "{subject}"], "not a diffusers pipeline"),
    (["--other-images", "{missing}"], "not a directory"),
])
def test_refusals_are_one_line_and_write_nothing(tmp_path, capsys, tiny_model_dir, subject_dir, extra, expected):
    out = tmp_path / "out"
    fill = {"subject": str(subject_dir), "missing": str(tmp_path / "nope")}
    args = ["-q", "audit", "--model", str(tiny_model_dir), "--out", str(out), "--class-noun", "person"]
    if expected is None:  # a model-level audit needs --images
        expected = "give --images"
    else:
        args += ["--images", str(subject_dir)]
    args += [a.format(**fill) for a in extra]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("noclone: error:") and expected in err, err
    assert not out.exists()


def test_cloak_audit_refuses_unequal_folders_and_unknown_class(tmp_path, capsys, tiny_model_dir, subject_dir):
    few = tmp_path / "few"
    few.mkdir()
    for p in list(sorted(subject_dir.iterdir()))[:2]:
        shutil.copy(p, few / p.name)
    out = tmp_path / "out"
    assert main(["-q", "audit", "--cloaked", str(few), "--clean", str(subject_dir), "--model", str(tiny_model_dir),
                 "--class-noun", "person", "--out", str(out)]) == 2
    assert "same photos" in capsys.readouterr().err
    assert main(["-q", "audit", "--cloaked", str(few), "--clean", str(few), "--model", str(tiny_model_dir),
                 "--out", str(out)]) == 2
    assert "--class-noun is required" in capsys.readouterr().err
    assert not out.exists()


def test_list_and_print_batteries(capsys):
    assert main(["audit", "--list-batteries"]) == 0
    assert capsys.readouterr().out.split() == ["full", "quick"]
    assert main(["audit", "--print-battery", "quick"]) == 0
    assert "relearning" in capsys.readouterr().out
