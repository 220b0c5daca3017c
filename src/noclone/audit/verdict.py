"""The audit's verdict from its rows (pure: no model, no files): the worst case over the battery, each attacker's
figures, the relearning curve and the steps an attacker needs, and the collateral."""

from __future__ import annotations

from statistics import mean

from noclone.audit.battery import Attacker
from noclone.audit.threats import ThreatModel

METRICS = ("identity_match_rate", "ism", "fdfr", "backdoor_rate", "fid")


def _mean(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return round(mean(values), 4) if values else None


def _figures(rows: list[dict]) -> dict:
    return {"n_seeds": len(rows), **{k: _mean(rows, k) for k in METRICS if any(r.get(k) is not None for r in rows)},
            "per_seed": {str(r["seed"]): r.get("identity_match_rate") for r in rows}}


def steps_to_reach(curve: list[tuple[float, float]], target: float | None) -> float | None:
    """The smallest attack length (interpolated between measured lengths) whose match reaches `target`; None when
    no measured length does. A curve already at the target at its shortest length returns that length."""
    if target is None or not curve:
        return None
    curve = sorted(curve)
    if curve[0][1] >= target:
        return curve[0][0]
    for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
        if y1 >= target:
            return round(x0 + (target - y0) / (y1 - y0) * (x1 - x0), 3) if y1 != y0 else x1
    return None


def verdict(rows: list[dict], attackers: dict[str, Attacker], threats: ThreatModel, threshold: float,
            relearning: list[float]) -> dict:
    """Worst case, per-attacker rows, relearning and collateral; `passed` is None until a protected row exists."""
    by: dict[tuple, list[dict]] = {}
    for r in rows:
        by.setdefault((r["side"], r.get("attacker"), float(r.get("length", 1.0))), []).append(r)

    table = []
    reference = by.get(("unprotected", "preset", 1.0))
    unprotected_match = _mean(reference, "identity_match_rate") if reference else None
    for name, attacker in attackers.items():
        found = by.get(("protected", name, 1.0))
        if not found:
            continue
        fig = _figures(found)
        own = by.get(("unprotected", name, 1.0))
        base_match = _mean(own, "identity_match_rate") if own else unprotected_match
        outside = threats.outside(attacker)
        table.append({"attacker": name, "kind": attacker.kind, **fig, "within_claim": not outside,
                      "outside_claim": outside,
                      "unprotected_match": base_match, "unprotected_is_own": bool(own),
                      "drop_vs_unprotected": (round(base_match - fig["identity_match_rate"], 4)
                                              if base_match is not None and fig.get("identity_match_rate")
                                              is not None else None)})
    measured = [t for t in table if t.get("identity_match_rate") is not None]
    worst = max(measured, key=lambda t: t["identity_match_rate"], default=None)
    within = [t for t in measured if t["within_claim"]]
    worst_within = max(within, key=lambda t: t["identity_match_rate"], default=None)

    def pick(t):
        return {"attacker": t["attacker"], "identity_match_rate": t["identity_match_rate"]} if t else None

    curves = {}
    for side in ("protected", "unprotected"):
        points = []
        for length in relearning or [1.0]:
            found = by.get((side, "preset", float(length)))
            if found:
                points.append((float(length), _mean(found, "identity_match_rate")))
        curves[side] = [[x, y] for x, y in points if y is not None]
    reach = steps_to_reach([tuple(p) for p in curves["protected"]], unprotected_match)

    collateral: dict = {}
    for side in ("collateral-protected", "collateral-unprotected"):
        found = by.get((side, "preset", 1.0))
        if found:
            collateral[side.split("-")[1]] = _figures(found)
    for side in ("generic-protected", "generic-base", "generic-floor"):
        found = by.get((side, None, 1.0))
        if found:
            collateral[side.replace("-", "_")] = {k: found[0].get(k) for k in ("fdfr", "fid") if k in found[0]}
    if "protected" in collateral and "unprotected" in collateral:
        a, b = collateral["protected"].get("identity_match_rate"), collateral["unprotected"].get("identity_match_rate")
        collateral["other_subject_change"] = round(a - b, 4) if a is not None and b is not None else None

    backdoors = [t for t in table if t.get("backdoor_rate") is not None]
    weakest_backdoor = min(backdoors, key=lambda t: t["backdoor_rate"], default=None)
    return {
        "passed": None if worst is None else worst["identity_match_rate"] <= threshold,
        "weakest_backdoor": ({"attacker": weakest_backdoor["attacker"], "backdoor_rate": weakest_backdoor["backdoor_rate"]}
                             if weakest_backdoor else None),
        "worst": pick(worst),
        "worst_within_claim": pick(worst_within),
        "unprotected_match": unprotected_match,
        "table": table,
        "relearning": {"lengths": list(relearning), "curves": curves, "target": unprotected_match,
                       "length_to_reach_unprotected": reach},
        "collateral": collateral,
    }
