"""The `noclone audit` command line.

    noclone audit --model PROTECTED --images SUBJECT_DIR [--class-noun C] [--base ORIGINAL] --out DIR
    noclone audit --cloaked DIR --clean DIR --model M [--class-noun C] --out DIR
    ... [--battery quick|full|FILE.yaml] [--threshold 0.2] [--seeds 0,1] [--other-images DIR] [--shard I/N]
    noclone audit --list-batteries | --print-battery NAME

Every attacker of the battery fine-tunes (or purifies, or operates on) what you publish; the verdict is the worst
identity match any of them reaches. A killed audit resumes: rerun the same command.
"""

from __future__ import annotations

import argparse
import logging

from noclone.errors import NocloneError

log = logging.getLogger("noclone")


def _class_noun(args: argparse.Namespace, level: str) -> str:
    """--class-noun, else the one the protection's card records."""
    if args.class_noun:
        return args.class_noun
    from noclone.audit.run import AuditConfig, _read_card

    card = _read_card(AuditConfig(level, args.model, "", cloaked=args.cloaked))
    if card:
        noun = (card.get("class_noun") or (card.get("settings") or {}).get("class_noun")  # cloak.json
                or next((s.get("class_noun") for s in card.get("subjects", [])), None))  # protection.json
        if noun:
            return str(noun)
    raise NocloneError("--class-noun is required (the protection's card does not name the subject's class)")


def cmd_audit(args: argparse.Namespace) -> None:
    from importlib import resources

    from noclone.audit.battery import battery_names
    from noclone.audit.run import AuditConfig, run_audit
    from noclone.bench.config import EvaluationSpec, GenerationSpec
    from noclone.bench.runner import parse_shard

    if args.list_batteries:
        print("\n".join(battery_names()))
        return
    if args.print_battery:
        if args.print_battery not in battery_names():
            raise NocloneError(f"unknown battery {args.print_battery!r}; shipped: {', '.join(battery_names())}")
        print(resources.files("noclone.audit").joinpath("batteries.yaml").read_text(), end="")
        return
    if args.images and (args.cloaked or args.clean):
        raise NocloneError("give --images (audit a protected model) or --cloaked and --clean (audit cloaked photos)")
    if not args.images and not (args.cloaked and args.clean):
        raise NocloneError("give --images SUBJECT_DIR (model-level) or both --cloaked DIR and --clean DIR (cloaks)")
    if not args.out:
        raise NocloneError("--out DIR is required")
    level = "model" if args.images else "cloak"
    try:
        seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()]
    except ValueError:
        raise NocloneError(f"--seeds {args.seeds}: expected integers like 0,1") from None
    config = AuditConfig(
        level=level, model=args.model, class_noun=_class_noun(args, level), images=args.images, cloaked=args.cloaked,
        clean=args.clean, base=args.base, references=args.references, other_images=args.other_images,
        battery=args.battery, threshold=args.threshold, seeds=seeds, images_per_prompt=args.images_per_prompt,
        attack_preset=args.attack_preset, device=args.device, dtype=args.dtype,
        generation=GenerationSpec(steps=args.generation_steps), generic_samples=args.generic_samples,
        evaluation=EvaluationSpec(backend=args.evaluation_backend, arcface_models=args.arcface_models),
        progress=not args.quiet)
    result = run_audit(config, args.out, parse_shard(args.shard) if args.shard else None, cache=args.cache)
    worst = result.get("worst")
    verdict = {True: "HOLDS", False: "BROKEN", None: "NOT MEASURED"}[result.get("passed")]
    line = f"audit: {verdict} at threshold {config.threshold:g}"
    if worst:
        line += f"; worst case {worst['attacker']} (match {worst['identity_match_rate']:.2f})"
    if result.get("missing_jobs"):
        line += f"; {len(result['missing_jobs'])} job(s) still to run"
    print(line)
    print(f"audit report: {args.out}/audit.html")


def add_audit_parser(subparsers) -> argparse.ArgumentParser:
    """Register `audit` on the main parser's subparsers."""
    p = subparsers.add_parser("audit", help="worst-case audit of a protection against a battery of attackers",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="sandbox",
                   help="the protected model (model-level) or the model the attacker fine-tunes (cloaks)")
    p.add_argument("--images", help="model-level: the protected subject's clean photos")
    p.add_argument("--cloaked", help="cloak-level: the cloaked photos (a folder written by protect-images)")
    p.add_argument("--clean", help="cloak-level: the same photos, clean")
    p.add_argument("--class-noun", help="the subject's class (default: what the protection's card says)")
    p.add_argument("--base", help="model-level: the unprotected original (reference, surgery, collateral)")
    p.add_argument("--references", help="photos identity is measured against (default: the clean photos)")
    p.add_argument("--other-images", help="model-level: another subject of the class (collateral)")
    p.add_argument("--battery", default="quick", help="quick, full or a YAML file (see --print-battery quick)")
    p.add_argument("--threshold", type=float, default=0.2, help="the protection holds if no attacker's identity "
                                                                "match exceeds this (default 0.2)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    p.add_argument("--images-per-prompt", type=int, default=16)
    p.add_argument("--generation-steps", type=int, default=25, help="sampling steps of every generated image")
    p.add_argument("--generic-samples", type=int, default=32,
                   help="model-level collateral: class-prompt samples per model for the detector rate and FID")
    p.add_argument("--attack-preset", choices=("sandbox", "sd15"), help="attack settings' scale (default sandbox)")
    p.add_argument("--evaluation-backend", default="sandbox", choices=("sandbox", "dlib", "arcface"))
    p.add_argument("--arcface-models", help="arcface backend: an insightface model folder")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--out", help="output folder: cache/, rows/, audit.json, audit.html, protection.json")
    p.add_argument("--cache", help="stage cache (default OUT/cache); share one between audits of the same base "
                                   "model so the unprotected reference is computed once")
    p.add_argument("--shard", metavar="I/N", help="run only every N-th job from I (start all N on the same --out)")
    p.add_argument("--list-batteries", action="store_true")
    p.add_argument("--print-battery", metavar="NAME", help="print the shipped batteries' YAML (to copy and edit)")
    p.set_defaults(func=cmd_audit)
    return p
