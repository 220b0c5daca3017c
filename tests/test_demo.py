"""`noclone demo` end to end at toy settings: both halves of the story, the collateral, the report's verdict and
layout, and a resume (a killed run, simulated by running twice) that recomputes nothing and keeps the timings."""

import json
import re
from html import unescape
from pathlib import Path

import numpy as np
import pytest
import torch

from noclone.cli import main

torch.set_num_threads(1)


def test_demo_runs_both_halves_collateral_and_resumes(tmp_path, monkeypatch):
    import noclone.demo
    from noclone.demo import DemoConfig, run_demo
    from noclone.sandbox.experiment import images_in

    shown = {}
    render = noclone.demo.render_report
    monkeypatch.setattr(noclone.demo, "render_report",
                        lambda summary, pictures, images: render(summary, pictures, shown.setdefault("images", images)))
    out = tmp_path / "demo"
    # toy settings; two worker processes, so the side-by-side scheduler runs too
    config = DemoConfig(out=out, class_noun="cat", steps=2, n_generated=2, protect_steps=1, num_class_images=2,
                        progress=False, workers=2)
    run_demo(config)
    summary = json.loads((out / "summary.json").read_text())
    # each grid shows its own stage's images (the collateral's never stand in for the subject's)
    c = summary["collateral"]
    figures = {**summary["results"], "collateral-base": c["unprotected"], "collateral-protected": c["protected"],
               "generic-base": c["generic_base"], "generic-protected": c["generic_protected"]}
    assert set(shown["images"]) == set(figures)
    for name, r in figures.items():
        expected = [np.asarray(im) for im in images_in(Path(r["generated_dir"]))]
        assert len(shown["images"][name]) == len(expected) == 2, name
        assert all(np.array_equal(np.asarray(a), b) for a, b in zip(shown["images"][name], expected)), name
    assert summary["results"]["protected"]["identity"] == summary["subject"]["identity"]
    assert set(summary["results"]) == {"base", "unprotected", "protected"}
    assert set(summary["collateral"]) == {"protected", "unprotected", "generic_protected", "generic_base"}
    for arm in [*summary["results"].values(), *summary["collateral"].values()]:
        assert arm["n_images"] == 2 and 0.0 <= arm["fdfr"] <= 1.0
    assert summary["collateral"]["protected"]["identity"] == summary["subject"]["other_identity"]
    assert summary["protection"]["method"] == "apdm" and summary["protection"]["outer_steps"] == 1
    protected = list((out / "work" / "protected").iterdir())
    assert len(protected) == 1 and (protected[0] / "protection.json").is_file()
    # the attack on the protected model is its own experiment, not the unprotected one's cache entry
    assert summary["results"]["protected"]["generated_dir"] != summary["results"]["unprotected"]["generated_dir"]
    assert summary["collateral"]["protected"]["generated_dir"] != summary["collateral"]["unprotected"]["generated_dir"]
    timing = summary["timing"]
    assert timing["reused"] == [] and len(timing["computed_this_run"]) == 10 and timing["workers"] == 2
    assert all(s["seconds"] > 0 and s["this_run"] for s in timing["stages"].values())

    html = (out / "report.html").read_text()
    # the page opens with the verdict sentence
    body = html.split("<body>", 1)[1]
    first = re.search(r"<div class='verdict[^']*'><p>(.*?)</p>", body)
    assert first and body.index(first.group(0)) < body.index("<h2>")
    sentence = unescape(first.group(1))
    assert re.match(r"(Protection (held|held for the subject, at the class's cost|did not hold): after the attack, "
                    r"\d/2 of the protected model's images match the subject, against \d/2 unprotected; target "
                    r"<= 0.2\.|Inconclusive: )", sentence)
    verdict = summary["verdict"]
    if verdict["held"] and verdict["collateral_ok"] is False:
        assert "at the class's cost" in sentence and "class='verdict mixed'" in html
    assert sentence == summary["verdict"]["sentence"]
    # unprotected and protected side by side: one two-column block holding both grids
    pairs = re.findall(r"<div class='pair'>(.*?)</div></div>", html)
    assert any("Unprotected model" in p and "Protected (APDM) model" in p for p in pairs)
    assert "grid-template-columns:repeat(2" in html
    # collateral and targets, the cost, the shortened protection
    for text in ("Another subject on the protected model", "Another subject on the base model",
                 "Class prompt, protected model", "Class prompt, base model", "What it costs:", "broken",
                 "A shortened protection", "docs/audits/README.md"):
        assert text in html, text
    assert len(summary["verdict"]["targets"]) == 3
    assert html.count(">met<") + html.count(">missed<") == 3
    assert "src='http" not in html and 'src="http' not in html and html.count("data:image/png;base64") >= 9
    assert html.count(">computed in this run<") == 10

    manifests = sorted(out.rglob("manifest.json"))
    stamps = [m.stat().st_mtime_ns for m in manifests]
    first_run = {name: s["seconds"] for name, s in timing["stages"].items()}
    run_demo(config)  # resumes: everything is cached, nothing is regenerated
    assert [m.stat().st_mtime_ns for m in manifests] == stamps
    again = json.loads((out / "summary.json").read_text())["timing"]
    assert again["computed_this_run"] == [] and len(again["reused"]) == 10
    assert {name: s["seconds"] for name, s in again["stages"].items()} == first_run  # the original timings
    html = (out / "report.html").read_text()
    assert html.count(">reused from an earlier run (") == 10 and ">computed in this run<" not in html


def test_demo_command_line(tmp_path, monkeypatch):
    import noclone.demo

    seen = {}
    monkeypatch.setattr(noclone.demo, "run_demo", lambda config: seen.setdefault("config", config).out)
    assert main(["-q", "demo", "--out", str(tmp_path / "d"), "--other-identity", "5", "--workers", "1",
                 "--protect-steps", "3"]) == 0
    config = seen["config"]
    assert (config.other_identity, config.workers, config.protect_steps, config.n_generated) == (5, 1, 3, 16)
    assert config.protect and config.steps is None


def test_demo_refuses_a_folder_that_is_not_a_demo(tmp_path):
    from noclone.demo import DemoConfig, _prepare_out
    from noclone.errors import NocloneError

    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(NocloneError, match="not a demo folder"):
        _prepare_out(DemoConfig(out=tmp_path))
    assert main(["-q", "demo", "--out", str(tmp_path), "--n", "1"]) == 2
    assert Path(tmp_path / "keep.txt").read_text() == "mine"
