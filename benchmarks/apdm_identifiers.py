"""Which identifiers get an APDM-protected subject back, and through which part of the model (sandbox).

    .venv/bin/python benchmarks/apdm_identifiers.py --protected DIR --out W --class-noun dog --identity 4
        [--tokens sks,ohwx,olis,qzv,krk,xyz] [--seed 0] [--frozen-text-encoder] [--markdown F]

For each identifier the preset sandbox DreamBooth attacks the protected model (cached in W: give the --out of
benchmarks/apdm_acceptance.py to reuse its attacks) and the table shows:
- the identity match rate and ISM of 32 generations of "a photo of <identifier> <class>";
- how many BPE pieces the identifier is;
- drift: how far the attack moved the instance prompt's conditioning, ||c_after - c_before|| / ||c_before||
  (the attacker's text encoder against the protected model's);
- the subject's denoising error (64 fixed draws of photo, noise and timestep) of the protected UNet and of the
  attacked UNet, the latter under the attacked and under the protected text encoder: where the attack undoes the
  damage.
`--frozen-text-encoder` runs the attacker with its text encoder frozen (UNet-only DreamBooth).
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import replace
from pathlib import Path

import torch


def subject_error_probe(pipe, work: Path, class_noun: str, identity: int, draws: int = 64):
    """A function (unet, text_encoder, prompt) -> mean squared denoising error on the subject's photos, fixed draws."""
    from noclone.attacks.base import load_subject_images
    from noclone.sandbox.experiment import TRAIN_PHOTOS, subject_photos
    from noclone.training.data import LatentSet, pipeline_resolution
    from noclone.training.diffusion import encode_prompts, noised, prediction_error, training_scheduler

    _, images = load_subject_images(subject_photos(work / "subjects" / f"{class_noun}-{identity}", class_noun, identity,
                                                   TRAIN_PHOTOS))
    photos = LatentSet.from_images(pipe.vae, images, "", pipeline_resolution(pipe))
    g = torch.Generator().manual_seed(0)
    noisy, t, target = noised(training_scheduler(pipe), photos.batch(g, draws), g)

    @torch.no_grad()
    def error(unet, text_encoder, prompt: str) -> float:
        cond = encode_prompts(text_encoder, pipe.tokenizer, [prompt]).expand(draws, -1, -1)
        return float(prediction_error(unet, noisy, t, cond, target))

    return error


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--protected", required=True, help="the protected pipeline directory")
    parser.add_argument("--out", required=True, help="work directory (attack cache)")
    parser.add_argument("--class-noun", required=True)
    parser.add_argument("--identity", type=int, required=True, help="held-out identity index, as in apdm_acceptance.py")
    parser.add_argument("--tokens", default="sks,ohwx,olis,qzv,krk,xyz")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--frozen-text-encoder", action="store_true", help="UNet-only DreamBooth attacker")
    parser.add_argument("--markdown")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    from noclone.attacks.base import preset_config
    from noclone.models.pipeline import load_pipeline
    from noclone.sandbox.experiment import attack_experiment
    from noclone.sandbox.splits import held_out
    from noclone.training.diffusion import encode_prompts

    protected, work, identity = Path(args.protected), Path(args.out), held_out(args.identity)
    pipe = load_pipeline(protected)
    error = subject_error_probe(pipe, work, args.class_noun, identity)
    rows = []
    for token in args.tokens.split(","):
        attack = preset_config("dreambooth", "sandbox", class_noun=args.class_noun, seed=args.seed, token=token,
                               progress=False)
        if args.frozen_text_encoder:
            attack = replace(attack, train_text_encoder=False)
        result = attack_experiment(protected, work, args.class_noun, identity, "dreambooth", attack, args.n, args.seed,
                                   False)
        attacked = load_pipeline(result["attacked_dir"])
        prompt = attack.instance_prompt
        with torch.no_grad():
            before = encode_prompts(pipe.text_encoder, pipe.tokenizer, [prompt])
            after = encode_prompts(attacked.text_encoder, attacked.tokenizer, [prompt])
        rows.append({"token": token, "pieces": len(pipe.tokenizer.tokenize(token)),
                     "match": result["identity_match_rate"], "ism": result["ism"],
                     "drift": float((after - before).norm() / before.norm()),
                     "error_protected": error(pipe.unet, pipe.text_encoder, prompt),
                     "error_attacked": error(attacked.unet, attacked.text_encoder, prompt),
                     "error_attacked_unet_protected_text": error(attacked.unet, pipe.text_encoder, prompt)})
        print(rows[-1], flush=True)
    lines = [f"Preset DreamBooth{' (text encoder frozen)' if args.frozen_text_encoder else ''} on {protected.name}, "
             f"{args.class_noun} held-out #{args.identity}, seed {args.seed}, {args.n} generations per identifier.", "",
             "| identifier | BPE pieces | match | ISM | conditioning drift | subject error: protected UNet | "
             "attacked UNet | attacked UNet, protected text encoder |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['token']} | {r['pieces']} | {r['match']:.2f} | {r['ism']:.3f} | {r['drift']:.3f} | "
              f"{r['error_protected']:.3f} | {r['error_attacked']:.3f} | {r['error_attacked_unet_protected_text']:.3f} |"
              for r in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)
        Path(args.markdown).with_suffix(".json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
