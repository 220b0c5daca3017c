"""Acceptance figures of the sandbox (issue: the sandbox): base-model sanity, then attacks on held-out subjects.

    .venv/bin/python benchmarks/sandbox_acceptance.py --out /tmp/acceptance [--classes person,dog,cat]
        [--methods dreambooth,lora] [--identity 0] [--n 32] [--seed 0] [--model sandbox]
        [--steps N] [--lr LR] [--text-lr LR] [--prior-weight W] [--guidance G]

Prints a table and writes results.json. Every stage is cached in --out, so a rerun only computes what is missing.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np


def base_sanity(model: Path, work: Path, class_noun: str, n: int, seed: int, guidance: float = 7.5) -> dict:
    """Detector rate of `n` generations of 'a photo of a <class>', and their match rate to a held-out identity."""
    from noclone.sandbox.experiment import base_experiment
    from noclone.sandbox.splits import held_out

    r = base_experiment(model, work, class_noun, held_out(999), f"a photo of a {class_noun}", n, seed, guidance=guidance)
    return {"class_noun": class_noun, "detector_rate": 1 - r["fdfr"], "match_rate_vs_fixed_identity": r["identity_match_rate"],
            "ism_vs_fixed_identity": r["ism"], "n": n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default="sandbox")
    parser.add_argument("--classes", default="person,dog,cat")
    parser.add_argument("--methods", default="dreambooth,lora")
    parser.add_argument("--identity", type=int, default=0, help="held-out identity index")
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--base-n", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--text-lr", type=float, default=None, help="text-encoder lr of the attack (preset: 1e-3)")
    parser.add_argument("--prior-weight", type=float, default=None, help="prior-preservation weight (preset: 1)")
    parser.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance of every generation")
    parser.add_argument("--markdown", help="also write the tables as markdown to this file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    from noclone.attacks.base import preset_config
    from noclone.sandbox.assets import model_dir
    from noclone.sandbox.experiment import attack_experiment, base_experiment
    from noclone.sandbox.splits import held_out

    model = model_dir() if args.model == "sandbox" else Path(args.model)
    work = Path(args.out)
    classes = args.classes.split(",")
    results = {"base": [], "attacks": []}
    for class_noun in classes:
        results["base"].append(base_sanity(model, work, class_noun, args.base_n, args.seed, args.guidance))
    for class_noun in classes:
        identity = held_out(args.identity)
        base = base_experiment(model, work, class_noun, identity, f"a photo of sks {class_noun}", args.n, args.seed,
                               guidance=args.guidance)
        for method in args.methods.split(","):
            config = preset_config(method, "sandbox", class_noun=class_noun, seed=args.seed, lr=args.lr, steps=args.steps,
                                   text_encoder_lr=args.text_lr, prior_weight=args.prior_weight)
            started = time.time()
            r = attack_experiment(model, work, class_noun, identity, method, config, args.n, args.seed,
                                  guidance=args.guidance)
            r["base_ism"] = base["ism"]
            r["base_identity_match_rate"] = base["identity_match_rate"]
            r["ism_gain"] = r["ism"] - base["ism"]
            r["wall_seconds"] = round(time.time() - started, 1)
            results["attacks"].append(r)
    (work / "results.json").write_text(json.dumps(results, indent=2))
    if args.markdown:
        Path(args.markdown).write_text(markdown(results, args))
    print("\nbase model: 'a photo of a <class>'")
    for b in results["base"]:
        print(f"  {b['class_noun']:<7} detector {b['detector_rate']:.2f}  match-rate vs a fixed held-out identity "
              f"{b['match_rate_vs_fixed_identity']:.2f}  (n={b['n']})")
    print("\nattacks on held-out identities ('a photo of sks <class>', n=%d)" % args.n)
    for r in results["attacks"]:
        print(f"  {r['class_noun']:<7} {r['method']:<10} match {r['identity_match_rate']:.2f} (base {r['base_identity_match_rate']:.2f})"
              f"  ISM {r['ism']:.3f} (base {r['base_ism']:.3f}, gain {r['ism_gain']:+.3f})  FDFR {r['fdfr']:.2f}"
              f"  train {r['train_seconds']:.0f}s  total {r['wall_seconds']:.0f}s")


def markdown(results: dict, args) -> str:
    lines = [f"Command: `.venv/bin/python benchmarks/sandbox_acceptance.py --out DIR --classes {args.classes} "
             f"--methods {args.methods} --identity {args.identity} --n {args.n} --seed {args.seed}`", "",
             "Base model, 'a photo of a <class>':", "",
             "| class | detector rate | match rate vs a fixed held-out identity | n |", "|---|---|---|---|"]
    lines += [f"| {b['class_noun']} | {b['detector_rate']:.2f} | {b['match_rate_vs_fixed_identity']:.2f} | {b['n']} |"
              for b in results["base"]]
    lines += ["", f"Attacks on held-out identities, 'a photo of sks <class>', {args.n} generations:", "",
              "| class | attack | identity match rate | base match rate | ISM | base ISM | ISM gain | FDFR | train s | total s |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['class_noun']} | {r['method']} | {r['identity_match_rate']:.2f} | {r['base_identity_match_rate']:.2f} | "
              f"{r['ism']:.3f} | {r['base_ism']:.3f} | {r['ism_gain']:+.3f} | {r['fdfr']:.2f} | {r['train_seconds']:.0f} | "
              f"{r['wall_seconds']:.0f} |" for r in results["attacks"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
