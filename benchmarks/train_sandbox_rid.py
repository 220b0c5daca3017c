"""Train the shipped sandbox RID generator against the embedded sandbox model (<= 15 minutes on 2 CPU threads).

    .venv/bin/python benchmarks/train_sandbox_rid.py --out src/noclone/cloak/weights/rid [--minutes 14] [--overwrite]

Same as `noclone rid train --models sandbox --sandbox-identities 300 --steps 4000 --batch-size 8 --lr 1e-3
--max-minutes 14 --out DIR` with 2 torch threads: training stops after `--minutes` (at whatever step it reached;
the count is in config.json "info") and the fp16 generator (~1.3 MB) is written to --out. Data: 4 renders each of 300 sandbox
identities from the evaluator range (never the held-out range used for evaluation), persons, dogs and cats mixed.
lr 1e-3 instead of the paper's 3e-4: a 15-minute budget instead of days. An interrupted run resumes (rerun the
same command; checkpoints beside --out every 100 steps).

Several processes (docs/distributed.md): `--batch-size` is per process, so the global batch is processes x
batch size; 2 processes at --batch-size 4 train on the batches one process draws at --batch-size 8:

    accelerate launch --multi_gpu --num_processes 2 benchmarks/train_sandbox_rid.py --out DIR --batch-size 4 --threads 1

(`--multi_gpu` is accelerate's torchrun launcher; on a CPU-only torch the processes use gloo, on GPUs one GPU each.
Only the first process writes the checkpoints and --out.)
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--minutes", type=float, default=14.0, help="wall-clock limit for the training steps")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4000, help="upper bound on steps (the time limit usually ends it)")
    parser.add_argument("--identities", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=8, help="per process (global: processes x this)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--budget", default="8/255")
    parser.add_argument("--regression-subjects", type=int, default=0, help="ASPL regression targets (adds minutes)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from noclone.cloak.rid import RIDTrainConfig, train_rid_generator
    from noclone.training.distributed import current

    dist = current()  # under `accelerate launch`: join the other processes before the model is loaded

    start = time.perf_counter()
    train = RIDTrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                           max_seconds=args.minutes * 60, checkpoint_every=100)
    out = train_rid_generator(args.out, ["sandbox"], sandbox_identities=args.identities, photos_per_identity=4,
                              budget=args.budget, train=train, regression_subjects=args.regression_subjects,
                              overwrite=args.overwrite)
    if not dist.is_main:
        return
    info = json.loads((Path(out) / "config.json").read_text())["info"]
    size = (Path(out) / "generator.safetensors").stat().st_size
    print(f"wrote {out}: {size / 1e6:.2f} MB, {info['steps_in_this_run']} steps in this run, denoising mse on "
          f"protected renders {info['denoising_mse_first_last'][0]:.4f} -> {info['denoising_mse_first_last'][1]:.4f}, "
          f"{time.perf_counter() - start:.0f} s in all")


if __name__ == "__main__":
    main()
