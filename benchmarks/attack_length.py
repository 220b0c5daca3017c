"""Calibrate the sandbox attack's length (the rule in docs/fidelity.md): run the `attack-length` bench preset and
print the mean clean match per length and class, and the length the rule picks.

    python benchmarks/attack_length.py --out W [--shard I/N] [--identities 8] [--seeds 0,1]

Resumable (the bench cache); start N shards side by side on the same --out to split it over cores. With fewer
--identities or seeds the table is printed but marked as below the rule's scale.
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict

from noclone.bench.config import load_raw, validate
from noclone.bench.runner import parse_shard, run_bench

RULE_IDENTITIES, RULE_SEEDS = 8, (0, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--shard")
    parser.add_argument("--identities", type=int, default=RULE_IDENTITIES)
    parser.add_argument("--seeds", default="0,1")
    args = parser.parse_args()
    raw, base = load_raw(preset="attack-length")
    seeds = [int(s) for s in args.seeds.split(",")]
    per_class = defaultdict(list)
    for s in raw["subjects"]:
        per_class[s["class"]].append(s)
    raw["subjects"] = [s for c in per_class.values() for s in c[: args.identities]]
    raw["seeds"] = seeds
    result = run_bench(validate(raw, base), args.out, shard=parse_shard(args.shard) if args.shard else None)
    table = defaultdict(list)
    for row in result["rows"]:
        if row.get("identity_match_rate") is not None:
            table[(row["attack"], row["class_noun"])].append(row["identity_match_rate"])
            table[(row["attack"], "all")].append(row["identity_match_rate"])
    attacks = [a["name"] for a in raw["attacks"]]
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
    complete = all(len(table.get((a, "all"), [])) == 3 * args.identities * len(seeds) for a in attacks)
    full_scale = args.identities >= RULE_IDENTITIES and tuple(seeds) == RULE_SEEDS
    if complete and any(v is not None for v in means.values()):
        best = max(attacks, key=lambda a: (means[a], -attacks.index(a)))  # ties go to the shorter
        scale = "" if full_scale else " (below the rule's scale: not a calibration)"
        print(f"rule: {best} (mean match {means[best]:.3f}){scale}")
    else:
        print("rule: not decided yet (rows missing; rerun, or run the other shards)")


if __name__ == "__main__":
    main()
