"""benchmarks/gpu_check.py at tiny size on the CPU: every section runs and reports finite numbers in one JSON."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
EXPECTED = {
    "dreambooth": ("step_seconds", "peak_gb"),
    "rid": ("seconds_per_image_batch1", "seconds_per_image_batch8", "parameters"),
    "aspl": ("round_seconds", "schedule_seconds_per_image_estimate", "peak_gb"),
    "apdm_attention": ("outer_step_seconds", "peak_gb", "plan_total_gb"),
    "apdm_full": ("outer_step_seconds", "peak_gb", "plan_total_gb"),
}


def _numbers(value):
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _numbers(v)
    elif isinstance(value, list):
        for v in value:
            yield from _numbers(v)


def test_gpu_check_tiny_writes_every_section(tmp_path):
    out = tmp_path / "check.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--size", "tiny", "--device", "cpu", "--threads", "1",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "done in" in done.stdout and "dreambooth: ok" in done.stdout
    report = json.loads(out.read_text())
    assert report["device"] and report["torch"] and report["dtype"] == "float32" and report["size"] == "tiny"
    assert report["failed"] == [] and report["all_finite"]
    assert list(report["sections"]) == list(EXPECTED)
    for name, keys in EXPECTED.items():
        section = report["sections"][name]
        assert section["ok"], (name, section.get("error"), section.get("traceback"))
        for key in keys:
            assert math.isfinite(section[key]) and section[key] > 0, (name, key, section[key])
        assert all(math.isfinite(v) for v in _numbers(section)), name
    apdm = report["sections"]
    assert apdm["apdm_full"]["trainable_parameters"] > apdm["apdm_attention"]["trainable_parameters"]


def test_a_failing_section_is_recorded_and_the_rest_still_run(tmp_path, monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def broken(ctx):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(module, "check_dreambooth", broken)
    report = module.main(["--size", "tiny", "--device", "cpu", "--sections", "dreambooth,rid",
                          "--out", str(tmp_path / "r.json")])
    assert report["failed"] == ["dreambooth"]
    assert "out of memory" in report["sections"]["dreambooth"]["error"]
    assert report["sections"]["rid"]["ok"]
    assert json.loads((tmp_path / "r.json").read_text())["failed"] == ["dreambooth"]
