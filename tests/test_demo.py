"""`noclone demo` end to end at toy settings: both halves of the story, the report, resume without recomputing."""

import json

import torch

from noclone.cli import main

torch.set_num_threads(1)


def test_demo_runs_both_halves_and_resumes(tmp_path):
    out = tmp_path / "demo"
    argv = ["-q", "demo", "--out", str(out), "--steps", "2", "--n", "2", "--protect-steps", "1", "--class-noun", "cat"]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["results"]) == {"base", "dreambooth", "protected"}
    for arm in summary["results"].values():
        assert arm["n_images"] == 2 and 0.0 <= arm["identity_match_rate"] <= 1.0
    assert summary["protection"]["method"] == "apdm" and summary["protection"]["outer_steps"] == 1
    protected = list((out / "work" / "protected").iterdir())
    assert len(protected) == 1 and (protected[0] / "protection.json").is_file()
    # the attack on the protected model is its own experiment, not the unprotected one's cache entry
    assert summary["results"]["protected"]["generated_dir"] != summary["results"]["dreambooth"]["generated_dir"]
    html = (out / "report.html").read_text()
    assert "Protected (APDM)" in html and html.count("<img") >= 5

    manifests = sorted(out.rglob("manifest.json"))
    stamps = [m.stat().st_mtime_ns for m in manifests]
    assert main(argv) == 0  # resumes: everything is cached, nothing is regenerated
    assert [m.stat().st_mtime_ns for m in manifests] == stamps
