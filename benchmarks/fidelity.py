"""Long fidelity runs: measure the card on a ladder of scales, widest coverage first, so a run stopped at any
point leaves a card with every effect at the largest scale reached so far.

    .venv/bin/python benchmarks/fidelity.py --out DIR [--model sandbox] [--effects E2,E3,E1,E4,E5]
        [--ladder 1,4,8] [--seeds 0,1] [--clone-attacks dreambooth,lora,ti]

Rung k measures every effect on the first k held-out identities per class (`noclone sandbox fidelity
--identities k`); everything computed on a smaller rung is reused from DIR/bench. Rerun the same command to resume.
Copy DIR/fidelity.json and DIR/fidelity.html to docs/ to publish a card.
"""

from __future__ import annotations

import argparse
import logging
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default="sandbox")
    parser.add_argument("--effects", default="E2,E3,E1,E4,E5,E6,E7", help="in the order to measure them")
    parser.add_argument("--ladder", default="1,4,8", help="identities per class of each rung")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--clone-attacks", default="dreambooth,lora,ti")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from noclone.fidelity.card import Card, FidelityConfig
    from noclone.fidelity.cli import _ints

    effects = tuple(e.strip().upper() for e in args.effects.split(",") if e.strip())
    started = time.time()
    for rung in _ints(args.ladder, "--ladder"):
        config = FidelityConfig(model=args.model, out=args.out, seeds=_ints(args.seeds, "--seeds"), identities=rung,
                                effects=effects, clone_attacks=tuple(args.clone_attacks.split(",")))
        card = Card(config).run()
        summary = ", ".join(f"{e['key']} {e['status']}" for e in card["effects"] if e["key"] in effects)
        print(f"[{time.time() - started:.0f} s] rung {rung} identities per class: {summary}", flush=True)


if __name__ == "__main__":
    main()
