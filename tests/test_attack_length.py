"""The attack-length calibration's ledger: finished subjects and seeds are appended once, skipped by later runs and
shards, and the rule is read from the ledger alone (the bench is replaced by a stub that records its calls)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def driver(monkeypatch):
    spec = importlib.util.spec_from_file_location("attack_length", ROOT / "benchmarks" / "attack_length.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    calls = []

    def fake_run_bench(config, out, progress=True, shard=None):
        subject, seed = config.subjects[0], config.seeds[0]
        calls.append((subject.class_noun, seed))
        # the longest attack clones best on dogs only: a rule that reads the wrong rows would pick another length
        rate = {"db-1x": 0.5, "db-2x": 0.6, "db-3x": 0.6, "db-4x": 0.9 if subject.class_noun == "dog" else 0.4}
        return {"rows": [{"model": "sandbox", "subject": subject.name, "class_noun": subject.class_noun, "attack": a.name,
                          "seed": seed, "identity_match_rate": rate[a.name], "fdfr": 0.1} for a in config.attacks]}

    monkeypatch.setattr(module, "run_bench", fake_run_bench)
    return module, calls


def run(module, monkeypatch, capsys, *args) -> str:
    monkeypatch.setattr(sys, "argv", ["attack_length.py", *args])
    module.main()
    return capsys.readouterr().out


def test_ledger_runs_each_subject_and_seed_once_and_decides_from_it(driver, tmp_path, monkeypatch, capsys):
    module, calls = driver
    ledger = tmp_path / "ledger.jsonl"
    common = ["--out", str(tmp_path / "w"), "--ledger", str(ledger), "--identities", "1", "--seeds", "0,1"]
    first = run(module, monkeypatch, capsys, *common, "--shard", "1/2")
    assert len(calls) == 3 and "rule: not decided yet" in first  # shard 1 of 2: half of the 6 subject-seeds
    run(module, monkeypatch, capsys, *common, "--shard", "2/2")
    assert sorted(calls) == sorted((c, s) for c in ("person", "dog", "cat") for s in (0, 1))
    rows = [json.loads(line) for line in ledger.read_text().splitlines()]
    assert len(rows) == 6 * 4 and {r["world"] for r in rows} == {"sandbox"}
    again = run(module, monkeypatch, capsys, *common)
    assert len(calls) == 6  # nothing re-run
    # mean over classes: 1x 0.5, 2x 0.6, 3x 0.6, 4x 0.567; the 2x/3x tie goes to the shorter
    assert "rule: db-2x (mean match 0.600) (below the rule's scale" in again
    (tmp_path / "v2-model").mkdir()
    (tmp_path / "v2-model" / "model_index.json").write_text("{}")
    other_world = run(module, monkeypatch, capsys, *common, "--model", str(tmp_path / "v2-model"))
    assert len(calls) == 12 and "rule: db-2x" in other_world  # another world's rows are its own
