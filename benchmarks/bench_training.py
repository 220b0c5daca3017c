"""Seconds per DreamBooth / LoRA training step and per generation step, tiny SD-architecture pipeline at 64 px.

    .venv/bin/python benchmarks/bench_training.py [--steps 20] [--threads 2]

Prints one line per figure; a later implementation is compared against these numbers measured in the same run.
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--preset", default="sandbox", help="architecture preset (sandbox = 64 px)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from noclone.attacks import DreamBooth, LoRA, PersonalizationConfig
    from noclone.models.architectures import build_pipeline
    from noclone.models.pipeline import use_sdpa
    from noclone.sandbox.render import render

    images = [render("person", 2_000_000, p, 64) for p in range(5)]
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, preset {args.preset}")
    for method in (DreamBooth, LoRA):
        pipe = build_pipeline(args.preset)
        use_sdpa(pipe)
        pipe.set_progress_bar_config(disable=True)
        config = PersonalizationConfig(steps=args.steps, batch_size=4, num_class_images=8, class_image_steps=2, progress=False)
        attack = method(config)
        attack.train(pipe, images)  # warm-up and class images
        config.steps = args.steps
        start = time.perf_counter()
        method(config).train(build_and_prepare(args.preset), images)
        elapsed = time.perf_counter() - start
        print(f"{method.name:>10} train step (batch 4 instance + 4 prior): {elapsed / args.steps:.3f} s/step")
    pipe = build_pipeline(args.preset)
    use_sdpa(pipe)
    pipe.set_progress_bar_config(disable=True)
    for batch in (1, 8):
        pipe(["a photo of a person"] * batch, num_inference_steps=2, output_type="np")
        start = time.perf_counter()
        pipe(["a photo of a person"] * batch, num_inference_steps=args.steps, output_type="np")
        per = (time.perf_counter() - start) / args.steps
        print(f"generation step with CFG, batch {batch}: {per:.4f} s/step ({per / batch:.4f} s/step/image)")


def build_and_prepare(preset: str):
    from noclone.models.architectures import build_pipeline
    from noclone.models.pipeline import use_sdpa

    pipe = build_pipeline(preset)
    use_sdpa(pipe)
    pipe.set_progress_bar_config(disable=True)
    return pipe


if __name__ == "__main__":
    main()
