"""audit.html: the verdict, the defence's claim, one row per attacker, the relearning plot and image grids."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from noclone.report import image_grid, page, table

GRID_IMAGES = 8


def relearning_plot(result: dict, path: Path) -> Path | None:
    """Identity match against attack length, protected and unprotected, with the threshold (PNG, matplotlib)."""
    curves = result["relearning"]["curves"]
    if not any(curves.values()):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 3.4), dpi=110)
    for side, style in (("unprotected", "o--"), ("protected", "o-")):
        points = curves.get(side) or []
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], style, label=side)
    ax.axhline(result["threshold"], color="#b3261e", lw=0.8, ls=":", label=f"threshold {result['threshold']:g}")
    reach = result["relearning"].get("length_to_reach_unprotected")
    if reach is not None:
        ax.axvline(reach, color="#666", lw=0.8, ls="--", label=f"reaches unprotected at {reach:g}x")
    ax.set_xscale("log", base=2)
    lengths = sorted({p[0] for points in curves.values() for p in points})
    ax.set_xticks(lengths, [f"{x:g}x" for x in lengths])
    ax.minorticks_off()
    ax.set_xlabel("attack length (x the preset's steps)")
    ax.set_ylabel("identity match rate")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7, loc="best")
    ax.set_title("relearning curve", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _grid(folder: str | None, out: Path, caption: str) -> str:
    from noclone.data.images import load_image_folder

    if not folder:
        return ""
    path = Path(folder) if Path(folder).is_absolute() else out / folder
    if not path.is_dir():
        return ""
    images = [im for _, im in load_image_folder(path)][:GRID_IMAGES]
    if not images:
        return ""
    grid = image_grid(images, columns=GRID_IMAGES, scale=1)
    buffer = io.BytesIO()
    grid.save(buffer, format="JPEG", quality=88)
    data = base64.b64encode(buffer.getvalue()).decode()
    return (f"<figure><img class='grid' style='width:{2 * grid.width}px' alt='{html.escape(caption)}' "
            f"src='data:image/jpeg;base64,{data}'><figcaption class='cap'>{html.escape(caption)}</figcaption></figure>")


def _fmt(value) -> str:
    return "–" if value is None else f"{value:.2f}" if isinstance(value, float) else str(value)


def cost_lines(c: dict) -> list[str]:
    """'What it costs' from the collateral figures: another subject on the protected model against the base
    (`protected` / `unprotected`), the class prompt's detector failures (`generic_protected` / `generic_base`).
    Shared with the demo's report."""
    cost = []
    if "protected" in c and "unprotected" in c:
        cost.append(f"another subject of the class clones at {_fmt(c['protected'].get('identity_match_rate'))} on the "
                    f"protected model against {_fmt(c['unprotected'].get('identity_match_rate'))} on the base")
    if "generic_protected" in c and "generic_base" in c:
        cost.append(f"the class prompt's images fail the detector at {_fmt(c['generic_protected'].get('fdfr'))} "
                    f"against {_fmt(c['generic_base'].get('fdfr'))}")
    return cost


def render_page(result: dict, out: Path) -> str:
    out = Path(out)
    worst, passed = result.get("worst"), result.get("passed")
    badge = ("<span class='good'>holds</span>" if passed else "<span class='bad'>broken</span>" if passed is False
             else "not measured yet")
    threat = result["threat_model"]
    cost = cost_lines(result.get("collateral") or {})
    head = [
        f"<p><b>Verdict: {badge}</b> at threshold {result['threshold']:g} (identity match). "
        + (f"Worst case: <b>{html.escape(worst['attacker'])}</b>, match {_fmt(worst['identity_match_rate'])}. "
           if worst else "")
        + (f"Worst within the defence's claim: {html.escape(result['worst_within_claim']['attacker'])}, "
           f"{_fmt(result['worst_within_claim']['identity_match_rate'])}. " if result.get("worst_within_claim") else "")
        + (f"Unprotected (the preset attack without the protection): {_fmt(result['unprotected_match'])}."
           if result.get("unprotected_match") is not None else "") + "</p>",
        (f"<p><b>What it costs:</b> {html.escape('; '.join(cost))}.</p>" if cost else ""),
        f"<p><b>{html.escape(threat['defence'])}</b> claims: {html.escape(threat['claim'])}"
        + ("<br>It assumes: " + "; ".join(html.escape(t) for t in threat["assumes"].values())
           if threat["assumes"] else "") + "</p>",
        f"<p class='cap'>{result['level']}-level audit, battery {html.escape(result['battery'])}, seeds "
        f"{', '.join(map(str, result['seeds']))}. Inputs: "
        + ", ".join(f"{k} {html.escape(str(v))}" for k, v in result["inputs"].items() if v) + "</p>",
    ]
    if result.get("missing_jobs"):
        head.append(f"<p class='bad'>Incomplete: {len(result['missing_jobs'])} job(s) not run yet "
                    f"({html.escape(', '.join(result['missing_jobs'][:6]))}{'…' if len(result['missing_jobs']) > 6 else ''})."
                    " Rerun the same command to finish.</p>")
    head += [_grid(folder, out, f"the subject: {what}") for what, folder in (result.get("pictures") or {}).items()]
    rows = []
    for t in result["table"]:
        match = t.get("identity_match_rate")
        over = match is not None and match > result["threshold"]
        rows.append([t["attacker"], t["kind"], f"<span class='{'bad' if over else 'good'}'>{_fmt(match)}</span>",
                     _fmt(t.get("ism")), _fmt(t.get("fdfr")), _fmt(t.get("backdoor_rate")),
                     _fmt(t.get("unprotected_match")) + ("" if t.get("unprotected_is_own") else " (preset)"),
                     _fmt(t.get("drop_vs_unprotected")), "yes" if t["within_claim"] else
                     "no: " + "; ".join(t["outside_claim"]), str(t["n_seeds"])])
    sections = head + ["<h2>Attackers</h2>", table(["attacker", "kind", "match", "ISM", "FDFR", "backdoor",
                                                    "unprotected match", "drop", "within the claim", "seeds"], rows)]
    relearn = result["relearning"]
    plot = relearning_plot(result, out / "audit-relearning.png")
    sections.append("<h2>Relearning</h2>")
    if plot is not None:
        sections.append(f"<img src='{plot.name}' alt='relearning curve'>")
    reach = relearn.get("length_to_reach_unprotected")
    sections.append("<p>" + (f"The protected side reaches the unprotected match ({_fmt(relearn['target'])}) at "
                             f"{reach:g}x the preset's steps." if reach is not None else
                             "The protected side does not reach the unprotected match within the measured lengths."
                             if relearn.get("target") is not None else "No unprotected reference (give --base).")
                    + "</p>")
    c = result.get("collateral") or {}
    if c:
        crow = []
        for key, label in (("protected", "another subject, protected model"),
                           ("unprotected", "another subject, base model")):
            if key in c:
                crow.append([label, _fmt(c[key].get("identity_match_rate")), _fmt(c[key].get("fdfr")), "–"])
        for key, label in (("generic_protected", "class prompt, protected model"),
                           ("generic_base", "class prompt, base model"), ("generic_floor", "class prompt, base model, another seed")):
            if key in c:
                crow.append([label, "–", _fmt(c[key].get("fdfr")), _fmt(c[key].get("fid"))])
        sections += ["<h2>Collateral</h2>", table(["what", "match", "FDFR", "FID to base samples"], crow)]
    sections.append("<h2>Images</h2>")
    by_job = {r["job"]: r for r in result["rows"]}
    for r in sorted(by_job.values(), key=lambda r: (r["side"], r.get("attacker") or "", r["length"], r["seed"])):
        if r["seed"] != result["seeds"][0]:
            continue
        label = f"{r['side']} · {r.get('attacker') or 'class samples'} · {r['length']:g}x · match " \
                f"{_fmt(r.get('identity_match_rate'))}"
        sections.append(_grid(r.get("images"), out, label))
    return page("noclone audit", sections)
