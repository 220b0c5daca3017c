"""APDM's protection time per subject on the sandbox model, preset by preset, against the attack it simulates.

    .venv/bin/python benchmarks/apdm_time.py [--outer 3] [--threads 1] [--anchors 1000]

Times, in one run on the shipped sandbox model (held-out person 0, 5 photos):
- the attacker: the sandbox DreamBooth (preset settings), seconds per step and for its 300 steps;
- per APDM setting: generating its class images (once per class; cached across runs in practice), `--outer` outer
  steps (s per step, then extrapolated to the setting's N_protect) and, where it has one, the release repair;
- the settings: `quick` (100 outer steps), `paper` (800 outer x 20 inner at batch 1, 200 class images at 50 steps),
  and `quick + 300 outer + anchors + repair 200`, the setting that reached criterion (1)'s match rate on the person
  (docs/research/apdm.md, "Release repair").
Extrapolated totals assume every outer step costs what the timed ones did (they do: L2P's work per step is fixed).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path
from tempfile import TemporaryDirectory

import torch
from PIL import Image


def timed(fn):
    """(fn's result, seconds it took)."""
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--outer", type=int, default=3, help="outer steps timed per setting")
    parser.add_argument("--attack-steps", type=int, default=10, help="DreamBooth steps timed")
    parser.add_argument("--anchors", type=int, default=1000, help="anchor renders of the criterion-(1) setting")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from noclone.attacks import DreamBooth
    from noclone.attacks.base import preset_config
    from noclone.defenses import APDM, APDMConfig, ProtectionSubject
    from noclone.models.pipeline import load_pipeline
    from noclone.sandbox.assets import model_dir
    from noclone.sandbox.experiment import TRAIN_PHOTOS, subject_photos
    from noclone.sandbox.render import render

    model = model_dir()
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} thread(s), sandbox model, held-out person 0")
    with TemporaryDirectory() as tmp:
        work = Path(tmp)
        photos = subject_photos(work / "subject", "person", 2_000_000, TRAIN_PHOTOS)
        anchors = work / "anchors"
        anchors.mkdir()
        for i in range(args.anchors):
            render("person", 7919 * i + 11, i % 8).save(anchors / f"{i:04d}.png")

        images = [Image.open(p).convert("RGB") for p in sorted(photos.glob("*.png"))]
        attack_config = preset_config("dreambooth", "sandbox", progress=False)
        attack_steps = attack_config.steps
        DreamBooth(replace(attack_config, steps=1)).train(load_pipeline(model), images, class_cache=work / "db")
        pipe = load_pipeline(model)
        _, seconds = timed(lambda: DreamBooth(replace(attack_config, steps=args.attack_steps)).train(
            pipe, images, class_cache=work / "db"))  # class images cached
        step_s = seconds / args.attack_steps
        attack_s = step_s * attack_steps
        print(f"attacker: sandbox DreamBooth {step_s:.3f} s/step, {attack_steps} steps = {attack_s:.0f} s")

        settings = {
            "quick": (APDMConfig.preset("quick", progress=False), False),
            "paper": (APDMConfig.preset("paper", progress=False), False),
            "quick + 300 outer + anchors + repair 200":
                (APDMConfig.preset("quick", progress=False, outer_steps=300, repair_steps=200), True),
        }
        print("| setting | class images s | s / outer step | outer steps | repair s | protection per subject s "
              "| x the attack |")
        print("|---|---|---|---|---|---|---|")
        for row, (name, (config, with_anchors)) in enumerate(settings.items()):
            subject = ProtectionSubject.from_folder(photos, "person", anchors=anchors if with_anchors else None)
            pipe = load_pipeline(model)
            method = APDM(replace(config, outer_steps=args.outer, repair_steps=0))
            data, data_s = timed(lambda: method.subject_data(pipe, subject, work / f"classes-{row}"))
            outer_s = timed(lambda: method.train(pipe, [data]))[1] / args.outer
            repair_s = 0.0
            if config.repair_steps:
                original_unet = load_pipeline(model).unet
                repair = APDM(replace(config, repair_steps=args.outer))
                repair_s = timed(lambda: repair.repair(pipe, original_unet, [data]))[1] * config.repair_steps / args.outer
            total = data_s + outer_s * config.outer_steps + repair_s
            print(f"| {name} | {data_s:.0f} | {outer_s:.2f} | {config.outer_steps} | {repair_s:.0f} | {total:.0f} "
                  f"| {total / attack_s:.1f} |")


if __name__ == "__main__":
    main()
