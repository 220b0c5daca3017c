"""The effects a sandbox must reproduce for its protection figures to mean something, and how each is judged.

Each effect is a published finding about Stable Diffusion (the paper's figure is quoted beside ours on the card).
`judge_*` functions take the measured numbers (plain dicts, see `noclone.fidelity.card`) and return a verdict:
{"status": "pass" | "fail" | "not measured", "checks": [{"name", "value", "target", "ok"}], "note"}. They compute
nothing else, so the verdict of any measurement can be re-derived from fidelity.json alone.

Thresholds marked "ours" are not from a paper: they turn a qualitative finding ("a rare token has its own direction",
"purification gives back most of the clone") into a number, and are stated on the card.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import mean


@dataclass(frozen=True)
class Effect:
    key: str
    title: str
    paper: str   # what the field reports on Stable Diffusion
    target: str  # what this card requires of the sandbox


EFFECTS = (
    Effect("E1", "DreamBooth, LoRA and textual inversion clone a subject",
           "DreamBooth on SD1.5 clones essentially every face (Anti-DreamBooth: ISM ~0.6-0.7, FDFR < 0.1 on clean "
           "photos); LoRA and TI bind a subject with less fidelity",
           "identity match, per class: DreamBooth mean >= 0.90 and worst identity >= 0.70; LoRA mean >= 0.80; "
           "TI mean >= 0.50"),
    Effect("E2", "The base model draws its classes",
           "SD1.5 samples of 'a photo of a person' are persons",
           "generic detector rate >= 0.95 per class; FID to renders reported beside the render-to-render floor"),
    Effect("E3", "Text matters as in SD",
           "CLIP gives a rare token its own direction (the reason DreamBooth uses one); guidance 7.5 beats "
           "guidance 1 on FID",
           "identifier displacement >= 0.25 of the distance between two classes, distinct tokens' displacements "
           "not collinear (cosine <= 0.9) (ours); FID at guidance 7.5 < at guidance 1 for every class"),
    Effect("E4", "Cloaks work (Anti-DreamBooth)",
           "ASPL at eps 0.05 in [-1,1] cuts DreamBooth's identity similarity and multiplies FDFR; ASPL/FSMG, which "
           "attack the fine-tuning, protect more than PhotoGuard, which attacks the encoder",
           "ASPL at the paper budget at least halves DreamBooth's match rate and raises FDFR; ASPL and FSMG match "
           "rates below PhotoGuard's"),
    Effect("E5", "Cloaks fail under purification (Hönig et al. 2024; CopyrightMeter)",
           "JPEG 75 or img2img at strength 0.1 restores most of the mimicry from cloaked photos",
           "from ASPL-cloaked photos, each purification gives back at least half of what the cloak took "
           "(ours: 'most' made a number)"),
    Effect("E6", "APDM protects the subject, not the class",
           "APDM Table 1/3: the subject's DINO .6525 -> .1167, other subjects unaffected",
           "protected subject <= 0.20 match; another subject of the class within 0.10 of its unprotected rate; "
           "generic FID within +15 %"),
    Effect("E7", "PersGuard's backdoor fires for the protected subject only",
           "PersGuard: the backdoor output after the attacker's DreamBooth on the protected subject, normal "
           "personalization of others",
           "backdoor rate >= 0.80 on the protected subject's generations, <= 0.10 on another subject's"),
)
EFFECT_KEYS = tuple(e.key for e in EFFECTS)

CLONE_TARGETS = {"dreambooth": (0.90, 0.70), "lora": (0.80, None), "ti": (0.50, None)}  # (class mean, worst identity)
IDENTIFIER_RATIO = 0.25
IDENTIFIER_MAX_COSINE = 0.9
DETECTOR_TARGET = 0.95
CLOAK_CUT = 0.5
PURIFY_GIVES_BACK = 0.5
MIN_CLOAK_EFFECT = 0.10   # below this the cloak took nothing worth giving back: E5 cannot be judged
APDM_SUBJECT_MAX, APDM_OTHER_POINTS, APDM_FID_RATIO = 0.20, 0.10, 1.15
PERSGUARD_FIRES, PERSGUARD_QUIET = 0.80, 0.10


def check(name: str, value: float | None, target: str, ok: bool | None) -> dict:
    return {"name": name, "value": None if value is None else round(float(value), 4), "target": target,
            "ok": None if value is None else bool(ok)}


def verdict(checks: list[dict], note: str = "") -> dict:
    """pass only when every check was measured and holds; 'not measured' when none was."""
    measured = [c for c in checks if c["ok"] is not None]
    if not measured:
        status = "not measured"
    elif len(measured) < len(checks):
        status = "fail" if any(not c["ok"] for c in measured) else "partly measured"
    else:
        status = "pass" if all(c["ok"] for c in measured) else "fail"
    return {"status": status, "checks": checks, "note": note}


def _by_identity(rows: list[dict], key: str = "identity_match_rate") -> dict[str, dict[str, float]]:
    """{class: {subject: mean over seeds}} of a metric from bench-like rows."""
    out: dict[str, dict[str, list[float]]] = {}
    for r in rows:
        if r.get(key) is not None and not (isinstance(r[key], float) and math.isnan(r[key])):
            out.setdefault(r["class_noun"], {}).setdefault(r["subject"], []).append(float(r[key]))
    return {c: {s: mean(v) for s, v in subjects.items()} for c, subjects in out.items()}


def judge_e1(rows_by_attack: dict[str, list[dict]]) -> dict:
    checks = []
    for attack, (mean_target, worst_target) in CLONE_TARGETS.items():
        per_class = _by_identity(rows_by_attack.get(attack, []))
        if not per_class:
            checks.append(check(f"{attack}: mean match", None, f">= {mean_target}", None))
            continue
        for class_noun, subjects in sorted(per_class.items()):
            m = mean(subjects.values())
            n = len(subjects)
            checks.append(check(f"{attack}, {class_noun}: mean match ({n} identit{'y' if n == 1 else 'ies'})", m,
                                f">= {mean_target}", m >= mean_target))
            if worst_target is not None:
                w = min(subjects.values())
                checks.append(check(f"{attack}, {class_noun}: worst identity", w, f">= {worst_target}",
                                    w >= worst_target))
    return verdict(checks)


def judge_e2(per_class: dict[str, dict]) -> dict:
    checks = [check(f"{c}: detector rate", v.get("detector_rate"), f">= {DETECTOR_TARGET}",
                    v.get("detector_rate") is not None and v["detector_rate"] >= DETECTOR_TARGET)
              for c, v in sorted(per_class.items())]
    return verdict(checks or [check("detector rate", None, f">= {DETECTOR_TARGET}", None)],
                   "FID to renders (sandbox features) is reported, not judged: no paper figure transfers")


def judge_e3(text: dict | None, guidance: dict[str, dict]) -> dict:
    checks = []
    if text:
        ratio = text.get("identifier_to_class_ratio")
        checks.append(check("identifier displacement / class distance", ratio, f">= {IDENTIFIER_RATIO}",
                            ratio is not None and ratio >= IDENTIFIER_RATIO))
        cos = text.get("max_pairwise_cosine")
        checks.append(check("largest cosine between two identifiers' displacements", cos,
                            f"<= {IDENTIFIER_MAX_COSINE}", cos is not None and cos <= IDENTIFIER_MAX_COSINE))
    else:
        checks.append(check("identifier displacement / class distance", None, f">= {IDENTIFIER_RATIO}", None))
    for c, v in sorted(guidance.items()):
        a, b = v.get("fid_guided"), v.get("fid_unguided")
        diff = None if a is None or b is None else a - b
        checks.append(check(f"{c}: FID at guidance 7.5 minus at guidance 1", diff, "< 0", diff is not None and diff < 0))
    return verdict(checks, "the guidance gap (how far a prompt moves the noise prediction) is reported beside")


def _pooled(rows: list[dict], key: str) -> float | None:
    vals = [float(r[key]) for r in rows if r.get(key) is not None]
    return mean(vals) if vals else None


def judge_e4(rows: list[dict]) -> dict:
    by = {d: [r for r in rows if r["defence"] == d] for d in {r["defence"] for r in rows}}
    none, aspl = _pooled(by.get("none", []), "identity_match_rate"), _pooled(by.get("aspl", []), "identity_match_rate")
    checks = [check("ASPL match / clean match", None if none in (None, 0) or aspl is None else aspl / none,
                    f"<= {CLOAK_CUT}", none not in (None, 0) and aspl is not None and aspl <= CLOAK_CUT * none)]
    f_none, f_aspl = _pooled(by.get("none", []), "fdfr"), _pooled(by.get("aspl", []), "fdfr")
    checks.append(check("ASPL FDFR minus clean FDFR", None if f_none is None or f_aspl is None else f_aspl - f_none,
                        "> 0", f_none is not None and f_aspl is not None and f_aspl > f_none))
    photoguard = _pooled(by.get("photoguard", []), "identity_match_rate")
    for method in ("aspl", "fsmg"):
        m = _pooled(by.get(method, []), "identity_match_rate")
        checks.append(check(f"{method} match minus PhotoGuard match", None if m is None or photoguard is None
                            else m - photoguard, "< 0", m is not None and photoguard is not None and m < photoguard))
    return verdict(checks)


def judge_e5(rows: list[dict]) -> dict:
    def rate(defence: str, transform: str) -> float | None:
        return _pooled([r for r in rows if r["defence"] == defence and r["transform"] == transform],
                       "identity_match_rate")

    clean, cloaked = rate("none", "none"), rate("aspl", "none")
    taken = None if clean is None or cloaked is None else clean - cloaked
    worked = taken is not None and taken >= MIN_CLOAK_EFFECT
    checks = [check("match rate the cloak took (clean minus ASPL; needed to judge a purification)", taken,
                    f">= {MIN_CLOAK_EFFECT}", worked)]
    for transform in sorted({r["transform"] for r in rows} - {"none"}):
        purified = rate("aspl", transform)
        share = (purified - cloaked) / taken if worked and purified is not None else None
        checks.append(check(f"{transform}: share of the cloak's effect given back", share, f">= {PURIFY_GIVES_BACK}",
                            share is not None and share >= PURIFY_GIVES_BACK))
    note = "" if worked or taken is None else ("the cloak took next to nothing, so there is nothing for a "
                                               "purification to give back: E5 cannot be reproduced until E4 is")
    return verdict(checks, note)


def judge_protection(protected: list[dict], other: list[dict], other_clean: list[dict], key: str,
                     fid: tuple[float, float] | None = None) -> dict:
    """E6 (key 'identity_match_rate') and E7 (key 'backdoor_rate') from the protected and the other subject's rows."""
    p, o, oc = _pooled(protected, key), _pooled(other, key), _pooled(other_clean, key)
    if key == "backdoor_rate":
        checks = [check("backdoor rate, protected subject", p, f">= {PERSGUARD_FIRES}",
                        p is not None and p >= PERSGUARD_FIRES),
                  check("backdoor rate, another subject", o, f"<= {PERSGUARD_QUIET}",
                        o is not None and o <= PERSGUARD_QUIET)]
    else:
        checks = [check("match, protected subject", p, f"<= {APDM_SUBJECT_MAX}", p is not None and p <= APDM_SUBJECT_MAX),
                  check("another subject: protected minus unprotected match", None if o is None or oc is None
                        else o - oc, f">= -{APDM_OTHER_POINTS}", o is not None and oc is not None
                        and o >= oc - APDM_OTHER_POINTS)]
        ratio = None if not fid or not fid[1] else fid[0] / fid[1]
        checks.append(check("generic FID, protected / base", ratio, f"<= {APDM_FID_RATIO}",
                            ratio is not None and ratio <= APDM_FID_RATIO))
    return verdict(checks)
