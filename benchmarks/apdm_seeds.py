"""One APDM setting over several seeds: the per-seed figures of `apdm_acceptance.py` side by side, their mean, and
how many seeds meet each of the issue's criteria.

    for s in 0 1 2; do .venv/bin/python benchmarks/apdm_acceptance.py --out /tmp/apdm-s$s --seed $s \\
        --classes dog --identity 4 --other-identity 5 --quality --outer-steps 300 --repair-steps 600 \\
        --markdown /tmp/apdm-s$s.md; done
    .venv/bin/python benchmarks/apdm_seeds.py /tmp/apdm-s0.json /tmp/apdm-s1.json /tmp/apdm-s2.json

The seed changes the protection's draws, the attacker's and the generations', so the spread printed here is what a
single-seed row of docs/research/apdm.md can be off by.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from statistics import mean

from apdm_acceptance import ADAPTIVE_LIMIT, adaptive_held, criteria  # benchmarks/ is on sys.path when this script runs


def load(paths: list[str]) -> list[dict]:
    runs = []
    for p in paths:
        try:
            runs.append(json.loads(Path(p).read_text()))
        except (OSError, ValueError) as err:
            sys.exit(f"error: {p}: not a results file of apdm_acceptance.py ({err})")
        if "rows" not in runs[-1]:
            sys.exit(f"error: {p}: not a results file of apdm_acceptance.py (no rows)")
    return runs


def cells(runs: list[dict], key: str, fields: tuple[str, ...]) -> dict[tuple, list[dict | None]]:
    """Rows keyed by `fields`, one entry per run (None where a run lacks that row)."""
    keys = list(dict.fromkeys(tuple(r[f] for f in fields) for run in runs for r in run[key]))
    return {k: [next((r for r in run[key] if tuple(r[f] for f in fields) == k), None) for run in runs] for k in keys}


def column(rows: list[dict | None], field: str) -> list[float | None]:
    return [None if r is None else r[field] for r in rows]


def figures(values: list[float | None], fmt: str = "{:.2f}") -> str:
    values = [None if v is None or v != v else v for v in values]  # NaN: not measured for this row
    known = [v for v in values if v is not None]
    per_seed = " / ".join("-" if v is None else fmt.format(v) for v in values)
    return f"{per_seed} (mean {fmt.format(mean(known))})" if known else per_seed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", help="the .json written next to apdm_acceptance.py's --markdown")
    args = parser.parse_args()
    runs = load(args.results)
    seeds = [run.get("settings", {}).get("seed", "?") for run in runs]
    print(f"Seeds {', '.join(map(str, seeds))}; each cell: per seed, then the mean.\n")
    print("| class | subject | attack | match unprotected | match protected | ISM protected | base ISM |")
    print("|---|---|---|---|---|---|---|")
    for (c, subject, attack), rows in cells(runs, "rows", ("class", "subject", "attack")).items():
        print(f"| {c} | {subject} | {attack} | {figures(column(rows, 'match_unprotected'))} | "
              f"{figures(column(rows, 'match_protected'))} | {figures(column(rows, 'ism_protected'), '{:.3f}')} | "
              f"{figures(column(rows, 'base_ism'), '{:.3f}')} |")
    quality = cells(runs, "quality", ("class",))
    if quality:
        print("\n| class | detector base | detector protected | FID base | FID protected |\n|---|---|---|---|---|")
        for (c,), rows in quality.items():
            print(f"| {c} | {figures(column(rows, 'detector_base'))} | {figures(column(rows, 'detector_protected'))} | "
                  f"{figures(column(rows, 'fid_base'), '{:.1f}')} | {figures(column(rows, 'fid_protected'), '{:.1f}')} |")
    print("\nCriteria met, seeds out of those that measured it:")
    verdicts: dict[tuple[str, str], list[bool]] = {}
    for run in runs:
        for c, v in criteria(run["rows"], run.get("quality", [])).items():  # judged again: older files lack it
            for name, ok in v.items():
                verdicts.setdefault((c, name), []).append(ok)
    for (c, name), oks in sorted(verdicts.items()):
        print(f"- {c}, criterion {name}: {sum(oks)} of {len(oks)}")
    for c, attack, oks in adaptive_counts(runs):
        print(f"  - {c}, {attack} at <= {ADAPTIVE_LIMIT:.0%}: {sum(oks)} of {len(oks)}")


def adaptive_counts(runs: list[dict]) -> list[tuple[str, str, list[bool]]]:
    """Criterion 2 per adaptive attacker: (class, attack, per seed that ran it, whether it was held to the limit)."""
    out = []
    for (c, subject, attack), rows in cells(runs, "rows", ("class", "subject", "attack")).items():
        if subject == "protected" and attack != "dreambooth":
            out.append((c, attack, [adaptive_held(r["match_protected"]) for r in rows if r is not None]))
    return out


if __name__ == "__main__":
    main()
