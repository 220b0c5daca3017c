"""Calibrate the sandbox attack's length (the rule in docs/fidelity.md): run the `attack-length` bench preset and
print the mean clean match per length and class, and the length the rule picks.

    python benchmarks/attack_length.py --out W [--model sandbox|DIR] [--ledger FILE.jsonl] [--shard I/N]
                                       [--identities 8] [--seeds 0,1]

Resumable (the bench cache in W); start N shards side by side on the same --out to split it over cores. With
--ledger, each finished subject and seed is appended to FILE (one JSON row per length) and skipped by every later
run, so a calibration of many CPU-hours carries across machines when the ledger is committed (the cache need not
be). With fewer --identities or seeds the table is printed but marked as below the rule's scale.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

from noclone.bench.config import load_raw, validate
from noclone.bench.runner import parse_shard, run_bench

RULE_IDENTITIES, RULE_SEEDS = 8, (0, 1)
LEDGER_KEYS = ("model", "subject", "class_noun", "attack", "seed", "identity_match_rate", "fdfr")


def read_ledger(path: Path | None, model: str) -> list[dict]:
    """The ledger's rows for this model (a ledger may hold several worlds)."""
    if path is None or not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("world") == model]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default="sandbox", help="the world to calibrate: a shipped model's name or a directory")
    parser.add_argument("--ledger", type=Path, help="JSONL of finished subjects and seeds (appended, then skipped)")
    parser.add_argument("--shard")
    parser.add_argument("--identities", type=int, default=RULE_IDENTITIES)
    parser.add_argument("--seeds", default="0,1")
    args = parser.parse_args()
    raw, base = load_raw(preset="attack-length")
    seeds = [int(s) for s in args.seeds.split(",")]
    per_class = defaultdict(list)
    for s in raw["subjects"]:
        per_class[s["class"]].append(s)
    subjects = [s for c in per_class.values() for s in c[: args.identities]]
    if args.model != "sandbox":
        raw["models"] = [{"name": "model", "path": args.model}]
    attacks = [a["name"] for a in raw["attacks"]]
    world = Path(args.model).name  # the ledger's name for the world: a shipped name or the model folder's name

    rows = []
    if args.ledger is None:
        raw["subjects"], raw["seeds"] = subjects, seeds
        rows = run_bench(validate(raw, base), args.out, shard=parse_shard(args.shard) if args.shard else None)["rows"]
    else:
        # one bench run per subject and seed, so that each finished pair reaches the ledger at once
        index, count = parse_shard(args.shard) if args.shard else (1, 1)
        pairs = [(s, seed) for seed in seeds for s in subjects]
        for n, (subject, seed) in enumerate(pairs):
            done = {(r["class"], r["identity"], r["seed"]) for r in read_ledger(args.ledger, world)}
            if n % count != index - 1 or (subject["class"], subject["identity"], seed) in done:
                continue
            one = dict(raw, subjects=[subject], seeds=[seed])
            new = [r for r in run_bench(validate(one, base), args.out, progress=False)["rows"]
                   if r.get("identity_match_rate") is not None]
            args.ledger.parent.mkdir(parents=True, exist_ok=True)
            with args.ledger.open("a") as f:  # one short line per write: shards may append side by side
                for r in new:
                    f.write(json.dumps({"world": world, "class": subject["class"], "identity": subject["identity"],
                                        **{k: r.get(k) for k in LEDGER_KEYS}}) + "\n")
            print(f"ledger: {subject['class']} {subject['identity']} seed {seed} done ({len(new)} rows)", flush=True)
        scope = {(s["class"], s["identity"], seed) for s, seed in pairs}
        rows = [r for r in read_ledger(args.ledger, world) if (r["class"], r["identity"], r["seed"]) in scope]

    table = defaultdict(list)
    for row in rows:
        if row.get("identity_match_rate") is not None:
            table[(row["attack"], row["class_noun"])].append(row["identity_match_rate"])
            table[(row["attack"], "all")].append(row["identity_match_rate"])
    classes = ["person", "dog", "cat", "all"]
    print("| length | " + " | ".join(classes) + " |\n|---|" + "---|" * len(classes))
    means = {}
    for a in attacks:
        cells = []
        for c in classes:
            values = table.get((a, c), [])
            cells.append(f"{statistics.mean(values):.3f} (n={len(values)})" if values else "-")
        means[a] = statistics.mean(table[(a, "all")]) if table.get((a, "all")) else None
        print(f"| {a} | " + " | ".join(cells) + " |")
    complete = all(len(table.get((a, "all"), [])) >= 3 * args.identities * len(seeds) for a in attacks)
    full_scale = args.identities >= RULE_IDENTITIES and tuple(seeds) == RULE_SEEDS
    if complete and any(v is not None for v in means.values()):
        best = max(attacks, key=lambda a: (means[a], -attacks.index(a)))  # ties go to the shorter
        scale = "" if full_scale else " (below the rule's scale: not a calibration)"
        print(f"rule: {best} (mean match {means[best]:.3f}){scale}")
    else:
        print("rule: not decided yet (rows missing; rerun, or run the other shards)")


if __name__ == "__main__":
    main()
