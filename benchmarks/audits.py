"""Audit every shipped defence in the sandbox and publish the cards (docs/audits/<defence>/).

    python benchmarks/audits.py --work W [--only rid,aspl,apdm,apdm-guard,persguard-unet,persguard-decoder]
                                [--battery quick] [--seeds 0] [--publish docs/audits]

For each defence: protect one held-out subject (a person the model and the evaluator never saw) with the shipped
command, then `noclone audit` it with the battery. All audits share one stage cache (W/cache), so the attacks on
the unprotected model and the clean photos (the reference and its relearning curve) are computed once. Every step
is resumable: rerun the same command. The model-level defences follow the fidelity card's scaling rule (N_protect
equals the attack's length, 300 steps; the inner lrs are the attacker's); the cloaks run at the paper's budget
(0.05 in [-1, 1] = 0.025 in pixels).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

SUBJECT, OTHER = 120, 121          # held-out indices (the fidelity card uses 100-115)
CLASS = "person"
NOCLONE = [sys.executable, "-m", "noclone.cli"]

MODEL_DEFENCES = {
    "apdm": ["--method", "apdm", "--steps", "300"],
    "apdm-guard": ["--method", "apdm", "--steps", "300", "--implant", "both"],
    "persguard-unet": ["--method", "persguard", "--target", "pattern", "--steps", "300", "--implant", "unet"],
    "persguard-decoder": ["--method", "persguard", "--target", "pattern", "--steps", "300", "--implant", "decoder"],
}
CLOAKS = {
    "rid": ["--method", "rid"],
    "aspl": ["--method", "aspl", "--model", "sandbox", "--budget", "0.025"],
}
ORDER = ["rid", "apdm", "aspl", "apdm-guard", "persguard-unet", "persguard-decoder"]


def run(cmd: list[str], log: Path) -> None:
    print("$", " ".join(map(str, cmd)), flush=True)
    started = time.time()
    with open(log, "a") as handle:
        done = subprocess.run(list(map(str, cmd)), stdout=handle, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}) after {time.time() - started:.0f}s: see {log}")
    print(f"  done in {time.time() - started:.0f}s", flush=True)


def render(work: Path, name: str, identity: int, first: int, n: int, log: Path) -> Path:
    from noclone.sandbox.splits import held_out

    out = work / "photos" / name
    if not out.is_dir():
        run(NOCLONE + ["-q", "sandbox", "render", "--class-noun", CLASS, "--identity", held_out(identity),
                       "--first-photo", first, "--n", n, "--out", out], log)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True, type=Path)
    parser.add_argument("--only", default=",".join(ORDER))
    parser.add_argument("--battery", default="quick")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--publish", type=Path, help="copy each finished card here (docs/audits)")
    args = parser.parse_args()
    wanted = [d.strip() for d in args.only.split(",") if d.strip()]
    unknown = set(wanted) - set(ORDER)
    if unknown:
        sys.exit(f"unknown defence(s) {', '.join(sorted(unknown))}; choose from {', '.join(ORDER)}")
    work = args.work
    (work / "logs").mkdir(parents=True, exist_ok=True)
    log = work / "logs" / "commands.log"
    subject = render(work, "subject", SUBJECT, 0, 5, log)
    references = render(work, "references", SUBJECT, 100, 8, log)
    other = render(work, "other", OTHER, 0, 5, log)
    for name in [d for d in ORDER if d in wanted]:
        out = work / "audits" / name
        common = ["--battery", args.battery, "--seeds", args.seeds, "--cache", work / "cache", "--out", out,
                  "--references", references, "--class-noun", CLASS]
        if name in MODEL_DEFENCES:
            model = work / "models" / name
            if not (model / "model_index.json").is_file():
                run(NOCLONE + ["-q", "protect-model", *MODEL_DEFENCES[name], "--images", subject, "--class-noun",
                               CLASS, "--out", model], work / "logs" / f"{name}.log")
            audit = ["audit", "--model", model, "--images", subject, "--base", "sandbox", "--other-images", other]
        else:
            cloaked = work / "cloaked" / name
            if not cloaked.is_dir():
                run(NOCLONE + ["-q", "protect-images", *CLOAKS[name], "--images", subject, "--out", cloaked],
                    work / "logs" / f"{name}.log")
            audit = ["audit", "--cloaked", cloaked, "--clean", subject, "--model", "sandbox"]
        run(NOCLONE + audit + common, work / "logs" / f"{name}.log")
        result = json.loads((out / "audit.json").read_text())
        worst = result.get("worst") or {}
        print(f"{name}: passed={result['passed']} worst={worst.get('attacker')} "
              f"{worst.get('identity_match_rate')} unprotected={result.get('unprotected_match')}", flush=True)
        if args.publish:
            target = args.publish / name
            target.mkdir(parents=True, exist_ok=True)
            for f in ("audit.html", "audit.json", "audit-relearning.png", "protection.json"):
                if (out / f).is_file():
                    shutil.copy(out / f, target / f)
            (args.publish / "summary.md").write_text(summary(args.publish))


def summary(folder: Path) -> str:
    """A markdown table of every audit published under `folder`: verdict, worst case, claim, relearning."""
    lines = ["| defence | verdict (match <= 0.2) | worst attacker: match (the same attack unprotected) | worst within "
             "the claim | preset attack: protected (unprotected) | relearning: protected match at 0.5x / 1x / 2x / 4x "
             "| other subject (protected vs base) | class prompt: detector failures (protected vs base) "
             "| backdoor fires: preset attack / weakest |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in ORDER:
        path = folder / name / "audit.json"
        if not path.is_file():
            continue
        r = json.loads(path.read_text())
        worst, within = r.get("worst") or {}, r.get("worst_within_claim") or {}
        curve = {x: y for x, y in r["relearning"]["curves"].get("protected", [])}
        c = r.get("collateral") or {}
        other = (f"{c['protected']['identity_match_rate']:.2f} vs {c['unprotected']['identity_match_rate']:.2f}"
                 if "protected" in c and "unprotected" in c else "-")
        verdict = {True: "holds", False: "**broken**", None: "-"}[r.get("passed")]
        missing = f" ({len(r['missing_jobs'])} jobs missing)" if r.get("missing_jobs") else ""
        rows = {t["attacker"]: t for t in r["table"]}
        own = rows.get(worst.get("attacker"), {}).get("unprotected_match")
        preset = rows.get("preset", {}).get("identity_match_rate")

        def num(v) -> str:
            return "-" if v is None else f"{v:.2f}"

        lines.append(
            f"| [{name}]({name}/audit.html) | {verdict}{missing} | {worst.get('attacker', '-')}: "
            f"{num(worst.get('identity_match_rate'))} ({num(own)}) | {within.get('attacker', '-')}: "
            f"{num(within.get('identity_match_rate'))} | {num(preset)} ({num(r.get('unprotected_match'))}) | "
            + " / ".join(f"{curve[x]:.2f}" if x in curve else "-" for x in (0.5, 1.0, 2.0, 4.0)) + f" | {other} | "
            + (f"{num(c['generic_protected'].get('fdfr'))} vs {num(c['generic_base'].get('fdfr'))}"
               if "generic_protected" in c and "generic_base" in c else "-") + " | "
            + (f"{num(rows.get('preset', {}).get('backdoor_rate'))} / {r['weakest_backdoor']['attacker']} "
               f"{num(r['weakest_backdoor']['backdoor_rate'])}" if r.get("weakest_backdoor") else "-") + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
