"""`noclone bench --executor ray`: the same rows, cache keys and images as the local executor; a rerun submits
nothing; a bad --address or a missing Ray is one clear line and exit 2.

The Ray tests run a shrunk sandbox-quick (the suite's tiny 32 px model, a held-out sandbox person rendered at
32 px; clean and APDM, a JPEG transform, a DreamBooth at two lengths, 2 images of 2 steps) once locally and once on
a local Ray with 2 CPUs. They are skipped
only when Ray is not installed (scripts/setup.sh installs it: the `test` extra includes `ray`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml

from noclone.bench.config import validate
from noclone.bench.runner import run_bench
from noclone.cli import main

torch.set_num_threads(1)

needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                               reason="Ray is not installed (pip install -e '.[ray]'; CI installs it via setup.sh)")
METRICS = ("ism", "identity_match_rate", "fdfr", "fid", "n_images")
LABELS = ("cell_id", "position", "model", "subject", "defence", "transform", "attack", "seed", "error", "artifacts")


def tiny_raw(model_dir: Path) -> dict:
    """sandbox-quick, shrunk to seconds."""
    tiny = {"num_class_images": 2, "class_image_steps": 2}
    return {
        "name": "ray-tiny",
        "models": [{"name": "tiny", "path": str(model_dir)}],
        "subjects": [{"class": "person", "identity": "held_out:0", "size": 32}],
        "defences": ["none", {"apdm": {"outer_steps": 1, "inner_steps": 1, **tiny}}],
        "attacks": [{"dreambooth": {"steps": 2, **tiny}},
                    {"name": "db-2x", "method": "dreambooth", "steps": 2, "steps_mult": 2, **tiny}],
        "transforms": ["jpeg:75"],
        "prompts": ["a photo of {token} {class_noun}"],
        "images_per_prompt": 2,
        "generation": {"steps": 2},
        "seeds": [0],
        "metrics": ["ism", "identity_match_rate", "fdfr", "fid"],
        "device": "cpu",
    }


def _files(out: Path) -> dict[str, str]:
    """sha256 of every generated image, by its path under the folder (paths hold the cache keys)."""
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((out / "cache" / "generated").rglob("*.png"))}


def _entries(out: Path) -> set[str]:
    return {f"{d.parent.name}/{d.name}" for d in (out / "cache").glob("*/*") if (d / "stage.json").is_file()}


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray with 2 CPUs for the module (run_bench uses a Ray this process already started)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", object_store_memory=100 * 2**20)
    yield ray
    ray.shutdown()


@needs_ray
def test_ray_equals_local_and_a_rerun_submits_nothing(tmp_path, local_ray, capsys, tiny_model_dir):
    config_path = tmp_path / "bench.yaml"
    config_path.write_text(yaml.safe_dump(tiny_raw(tiny_model_dir)))
    config = validate(tiny_raw(tiny_model_dir))
    local = run_bench(config, tmp_path / "local", progress=False)
    assert main(["-q", "bench", str(config_path), "--out", str(tmp_path / "ray"), "--executor", "ray",
                 "--task-cpus", "1", "--retries", "1"]) == 0
    assert "bench report:" in capsys.readouterr().out

    again = run_bench(config, tmp_path / "ray", progress=False, executor="ray")
    assert again["tasks"] == 0 and again["computed"] == {} and not again["failures"]
    assert sum(again["found"].values()) > 0

    rows_local, rows_ray = local["rows"], again["rows"]
    assert len(rows_local) == 4 and not local["failures"]
    for a, b in zip(rows_local, rows_ray):
        assert {k: a[k] for k in LABELS} == {k: b[k] for k in LABELS}
        for m in METRICS:
            assert b[m] == pytest.approx(a[m], rel=1e-6, abs=1e-9), (a["defence"], a["attack"], m)
    assert _entries(tmp_path / "local") == _entries(tmp_path / "ray")  # the same cache keys
    images = _files(tmp_path / "local")
    assert len(images) == 8 and images == _files(tmp_path / "ray")

    # a lost stage is recomputed alone: the one task that is missing
    lost = tmp_path / "ray" / rows_ray[-1]["artifacts"]["generated"]
    metrics_of = [d for d in (tmp_path / "ray" / "cache" / "metrics").iterdir()
                  if lost.parent.name in (d / "stage.json").read_text()]
    assert len(metrics_of) == 1
    shutil.rmtree(metrics_of[0])
    resumed = run_bench(config, tmp_path / "ray", progress=False, executor="ray")
    assert resumed["tasks"] == 1 and resumed["computed"] == {"metrics": 1}
    assert [r["ism"] for r in resumed["rows"]] == [r["ism"] for r in rows_ray]


@needs_ray
@pytest.mark.parametrize("address, expected", [
    ("127.0.0.1:1", "--address 127.0.0.1:1: no Ray cluster answers there"),
    ("no-port-here", "--address no-port-here: expected auto, HOST:PORT or ray://HOST:PORT"),
])
def test_bad_address_is_one_line_and_exit_2(tmp_path, capsys, address, expected, tiny_model_dir):
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(tiny_raw(tiny_model_dir)))
    out = tmp_path / "out"
    assert main(["-q", "bench", str(path), "--out", str(out), "--executor", "ray", "--address", address]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("noclone: error:") and expected in err, err
    assert not out.exists()


def test_ray_options_need_the_ray_executor(tmp_path, capsys, tiny_model_dir):
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(tiny_raw(tiny_model_dir)))
    assert main(["-q", "bench", str(path), "--out", str(tmp_path / "out"), "--address", "auto"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--address: only with --executor ray" in err, err


def test_without_ray_installed_says_how_to_install(tmp_path, capsys, monkeypatch, tiny_model_dir):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as when it is not installed
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(tiny_raw(tiny_model_dir)))
    out = tmp_path / "out"
    assert main(["-q", "bench", str(path), "--out", str(out), "--executor", "ray"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--executor ray needs Ray" in err and "noclone[ray]" in err, err
    assert not out.exists()
