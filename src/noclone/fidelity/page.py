"""fidelity.html: one row per effect (the paper's finding, the target, our figures, pass/fail), then image grids."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from noclone.report import STYLE, image_grid

BADGES = {"pass": ("good", "pass"), "fail": ("bad", "fail"), "partly measured": ("", "partly measured"),
          "not measured": ("", "not measured")}
GRID_IMAGES = 8


def _images(folder: str | None, base: Path, n: int = GRID_IMAGES) -> list:
    from noclone.data.images import load_image_folder

    if not folder:
        return []
    path = Path(folder) if Path(folder).is_absolute() else base / folder
    return [im for _, im in load_image_folder(path)][:n] if path.is_dir() else []


def _grid(folder: str | None, base: Path, caption: str) -> str:
    images = _images(folder, base)
    if not images:
        return ""
    grid = image_grid(images, columns=8, scale=1)  # JPEG at 1x, shown at 2x: the page stays a few MB at most
    buffer = io.BytesIO()
    grid.save(buffer, format="JPEG", quality=88)
    tag = (f'<img class="grid" style="width:{2 * grid.width}px" alt="{html.escape(caption)}" '
           f'src="data:image/jpeg;base64,{base64.b64encode(buffer.getvalue()).decode()}">')
    return (f"<figure>{tag}"
            f"<figcaption class='cap'>{html.escape(caption)}</figcaption></figure>")


def _checks(checks: list[dict]) -> str:
    if not checks:
        return "–"
    lines = []
    for c in checks:
        value = "–" if c["value"] is None else f"{c['value']:.3f}"
        mark = "" if c["ok"] is None else ("<span class='good'>✓</span>" if c["ok"] else "<span class='bad'>✗</span>")
        lines.append(f"{html.escape(c['name'])}: <b>{value}</b> (target {html.escape(c['target'])}) {mark}")
    return "<br>".join(lines)


def _pictures(card: dict, out: Path) -> str:
    bench = out / "bench"
    m = card["measurements"]
    parts = []
    if m.get("E2"):
        for c, v in m["E2"]["per_class"].items():
            parts.append(_grid(v.get("images"), out, f"E2 base model, 'a photo of a {c}', guidance 7.5"))
    if m.get("E3"):
        for c, v in m["E3"]["guidance"].items():
            parts.append(_grid(v.get("images_unguided"), out, f"E3 the same at guidance 1 ({c})"))
    for key, label in (("E1", "clone"), ("E4", "cloak"), ("E5", "purification")):
        if not m.get(key):
            continue
        rows = m[key]["rows"]
        rows = [r for group in rows.values() for r in group] if isinstance(rows, dict) else rows
        shown = set()
        for r in rows:  # the first identity of each class, seed 0: one grid per attack / defence / transform
            tag = (r["class_noun"], r["attack"], r["defence"], r["transform"])
            if r["seed"] != card["config"]["seeds"][0] or tag in shown:
                continue
            shown.add(tag)
            if key == "E1" or r["defence"] != "none":
                parts.append(_grid(r.get("photos"), bench, f"{key}: {r['subject']} photos"
                                   + (f" after {r['defence']}" if r["defence"] != "none" else "")
                                   + (f" + {r['transform']}" if r["transform"] != "none" else "")))
            parts.append(_grid(r.get("generated"), bench,
                               f"{key} {label}: {r['subject']}, {r['attack']} after {r['defence']}"
                               + (f" + {r['transform']}" if r["transform"] != "none" else "")
                               + f" (match {r['identity_match_rate']:.2f})" if r.get("identity_match_rate") is not None
                               else ""))
    return "".join(p for p in parts if p)


def render_page(card: dict, out: Path) -> str:
    rows = []
    for e in card["effects"]:
        cls, word = BADGES.get(e["status"], ("", e["status"]))
        note = f"<br><span class='cap'>{html.escape(e['note'])}</span>" if e.get("note") else ""
        seconds = f"<br><span class='cap'>{e['seconds']:.0f} s</span>" if e.get("seconds") else ""
        if e.get("scale"):
            sc = e["scale"]
            seconds += (f"<br><span class='cap'>{sc.get('identities', '–')} identities x {len(sc['classes'])} "
                        f"classes, seeds {sc['seeds']}</span>")
        rows.append(f"<tr><td><b>{e['key']}</b> {html.escape(e['title'])}</td><td>{html.escape(e['paper'])}</td>"
                    f"<td>{html.escape(e['target'])}</td><td>{_checks(e['checks'])}{note}</td>"
                    f"<td class='{cls}'>{word}{seconds}</td></tr>")
    c = card["config"]
    head = (f"<p>Model <code>{html.escape(str(card['model']))}</code>. Subjects: the first N of the held-out "
            f"identities {card['identities']['pool'][0]}-{card['identities']['pool'][-1]} of each class (never seen "
            f"by the model or the evaluator, never used to tune anything); each row says its N and seeds. "
            f"{c['images']} generations per attacked model, {c['base_images']} per class for the base model. "
            f"Passed: {', '.join(card['passed']) or 'none'}.</p>"
            f"<p class='cap'>Scaling rule: {html.escape(card['scaling_rule'])}.</p>")
    table = ("<table><tr><th>effect</th><th>what the field reports on SD</th><th>target here</th>"
             "<th>measured</th><th>verdict</th></tr>" + "".join(rows) + "</table>")
    style = STYLE + "td{text-align:left;vertical-align:top;font-size:.9rem}figure{display:inline-block;margin:.5rem}"
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>noclone fidelity card</title>"
            f"<style>{style}</style></head><body><h1>Fidelity card</h1>{head}{table}"
            f"<h2>Pictures</h2>{_pictures(card, out) or '<p>none yet</p>'}</body></html>")
