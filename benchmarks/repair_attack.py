"""An adaptive attacker who repairs a protected model's generic generation before personalizing it.

    .venv/bin/python benchmarks/repair_attack.py --protected DIR --out WORK [--mode distill|finetune]
        [--steps 100] [--lr 1e-4] [--renders 1000] [--generated 64] [--identities 0,4] [--class-noun person]
        [--model sandbox] [--markdown F]

A model-level protection (APDM) that damages the whole class can be undone for the class without touching the
subject. The attacker first fine-tunes the protected UNet for `--steps` AdamW steps on generic data, then runs the
sandbox DreamBooth preset on each held-out identity:
- `distill`: match the public original model's noise prediction (SD1.5 and SD2.1 are public) on renders of
  `--renders` members of the class and on `--generated` samples of the original, under the class and empty prompts;
- `finetune`: no original model; the plain denoising loss on the renders under the class and empty prompts.
Reports generic quality (detector rate, sandbox-FID) and the DreamBooth match rate before and after the repair.
Use the same --out as `apdm_acceptance.py` to reuse its cached subjects, attacks and quality images.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from apdm_acceptance import positive_photos, quality  # noqa: E402


def repair(protected: Path, original: Path, work: Path, args) -> Path:
    """The protected model after the attacker's generic repair (cached in WORK/repaired)."""
    from noclone.generation import GenerationConfig, sample_latents
    from noclone.models.pipeline import load_pipeline, save_pipeline
    from noclone.sandbox.experiment import images_in, model_tag
    from noclone.training.data import LatentSet, pipeline_resolution
    from noclone.training.diffusion import (
        diffusion_loss, distillation_loss, prompt_condition, step_generator, training_scheduler,
    )

    tag = f"{model_tag(protected)}-{args.mode}-{args.steps}-{args.lr:g}-{args.renders}-{args.generated}-{args.seed}"
    out = work / "repaired" / tag
    if (out / "model_index.json").is_file():
        return out
    pipe = load_pipeline(protected)
    resolution = pipeline_resolution(pipe)
    sets = [LatentSet.from_images(pipe.vae, images_in(positive_photos(work, args.class_noun, args.renders)), "",
                                  resolution)]
    teacher = None
    if args.mode == "distill":
        base = load_pipeline(original)
        teacher = base.unet.eval().requires_grad_(False)
        if args.generated:
            seeds = list(range(args.seed + 9000, args.seed + 9000 + args.generated))
            latents = sample_latents(base, f"a photo of a {args.class_noun}", seeds, GenerationConfig(batch_size=16))
            sets.append(LatentSet(latents, torch.zeros_like(latents), ""))
    prompts = [f"a photo of a {args.class_noun}", ""]
    conds = [prompt_condition(pipe.text_encoder, pipe.tokenizer, p, {}, grad=False) for p in prompts]
    unet, scheduler = pipe.unet, training_scheduler(pipe)
    unet.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=1e-2)
    started = time.time()
    for step in range(args.steps):
        generator = step_generator(args.seed, step, "repair")
        latents = sets[step % len(sets)].batch(generator, args.batch_size)
        if teacher is not None:
            losses = [distillation_loss(unet, teacher, scheduler, latents, c, generator) for c in conds]
        else:
            losses = [diffusion_loss(unet, scheduler, latents, c.expand(len(latents), -1, -1), generator) for c in conds]
        loss = sum(losses) / len(losses)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        if step % 20 == 0 or step == args.steps - 1:
            logging.info("repair step %d/%d loss %.4f (%.0f s)", step + 1, args.steps, loss.item(), time.time() - started)
    unet.eval().requires_grad_(False)
    save_pipeline(pipe, out, overwrite=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--protected", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default="sandbox", help="the public original model (distill mode)")
    parser.add_argument("--mode", choices=("distill", "finetune"), default="distill")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--renders", type=int, default=1000)
    parser.add_argument("--generated", type=int, default=64)
    parser.add_argument("--identities", default="0,4")
    parser.add_argument("--class-noun", default="person")
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--markdown")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.manual_seed(args.seed)

    from noclone.attacks.base import preset_config
    from noclone.sandbox.assets import model_dir
    from noclone.sandbox.experiment import attack_experiment
    from noclone.sandbox.splits import held_out

    original = model_dir() if args.model == "sandbox" else Path(args.model)
    work, protected = Path(args.out), Path(args.protected)
    repaired = repair(protected, original, work, args)
    attack = preset_config("dreambooth", "sandbox", class_noun=args.class_noun, seed=args.seed)
    rows = []
    for label, model in (("original", original), ("protected", protected), (f"protected + {args.mode} repair", repaired)):
        row = {"model": label, **quality(model, work, args.class_noun, 64, args.seed)}
        for k in (int(i) for i in args.identities.split(",")):
            result = attack_experiment(model, work, args.class_noun, held_out(k), "dreambooth", attack, args.n,
                                       args.seed, False)
            row[f"match_{k}"] = result["identity_match_rate"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    ids = args.identities.split(",")
    lines = [f"Repair: {args.mode}, {args.steps} steps, lr {args.lr:g}, {args.renders} renders"
             + (f" + {args.generated} original samples" if args.mode == "distill" else "") + f"; seed {args.seed}; "
             f"DreamBooth preset, {args.n} generations per cell.", "",
             "| model | detector | sandbox-FID | " + " | ".join(f"DreamBooth match, held-out {k}" for k in ids) + " |",
             "|---|---|---|" + "---|" * len(ids)]
    lines += [f"| {r['model']} | {r['detector_rate']:.2f} | {r['fid']:.2f} | "
              + " | ".join(f"{r[f'match_{k}']:.2f}" for k in ids) + " |" for r in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)


if __name__ == "__main__":
    main()
