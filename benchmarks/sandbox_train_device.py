"""Train sandbox v2 on a lent GPU in one prepared run, and bring the model back in files the device tool returns.

On the device machine (python3 there has torch; diffusers travels as a wheel, see docs/fidelity.md, "Training v2"):

    PYTHONPATH=src:/tmp/site python3 benchmarks/sandbox_train_device.py --out $OUT --minutes 8 [--init-from DIR]

renders the world with all cores, trains `noclone sandbox train --preset v2` on cuda (bf16 autocast, fp32 weights)
until the budget is spent, and writes the model as a tar split into parts below 16 MB ($OUT/sandbox-v2.tar.partNN)
plus $OUT/summary.json: the device returns at most 8 files of 16 MB. Here, put it back together with

    .venv/bin/python benchmarks/sandbox_train_device.py --unpack DIR_WITH_PARTS --to MODEL_DIR

`--init-from MODEL_DIR` continues an earlier piece (the denoiser resumes from that model's weights); without a GPU
the same command runs on the CPU (`--device cpu`), slowly.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tarfile
import time
from pathlib import Path

PART_BYTES = 15 * 1024 * 1024


def pack(model: Path, out: Path, name: str = "sandbox-v2") -> list[Path]:
    """`model` as an uncompressed tar split into parts of at most PART_BYTES (weights do not compress)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.add(str(model), arcname=name)
    data = buffer.getvalue()
    parts = []
    for k, start in enumerate(range(0, len(data), PART_BYTES)):
        part = out / f"{name}.tar.part{k:02d}"
        part.write_bytes(data[start : start + PART_BYTES])
        parts.append(part)
    return parts


def unpack(parts_dir: Path, to: Path) -> Path:
    """Join the parts in `parts_dir` and extract the model directory to `to`."""
    parts = sorted(parts_dir.glob("*.tar.part*"))
    if not parts:
        raise SystemExit(f"error: {parts_dir}/ has no *.tar.partNN files")
    data = b"".join(p.read_bytes() for p in parts)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
        top = {m.name.split("/")[0] for m in tar.getmembers()}
        if len(top) != 1 or any(m.name.startswith("/") or ".." in m.name.split("/") for m in tar.getmembers()):
            raise SystemExit("error: the parts do not hold one model directory")
        tar.extractall(str(to.parent), filter="data")
    (to.parent / top.pop()).rename(to)
    return to


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="where the parts and summary.json go ($OUT on the device)")
    parser.add_argument("--minutes", type=float, default=8.0, help="budget of the whole run (render + VAE + denoiser)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--init-from", help="a v2 model from an earlier piece: continue its denoiser")
    parser.add_argument("--work", default="/tmp/sandbox-v2.work", help="renders, latents and checkpoints")
    parser.add_argument("--quick", action="store_true", help="tiny architecture and data: a smoke test of this script")
    parser.add_argument("--unpack", help="(here) a folder of parts to join")
    parser.add_argument("--to", help="(here) the model directory to create from --unpack")
    args = parser.parse_args()
    if args.unpack:
        if not args.to or Path(args.to).exists():
            raise SystemExit("error: --unpack needs --to NEW_DIR (a path that does not exist yet)")
        print(f"model: {unpack(Path(args.unpack), Path(args.to))}")
        return
    if not args.out:
        raise SystemExit("error: give --out DIR (or --unpack PARTS --to DIR)")

    import logging

    import torch

    from noclone.sandbox.train import SandboxTrainConfig, train_sandbox_model

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    started = time.time()
    overrides = dict(device=args.device, minutes=args.minutes, render_workers=max(1, (os.cpu_count() or 2) - 2),
                     mixed_precision="bf16" if args.device.startswith("cuda") else "no")
    if args.quick:
        overrides.update(architecture="tiny", identities_per_class=4, photos_per_identity=2, vae_steps=2, vae_batch=4,
                         unet_steps=3, unet_batch=4, identifier_bound=2, render_workers=1)
    config = SandboxTrainConfig.preset("v2", **overrides)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = Path(args.work) / "model"
    train_sandbox_model(model, config, work=Path(args.work), init_from=args.init_from)
    parts = pack(model, out)
    record = json.loads((model / "sandbox_training.json").read_text())
    summary = {"device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu",
               "torch": torch.__version__, "seconds": round(time.time() - started, 1),
               "complete": record["complete"], "denoiser_steps_done": record["denoiser_steps_done"],
               "unet_steps": record["unet_steps"], "unet_batch": record["unet_batch"],
               "parts": [p.name for p in parts], "bytes": sum(p.stat().st_size for p in parts)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
