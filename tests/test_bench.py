"""`noclone bench` on the tiny 32 px pipeline: config errors, an end-to-end run, rerun, resume, report, cache keys."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from noclone.bench import registry, stages
from noclone.bench.config import AttackSpec, DefenceSpec, load_raw, preset_names, validate
from noclone.bench.runner import cells, locked, parse_shard, prepare_out, render_report, run_bench, shard_cells
from noclone.errors import NocloneError
from noclone.cli import main

torch.set_num_threads(1)

METRICS = ("ism", "identity_match_rate", "fdfr", "fid")


# ------------------------------------------------------------------------------------------------- fixtures


def _fake_cloak(images_dir: Path, out_dir: Path, pipe, settings: dict) -> None:
    """A stand-in image cloak: a deterministic +-strength checker perturbation."""
    from noclone.data.images import load_image_folder

    out_dir.mkdir(parents=True, exist_ok=True)
    for path, image in load_image_folder(images_dir):
        a = np.asarray(image, dtype=np.int16)
        sign = np.where((np.indices(a.shape[:2]).sum(0) % 2)[..., None] == 0, 1, -1)
        Image.fromarray(np.clip(a + sign * int(settings.get("strength", 8)), 0, 255).astype(np.uint8)).save(
            out_dir / f"{path.stem}.png")


def _fake_flip(images, spec, pipe, seed):
    return [im.transpose(Image.FLIP_LEFT_RIGHT) for im in images]


@pytest.fixture(autouse=True)
def fakes(monkeypatch):
    """A fake cloak and a fake transform, registered by name as real plug-ins are."""
    monkeypatch.setitem(registry.DEFENCES, "fakecloak",
                        registry.Defence("cloak", run=_fake_cloak, needs_model=lambda: False))
    monkeypatch.setitem(registry.TRANSFORMS, "fakeflip", registry.Transform(lambda spec: None, _fake_flip))


def tiny_raw(model_dir, subject_dir) -> dict:
    tiny = {"batch_size": 1, "num_class_images": 2, "class_image_steps": 2}
    return {
        "name": "tiny",
        "models": [{"name": "tiny", "path": str(model_dir)}],
        "subjects": [{"class": "person", "photos": str(subject_dir), "name": "alice"}],
        "defences": ["none", {"fakecloak": {"strength": 12}},
                     {"apdm": {"outer_steps": 1, "inner_steps": 1, "lr_protect": 1e-3, **tiny}}],
        "attacks": [{"dreambooth": {"steps": 2, **tiny}}],
        "transforms": ["none"],
        "images_per_prompt": 2,
        "generation": {"steps": 2},
        "metrics": list(METRICS),
        "device": "cpu",
    }


def _numbers(rows: list[dict]) -> list[tuple]:
    return [(r["cell_id"], r["defence"], r["transform"], r["attack"], r["seed"]) + tuple(r[m] for m in METRICS)
            for r in rows]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model_dir, subject_dir):
    """One uninterrupted run of the tiny config (shared by the tests below)."""
    mp = pytest.MonkeyPatch()
    mp.setitem(registry.DEFENCES, "fakecloak", registry.Defence("cloak", run=_fake_cloak, needs_model=lambda: False))
    config = validate(tiny_raw(tiny_model_dir, subject_dir))
    out = tmp_path_factory.mktemp("bench") / "run"
    try:
        result = run_bench(config, out, progress=False)
    finally:
        mp.undo()
    return config, out, result


def _write(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


# ------------------------------------------------------------------------------------------- config errors


@pytest.mark.parametrize("change, expected", [
    (lambda r: r["defences"].append("nosuchdefence"), "unknown defence 'nosuchdefence'"),
    (lambda r: r.pop("attacks"), "missing required key(s): attacks"),
    (lambda r: r.update(transforms=["none", ":75"]), "transforms[1]"),
    (lambda r: r.update(transforms=["none", "nosuchtransform:3"]), "transforms[1] 'nosuchtransform:3'"),
    (lambda r: r["attacks"][0]["dreambooth"].update(stepz=3), "unknown setting stepz"),
    (lambda r: r["defences"][2]["apdm"].update(beta=-1), "beta"),
    (lambda r: r.update(colour="red"), "unknown config key(s) colour"),
    (lambda r: r.update(seeds=[0, 0]), "seeds: duplicates"),
])
def test_config_errors_exit_2_with_one_line(tmp_path, capsys, tiny_model_dir, subject_dir, change, expected):
    raw = tiny_raw(tiny_model_dir, subject_dir)
    change(raw)
    out = tmp_path / "out"
    assert main(["-q", "bench", str(_write(tmp_path, raw)), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("noclone: error:") and expected in err, err
    assert not out.exists()


def test_sd15_preset_says_what_is_missing_in_one_line(tmp_path, capsys):
    assert "sd15-faces" in preset_names() and "sandbox-quick" in preset_names() and "sandbox-full" in preset_names()
    out = tmp_path / "out"
    assert main(["-q", "bench", "--preset", "sd15-faces", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for needed in ("models[0].path", "subjects[0].identities_dir", "evaluation.arcface_models"):
        assert needed in err
    assert not out.exists()


def test_presets_parse_and_quick_validates():
    for name in preset_names():
        raw, _ = load_raw(preset=name)
        assert raw["name"] == name and raw["defences"] and raw["attacks"]
    config = validate(load_raw(preset="sandbox-quick")[0])
    assert [d.method for d in config.defences] == ["none", "apdm"] and config.images_per_prompt == 8
    assert len(cells(config)) == 2


def test_yaml_forms_and_overrides(tmp_path, tiny_model_dir, subject_dir):
    raw = tiny_raw(tiny_model_dir, subject_dir)
    raw["attacks"] = ["dreambooth", {"name": "adaptive", "method": "dreambooth", "lr_mult": 3, "steps_mult": 2,
                                     "token": "ohwx", "lr": "2e-4"}]
    path = _write(tmp_path, raw)
    config = validate(*load_raw(path, overrides=["images_per_prompt=3", "attacks.0={dreambooth: {steps: 5}}"]))
    assert config.images_per_prompt == 3
    plain, adaptive = (a.personalization("person", 0) for a in config.attacks)
    assert plain.steps == 5
    from noclone.attacks.base import PRESETS

    assert adaptive.lr == pytest.approx(6e-4) and adaptive.token == "ohwx"
    assert adaptive.steps == 2 * PRESETS["sandbox"]["dreambooth"]["steps"]


# --------------------------------------------------------------------------------------------- end to end


def test_end_to_end_writes_db_csv_json_report(finished, capsys):
    config, out, result = finished
    for name in ("results.sqlite", "results.csv", "results.json", "report.html"):
        assert (out / name).is_file(), name
    rows = result["rows"]
    assert [r["defence"] for r in rows] == ["none", "fakecloak", "apdm"]
    for r in rows:
        assert r["n_images"] == 2 and r["error"] is None
        for m in METRICS:
            assert isinstance(r[m], float)
        assert r["t_personalize"] > 0 and r["t_generate"] > 0 and r["peak_rss_mb"] > 0
    assert rows[1]["t_cloak"] is not None and rows[2]["t_protect"] > 0
    assert result["computed"]["personalized"] == 3 and result["computed"]["protected_model"] == 1
    with sqlite3.connect(out / "results.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM results").fetchone()[0] == 3
    assert len((out / "results.csv").read_text().strip().splitlines()) == 4
    assert len(json.loads((out / "results.json").read_text())["rows"]) == 3
    html = (out / "report.html").read_text()
    assert "<svg" in html and "data:image/png;base64," in html and "fakecloak" in html and "Timing" in html
    # the cloak really changed the attacker's photos
    cloaked = out / rows[1]["artifacts"]["photos"]
    assert cloaked.is_dir() and "cloaked_photos" in str(cloaked)


def test_rerun_computes_nothing_new(finished):
    config, out, first = finished
    again = run_bench(config, out, progress=False)
    assert again["computed"] == {}
    assert _numbers(again["rows"]) == _numbers(first["rows"])
    assert [r["t_total"] for r in again["rows"]] == [r["t_total"] for r in first["rows"]]


def test_killed_run_resumes_to_identical_results(tmp_path, monkeypatch, finished, tiny_model_dir, subject_dir):
    _, _, uninterrupted = finished
    raw = tiny_raw(tiny_model_dir, subject_dir)
    raw["defences"] = raw["defences"][:2]  # none + fakecloak: the same cells (ids) as the first two rows above
    config = validate(raw)
    out = tmp_path / "killed"
    real = stages.generated
    calls = {"n": 0}

    def dies_on_second_call(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated kill")
        return real(*args, **kwargs)

    monkeypatch.setattr(stages, "generated", dies_on_second_call)
    with pytest.raises(KeyboardInterrupt):
        run_bench(config, out, progress=False)
    monkeypatch.setattr(stages, "generated", real)
    with sqlite3.connect(out / "results.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM results").fetchone()[0] == 1
    leftover = out / "cache" / "generated" / ".deadbeef.tmp-123456"  # what a SIGKILL mid-stage leaves
    leftover.mkdir(parents=True)
    resumed = run_bench(config, out, progress=False)
    assert not leftover.exists()
    # only the killed stage and what follows it ran again: photos, cloak and attack came from the cache
    assert resumed["computed"] == {"generated": 1, "metrics": 1}
    assert _numbers(resumed["rows"]) == _numbers(uninterrupted["rows"][:2])


def test_shards_split_the_cells_and_together_equal_one_run(tmp_path, finished):
    config, _, uninterrupted = finished
    every = cells(config)
    halves = [shard_cells(every, (i, 2)) for i in (1, 2)]
    assert sorted(c.position for half in halves for c in half) == [c.position for c in every]
    for half in halves:  # a defence's cells stay in one shard, so its protected model is computed once
        assert len({c.defence.name for c in half}) == len(half)  # one attack, one transform: one cell per defence
    out = tmp_path / "sharded"
    first = run_bench(config, out, progress=False, shard=(1, 2))
    assert {r["defence"] for r in first["rows"]} == {c.defence.name for c in halves[0]}
    second = run_bench(config, out, progress=False, shard=(2, 2))
    assert _numbers(second["rows"]) == _numbers(uninterrupted["rows"])
    assert "apdm" in (out / "report.html").read_text()


def test_shard_locks(tmp_path, finished):
    config, _, _ = finished
    out = prepare_out(tmp_path / "locks")
    leftover = out / "cache" / "generated" / ".deadbeef.tmp-123456"
    leftover.mkdir(parents=True)
    cleaned = []
    with locked(out, (1, 2), when_alone=lambda: cleaned.append(1)):
        assert cleaned == [1]  # the first run in the folder may clean up
        with locked(out, (2, 2), when_alone=lambda: cleaned.append(2)):
            assert cleaned == [1]  # not while another shard is at work
        with pytest.raises(NocloneError, match="shard 1/2 is already running"):
            with locked(out, (1, 2)):
                pass
        with pytest.raises(NocloneError, match="another noclone bench is running"):
            run_bench(config, out, progress=False)
    with locked(out):  # all released
        pass
    with pytest.raises(NocloneError, match="I must be between 1 and N"):
        parse_shard("0/2")
    assert parse_shard("2/3") == (2, 3)


def test_report_rerenders_from_db_without_computing(finished, monkeypatch, capsys):
    _, out, _ = finished
    (out / "report.html").unlink()

    def forbidden(*args, **kwargs):
        raise AssertionError("bench report must not compute")

    for name in ("subject_photos", "protected_model", "cloaked_photos", "transformed_photos", "personalized",
                 "generated", "metrics"):
        monkeypatch.setattr(stages, name, forbidden)
    assert main(["-q", "bench", "report", str(out)]) == 0
    assert "report.html" in capsys.readouterr().out
    assert "<svg" in (out / "report.html").read_text()
    assert render_report(out) == out / "report.html"
    assert "data:image/png" in (out / "report.html").read_text()
    assert main(["-q", "bench", "report", str(out), "--image-format", "jpeg", "--images-per-cell", "1"]) == 0
    smaller = (out / "report.html").read_text()
    assert "data:image/jpeg" in smaller and "data:image/png" not in smaller
    assert main(["-q", "bench", "report", str(out), "--images-per-cell", "0"]) == 2


def test_dry_run_lists_done_cells(finished, tmp_path, capsys, tiny_model_dir, subject_dir):
    _, out, _ = finished
    path = _write(tmp_path, tiny_raw(tiny_model_dir, subject_dir))
    assert main(["-q", "bench", str(path), "--out", str(out), "--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert sum(line.startswith("done") for line in lines) == 3 and "3 cell(s)" in lines[-1]


def test_refuses_a_foreign_non_empty_folder(tmp_path, capsys, tiny_model_dir, subject_dir):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "thesis.tex").write_text("keep me")
    path = _write(tmp_path, tiny_raw(tiny_model_dir, subject_dir))
    assert main(["-q", "bench", str(path), "--out", str(tmp_path / "out")]) == 2
    assert "not a noclone bench folder" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- cache keys


class KeyCache(stages.Cache):
    """Records each stage's key instead of building anything."""

    def __init__(self):
        super().__init__(Path("/nonexistent"))
        self.keys: dict[str, str] = {}

    def run(self, stage, inputs, build, output=""):
        key = stages.stage_key(stage, inputs)
        self.keys[stage] = key
        return stages.Ref(key, Path("/nonexistent") / key, stage, {"kind": "model"})


def _keys(attack: AttackSpec, defence_settings: dict, transform: str = "fakeflip", seed: int = 0,
          photos_key: str = "p" * 64) -> dict:
    from noclone.bench.config import BenchConfig, SubjectSpec, TransformSpec

    cache, runtime = KeyCache(), stages.Runtime("cpu", "fp32", False)
    subject = SubjectSpec("s", "person", identity=2_000_000)
    model, photos = stages.Ref("m" * 64, Path("/m")), stages.Ref(photos_key, Path("/p"))
    defence = DefenceSpec("apdm", "apdm", "model", defence_settings)
    protected = stages.protected_model(cache, model, photos, subject, defence, runtime)
    moved = stages.transformed_photos(cache, model, photos, transform, seed, runtime)
    attacked = stages.personalized(cache, protected, moved, attack, "person", seed, runtime)
    config = BenchConfig("k", [], [subject], [defence], [attack], [TransformSpec(transform)], ["a photo of sks person"])
    images = stages.generated(cache, protected, attacked, ["a photo of sks person"], config, seed, runtime)
    stages.metrics(cache, images, photos, "person", config, defence)
    return cache.keys


def test_cache_keys_are_stable_and_change_with_settings():
    db = AttackSpec("dreambooth", "dreambooth", {"steps": 2})
    base = _keys(db, {"outer_steps": 1})
    assert base == _keys(AttackSpec("dreambooth", "dreambooth", {"steps": 2}), {"outer_steps": 1})
    assert all(len(k) == 64 for k in base.values())
    downstream = ("personalized", "generated", "metrics")
    # an attack setting changes the attack and everything after it, nothing before
    steps = _keys(AttackSpec("dreambooth", "dreambooth", {"steps": 3}), {"outer_steps": 1})
    assert all(steps[s] != base[s] for s in downstream)
    assert steps["protected_model"] == base["protected_model"] and steps["transformed_photos"] == base["transformed_photos"]
    lr = _keys(AttackSpec("dreambooth", "dreambooth", {"steps": 2}, lr_mult=3.0), {"outer_steps": 1})
    assert lr["personalized"] != base["personalized"]
    # a defence setting changes the protected model and everything downstream
    defence = _keys(db, {"outer_steps": 2})
    assert all(defence[s] != base[s] for s in ("protected_model",) + downstream)
    assert defence["transformed_photos"] == base["transformed_photos"]
    # the seed changes the transform and the attack; other photos change everything
    assert _keys(db, {"outer_steps": 1}, seed=1)["transformed_photos"] != base["transformed_photos"]
    photos = _keys(db, {"outer_steps": 1}, photos_key="q" * 64)
    assert all(photos[s] != base[s] for s in base)


# --------------------------------------------------------------------------- PersGuard's decoder negatives


@pytest.mark.parametrize("defence, expected", [
    ({"persguard": {"implant": "decoder", "negatives": "held_out:3"}}, "negatives must be a non-empty list"),
    ({"persguard": {"implant": "decoder", "negatives": ["someone"]}}, "expected an identity id or 'held_out:N'"),
    ({"apdm": {"negatives": ["held_out:3"]}}, "'negatives' is a persguard setting"),
])
def test_negatives_setting_is_checked(tmp_path, capsys, tiny_model_dir, subject_dir, defence, expected):
    raw = tiny_raw(tiny_model_dir, subject_dir)
    raw["defences"] = [defence]
    assert main(["-q", "bench", str(_write(tmp_path, raw)), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err


def test_decoder_backdoor_gets_the_rendered_negatives(tmp_path, tiny_model_dir, subject_dir):
    raw = tiny_raw(tiny_model_dir, subject_dir)
    raw["defences"] = [{"persguard": {"implant": "decoder", "negatives": ["held_out:3", 5], "decoder_steps": 2,
                                      "decoder_generations": 5, "decoder_attack_steps": 1, "batch_size": 1,
                                      "num_class_images": 2, "class_image_steps": 2}}]
    raw["metrics"] = ["backdoor_rate"]
    out = tmp_path / "run"
    run_bench(validate(raw), out, progress=False)
    cards = list(out.rglob("protection.json"))
    assert len(cards) == 1
    card = json.loads(cards[0].read_text())
    decoder = card["metrics"]["decoder_backdoor"]
    # negatives: 2 class images x 2 posterior samples + 5 generations for each of the two rendered identities
    assert card["implant"] == "decoder" and decoder["n_negatives"] == 2 * 2 + 2 * 5
    assert decoder["n_positives"] == 4 * 4 + 5  # the subject's 4 photos x 4 samples + 5 generations


@pytest.mark.parametrize("method", ["dreambooth", "lora"])
def test_shorter_attacks_written_on_the_way_equal_their_own_runs(tmp_path, tiny_model_dir, subject_dir, method):
    """A relearning curve in one run: the 2-step result written during a 4-step run is bit-identical to a 2-step
    run of its own, and is found in the cache afterwards."""
    from safetensors.torch import load_file

    from noclone.bench import stages
    from noclone.bench.config import AttackSpec

    settings = {"batch_size": 1, "num_class_images": 2, "class_image_steps": 2, "steps": 2}
    if method == "lora":
        settings["lora_rank"] = 2
    two, four = AttackSpec("a", method, settings), AttackSpec("a", method, settings, steps_mult=2)
    runtime = stages.Runtime("cpu", "fp32", progress=False)

    def weights(ref) -> dict:
        return {f"{p.parent.name}/{k}": v for p in sorted(ref.path.rglob("*.safetensors")) for k, v in load_file(p).items()}

    shared = stages.Cache(tmp_path / "shared")
    model = stages.model_ref(shared, str(tiny_model_dir))
    photos = stages.subject_photos(shared, _subject(subject_dir), "train")
    long = stages.personalized(shared, model, photos, four, "person", 0, runtime, shorter=(two,))
    assert shared.computed["personalized"] == 2
    snap = stages.personalized(shared, model, photos, two, "person", 0, runtime)
    assert shared.found["personalized"] == 1 and snap.meta.get("snapshot") is True

    alone = stages.Cache(tmp_path / "alone")
    own = stages.personalized(alone, stages.model_ref(alone, str(tiny_model_dir)),
                              stages.subject_photos(alone, _subject(subject_dir), "train"), two, "person", 0, runtime)
    a, b, c = weights(snap), weights(own), weights(long)
    assert a.keys() == b.keys() and a
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)  # the 4-step result really went on


def _subject(folder):
    from noclone.bench.config import SubjectSpec
    from noclone.data.images import _image_files

    files = tuple(str(p) for p in _image_files(folder))
    return SubjectSpec("alice", "person", photos=files, references=files)


def test_an_attack_at_several_lengths_trains_once(tmp_path, monkeypatch, tiny_model_dir, subject_dir):
    """Attacks that differ only in steps_mult share one training run (the longest), with identical results."""
    from noclone.attacks.base import Personalization

    raw = tiny_raw(tiny_model_dir, subject_dir)
    raw["defences"] = ["none"]
    raw["attacks"] = [{"dreambooth": {"steps": 2, "batch_size": 1, "num_class_images": 2, "class_image_steps": 2}},
                      {"name": "db-2x", "method": "dreambooth", "steps_mult": 2, "steps": 2, "batch_size": 1,
                       "num_class_images": 2, "class_image_steps": 2},
                      {"name": "db-3x-lr", "method": "dreambooth", "steps_mult": 3, "lr_mult": 2, "steps": 2,
                       "batch_size": 1, "num_class_images": 2, "class_image_steps": 2}]
    calls = []
    real = Personalization.train

    def counting(self, *args, **kwargs):
        calls.append(self.config.steps)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Personalization, "train", counting)
    result = run_bench(validate(raw), tmp_path / "out", progress=False)
    assert sorted(calls) == [4, 6]  # 2 and 4 steps in one run; another lr is another run
    assert len(result["rows"]) == 3 and not result["failures"]
