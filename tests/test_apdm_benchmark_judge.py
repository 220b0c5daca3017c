"""The APDM benchmark's judge of the issue's criteria and its seed aggregation (benchmarks/apdm_*.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from apdm_acceptance import criteria  # noqa: E402


def row(attack="dreambooth", subject="protected", unprotected=0.9, protected=0.05, ism=0.15, base_ism=0.13):
    return {"class": "dog", "subject": subject, "attack": attack, "match_unprotected": unprotected,
            "match_protected": protected, "ism_unprotected": 0.8, "ism_protected": ism, "base_ism": base_ism,
            "fdfr_protected": 0.5, "protect_seconds": 1.0, "attack_seconds": 1.0}


def quality(detector=0.95, fid=3.0):
    return {"class": "dog", "detector_base": 0.97, "detector_protected": detector, "fid_base": 3.0,
            "fid_protected": fid}


def test_criteria_judges_each_condition_of_the_issue():
    met = criteria([row(), row("lora", protected=0.20), row(subject="other (held-out #5)", unprotected=0.8,
                                                              protected=0.7)], [quality(0.92, 3.45)])["dog"]
    assert met == {"1_protected": True, "2_adaptive": True, "3_other_subject": True, "4_quality": True}

    assert not criteria([row(protected=0.12)], [])["dog"]["1_protected"]  # match rate over 10%
    assert not criteria([row(ism=0.24)], [])["dog"]["1_protected"]  # ISM more than 0.1 off the base model's
    assert not criteria([row(unprotected=0.7)], [])["dog"]["1_protected"]  # the attack must clone unprotected
    assert not criteria([row("lora", protected=0.1), row("dreambooth 3x lr", protected=0.22)], [])["dog"]["2_adaptive"]
    assert not criteria([row(subject="other", unprotected=0.8, protected=0.69)], [])["dog"]["3_other_subject"]
    assert not criteria([], [quality(detector=0.91)])["dog"]["4_quality"]
    assert not criteria([], [quality(fid=3.46)])["dog"]["4_quality"]


def run_seeds(*paths) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCHMARKS / "apdm_seeds.py"), *map(str, paths)],
                          capture_output=True, text=True, cwd=BENCHMARKS)


def test_seed_aggregation_counts_criteria_and_each_adaptive_attacker(tmp_path):
    files = []
    for seed, lora in enumerate([0.1, 0.3, 0.2]):
        f = tmp_path / f"s{seed}.json"
        f.write_text(json.dumps({"settings": {"seed": seed}, "rows": [row(), row("lora", protected=lora)],
                                 "quality": [quality()]}))
        files.append(f)
    result = run_seeds(*files)
    assert result.returncode == 0, result.stderr
    assert "Seeds 0, 1, 2" in result.stdout
    assert "0.10 / 0.30 / 0.20 (mean 0.20)" in result.stdout
    assert "dog, criterion 2_adaptive: 2 of 3" in result.stdout
    assert "dog, lora at <= 20%: 2 of 3" in result.stdout


@pytest.mark.parametrize("content", ["not json", json.dumps({"settings": {}})])
def test_seed_aggregation_refuses_a_file_that_is_not_a_results_file(tmp_path, content):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    result = run_seeds(bad)
    assert result.returncode != 0
    assert "not a results file" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_decoder_option_is_typed_after_apdm_config_and_refuses_unknown_fields():
    import argparse

    from apdm_acceptance import decoder_option

    parser = argparse.ArgumentParser()
    assert decoder_option("steps=600", parser) == ("decoder_steps", 600)
    assert decoder_option("negative_share=0.5", parser) == ("decoder_negative_share", 0.5)
    assert decoder_option("balance_negatives=False", parser) == ("decoder_balance_negatives", False)
    assert decoder_option("lr_schedule=constant", parser) == ("decoder_lr_schedule", "constant")
    for bad in ("bogus=1", "steps", "steps=many", "balance_negatives=maybe", "attack_lengths=1,2"):
        with pytest.raises(SystemExit):
            decoder_option(bad, parser)


def test_criterion_3_is_judged_on_the_mean_over_attack_seeds():
    def other(unprotected, protected, seed):
        return row(f"dreambooth seed {seed}", "other (held-out #5)", unprotected, protected)

    # one seed 12 points down, the other 4: 8 points on the mean -> met; each seed alone would disagree
    assert criteria([other(0.8, 0.68, 1), other(0.9, 0.86, 2)], [])["dog"]["3_other_subject"]
    assert not criteria([other(0.8, 0.68, 1)], [])["dog"]["3_other_subject"]
    assert not criteria([other(0.8, 0.68, 1), other(0.9, 0.78, 2)], [])["dog"]["3_other_subject"]  # 12 on the mean
    # two different other subjects are judged separately: each must hold
    assert not criteria([other(0.8, 0.8, 1), row(subject="other (held-out #6)", unprotected=0.9, protected=0.7)],
                        [])["dog"]["3_other_subject"]


def test_the_report_gives_the_mean_over_attack_seeds():
    from types import SimpleNamespace

    from apdm_acceptance import markdown

    from noclone.defenses import APDMConfig

    rows = [row(), row("dreambooth", "other (held-out #5)", 0.8, 0.7), row("dreambooth seed 2", "other (held-out #5)",
                                                                           0.9, 0.86)]
    text = markdown(rows, [], APDMConfig(), SimpleNamespace(n=32, quality_n=64, negative_identities="10,11"))
    assert "- dog, other (held-out #5), mean over 2 attack seeds: match unprotected 0.85, protected 0.78" in text
    assert "3_other_subject met" in text
    assert "mean over" not in markdown(rows[:2], [], APDMConfig(), SimpleNamespace(n=32, quality_n=64))
