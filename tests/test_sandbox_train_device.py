"""The prepared GPU training script, at tiny size on the CPU: train, pack into parts below 16 MB, unpack, load."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_device_script_trains_packs_and_unpacks(tmp_path):
    script = ROOT / "benchmarks" / "sandbox_train_device.py"
    out = tmp_path / "out"
    subprocess.run([sys.executable, str(script), "--out", str(out), "--device", "cpu", "--quick", "--minutes", "5",
                    "--work", str(tmp_path / "work")], check=True, capture_output=True, text=True)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] is True and summary["denoiser_steps_done"] == 3
    parts = sorted(out.glob("sandbox-v2.tar.part*"))
    assert [p.name for p in parts] == summary["parts"] and all(p.stat().st_size <= 15 * 2**20 for p in parts)
    assert len(list(out.iterdir())) <= 8  # what the device tool brings back
    model = tmp_path / "model"
    subprocess.run([sys.executable, str(script), "--unpack", str(out), "--to", str(model)], check=True)
    from noclone.models.pipeline import load_pipeline

    pipe = load_pipeline(model)
    assert json.loads((model / "sandbox_training.json").read_text())["caption_style"] == "v2"
    assert pipe.unet is not None
