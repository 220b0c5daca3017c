"""The `noclone sandbox fidelity` command line: measure (or resume) a model's fidelity card.

    noclone sandbox fidelity [--model sandbox|DIR] [--seeds 0,1] [--identities 8] [--effects E1,E2,...] --out DIR
"""

from __future__ import annotations

import argparse

from noclone.errors import NocloneError


def _ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise NocloneError(f"{flag} {text!r}: give whole numbers separated by commas, e.g. 0,1") from None
    if not values:
        raise NocloneError(f"{flag} {text!r}: give at least one number")
    return values


def cmd_fidelity(args: argparse.Namespace) -> None:
    from noclone.fidelity.card import Card, FidelityConfig

    effects = tuple(e.strip().upper() for e in args.effects.split(",") if e.strip()) if args.effects else None
    config = FidelityConfig(model=args.model, out=args.out, seeds=_ints(args.seeds, "--seeds"),
                            identities=args.identities, images=args.images, base_images=args.base_images,
                            device=args.device, dtype=args.dtype, progress=not args.quiet,
                            **({"effects": effects} if effects else {}),
                            **({"classes": tuple(c.strip() for c in args.classes.split(","))} if args.classes else {}),
                            **({"clone_attacks": tuple(m.strip() for m in args.clone_attacks.split(","))}
                               if args.clone_attacks else {}))
    card = Card(config)
    result = card.write() if args.report_only else card.run(recompute=args.recompute)
    for effect in result["effects"]:
        print(f"{effect['key']} {effect['status']:<16} {effect['title']}")
    print(f"fidelity card: {card.out / 'fidelity.html'} ({card.out / 'fidelity.json'})")


def add_fidelity_parser(sandbox) -> None:
    p = sandbox.add_parser("fidelity", help="measure whether a sandbox model reproduces the field's effects (E1-E7)")
    p.add_argument("--model", default="sandbox", help="'sandbox' (the shipped model) or a diffusers directory")
    p.add_argument("--out", required=True, help="output folder (rerun the same command to resume)")
    p.add_argument("--seeds", default="0,1", help="attack seeds (default 0,1)")
    p.add_argument("--identities", type=int, default=8, help="held-out identities per class (default 8)")
    p.add_argument("--classes", help="subset of person,dog,cat (default all)")
    p.add_argument("--effects", help="subset of E1,...,E7 (default all)")
    p.add_argument("--clone-attacks", help="E1's attacks, a subset of dreambooth,lora,ti (default all)")
    p.add_argument("--images", type=int, default=32, help="generations per attacked model (default 32)")
    p.add_argument("--base-images", type=int, default=64, help="base-model generations per class (default 64)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--recompute", action="store_true", help="measure effects again (cached stages are still reused)")
    p.add_argument("--report-only", action="store_true", help="rewrite fidelity.json/html from what is measured")
    p.set_defaults(func=cmd_fidelity)
