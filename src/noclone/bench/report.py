"""report.html of a benchmark, from the results database alone: summary table, SVG bar charts, image grids, timings.

Self-contained: pictures are PNGs inlined as base64, each distinct picture once (as a CSS class, so the references
shown in every row cost nothing extra); charts are inline SVG drawn here (no plotting library).
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import math
from collections import defaultdict
from pathlib import Path

from noclone.bench.store import STAGE_TIMES, Store
from noclone.errors import NocloneError

# metric -> (title, which direction means the defence works)
METRIC_INFO = {
    "ism": ("ISM", "lower"),
    "identity_match_rate": ("identity match rate", "lower"),
    "fdfr": ("FDFR", "higher"),
    "brisque": ("BRISQUE", "higher"),
    "fid": ("FID (sandbox features)", "higher"),
    "kid": ("KID", "higher"),
    "dino": ("DINO similarity", "lower"),
    "clip_i": ("CLIP-I similarity", "lower"),
    "backdoor_rate": ("backdoor rate", "higher"),
}
GRID_COLUMNS = 4
PALETTE = ("#4e79a7", "#e15759", "#59a14f", "#f28e2b", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac")
EXTRA_STYLE = """
body{max-width:1400px}
.pic{display:inline-block;background-repeat:no-repeat;background-size:100% 100%;image-rendering:pixelated;
border:1px solid #ccc;vertical-align:top}.cells td{vertical-align:top;text-align:left}.chart{margin:.5rem 1rem 1rem 0}
details summary{cursor:pointer;margin:.6rem 0}.err{color:#b3261e}
"""


def mean_std(values: list[float]) -> tuple[float, float] | None:
    """Mean and (population) standard deviation of the non-missing values, or None."""
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return None
    mean = sum(vals) / len(vals)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals))


def _fmt(ms: tuple[float, float] | None, digits: int = 3) -> str:
    if ms is None:
        return "–"
    return f"{ms[0]:.{digits}f} ± {ms[1]:.{digits}f}"


IMAGE_FORMATS = ("png", "jpeg")


class Pictures:
    """Each distinct picture becomes one CSS class holding its base64 PNG (or JPEG: smaller files); tags refer to it."""

    def __init__(self, image_format: str = "png"):
        if image_format not in IMAGE_FORMATS:
            raise NocloneError(f"image format {image_format!r}: choose from {', '.join(IMAGE_FORMATS)}")
        self.format = image_format
        self.rules: list[str] = []
        self.known: dict[str, str] = {}

    def tag(self, key: str, image, title: str = "") -> str:
        if key not in self.known:
            buffer = io.BytesIO()
            if self.format == "jpeg":
                image.convert("RGB").save(buffer, format="JPEG", quality=85)
            else:
                image.save(buffer, format="PNG", optimize=True)
            name = "p" + hashlib.sha1(key.encode()).hexdigest()[:10]
            data = base64.b64encode(buffer.getvalue()).decode()
            self.rules.append(f".{name}{{background-image:url(data:image/{self.format};base64,{data});"
                              f"width:{image.width}px;height:{image.height}px}}")
            self.known[key] = name
        return f'<span class="pic {self.known[key]}" title="{html.escape(title)}"></span>'

    def style(self) -> str:
        return "<style>" + EXTRA_STYLE + "".join(self.rules) + "</style>"


def _folder_grid(pictures: Pictures, out: Path, rel: str | None, n: int, columns: int, title: str) -> str:
    from noclone.data.images import load_image_folder
    from noclone.report import image_grid

    if not rel:
        return "–"
    folder = Path(rel) if Path(rel).is_absolute() else out / rel
    if not folder.is_dir():
        return f"<span class='err'>missing {html.escape(rel)}</span>"
    images = [im for _, im in load_image_folder(folder)][:n]
    if not images:
        return "–"
    size = 64 if images[0].width <= 64 else 96  # thumbnails
    images = [im if im.size == (size, size) else im.resize((size, size)) for im in images]
    return pictures.tag(f"{rel}|{n}|{columns}", image_grid(images, columns, scale=1), title)


# ------------------------------------------------------------------------------------------------------ charts


def bar_chart(title: str, groups: list[str], series: list[str], values: dict, note: str = "",
              axis: str = "") -> str:
    """Inline SVG: one cluster of bars per group, one bar (mean, with a +-std whisker) per series."""
    if not groups or not series:
        return ""
    bar_w = max(6, min(22, 260 // max(1, len(series))))
    cluster = bar_w * len(series) + 18
    left, right, top, bottom = 52, 12, 30, 96
    width = max(400, left + right + cluster * len(groups))
    per_row = max(1, (width - left) // 130)
    plot_h = 170
    height = top + plot_h + bottom + 18 * ((len(series) + per_row - 1) // per_row)
    lows, highs = [0.0], [0.0]
    for ms in values.values():
        if ms is not None:
            lows.append(ms[0] - ms[1])
            highs.append(ms[0] + ms[1])
    lo, hi = min(lows), max(highs)
    if hi - lo < 1e-9:
        hi = lo + 1.0
    span = hi - lo

    def y(v: float) -> float:
        return top + plot_h * (hi - v) / span

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{width}" height="{height}" '
             f'font-family="system-ui,sans-serif" font-size="11">',
             f'<text x="{left}" y="16" font-size="13" font-weight="600">{html.escape(title)}</text>',
             f'<text x="{width - right}" y="16" text-anchor="end" fill="#666">{html.escape(note)}</text>']
    for k in range(5):
        v = lo + span * k / 4
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#eee"/>'
                     f'<text x="{left - 4}" y="{y(v) + 4:.1f}" text-anchor="end" fill="#555">{v:.3g}</text>')
    parts.append(f'<line x1="{left}" x2="{width - right}" y1="{y(0):.1f}" y2="{y(0):.1f}" stroke="#888"/>')
    for g, group in enumerate(groups):
        x0 = left + g * cluster + 9
        for s, name in enumerate(series):
            ms = values.get((group, name))
            if ms is None:
                continue
            x = x0 + s * bar_w
            mean, std = ms
            top_y, bot_y = sorted((y(mean), y(0)))
            color = PALETTE[s % len(PALETTE)]
            parts.append(f'<rect x="{x}" y="{top_y:.1f}" width="{bar_w - 2}" height="{max(bot_y - top_y, 0.5):.1f}" '
                         f'fill="{color}"><title>{html.escape(name)} / {html.escape(group)}: {mean:.4g} ± {std:.3g}'
                         f'</title></rect>')
            if std > 0:
                cx = x + (bar_w - 2) / 2
                parts.append(f'<line x1="{cx}" x2="{cx}" y1="{y(mean + std):.1f}" y2="{y(mean - std):.1f}" '
                             f'stroke="#222"/>')
        label = html.escape(group if len(group) <= 24 else group[:23] + "…")
        cx = x0 + bar_w * len(series) / 2
        parts.append(f'<text x="{cx:.1f}" y="{top + plot_h + 14}" text-anchor="end" '
                     f'transform="rotate(-35 {cx:.1f} {top + plot_h + 14})" fill="#333">{label}</text>')
    if axis:
        parts.append(f'<text x="{width - right}" y="{top + plot_h + bottom - 22}" text-anchor="end" fill="#666">'
                     f'groups: {html.escape(axis)}</text>')
    legend_y = top + plot_h + bottom - 2
    for s, name in enumerate(series):
        lx = left + (s % per_row) * 130
        ly = legend_y + 18 * (s // per_row)
        parts.append(f'<rect x="{lx}" y="{ly - 9}" width="10" height="10" fill="{PALETTE[s % len(PALETTE)]}"/>'
                     f'<text x="{lx + 14}" y="{ly}">{html.escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


# ------------------------------------------------------------------------------------------------------ report


def _group_key(row: dict, with_model: bool) -> tuple:
    key = (row["defence"], row["attack"], row["transform"])
    return ((row["model"],) + key) if with_model else key


def render(store: Store, out: Path, report_settings: dict | None = None) -> str:
    """The whole report page; `report_settings` ({images_per_cell, image_format}) override the config's `report`."""
    from noclone.report import page, table

    rows = store.rows()
    config = store.meta("config") or {}
    settings = {**(config.get("report") or {}), **(report_settings or {})}
    name = store.meta("name") or "benchmark"
    good = [r for r in rows if not r.get("error")]
    failed = [r for r in rows if r.get("error")]
    metrics = [m for m in (config.get("metrics") or METRIC_INFO) if m in METRIC_INFO]
    metrics = [m for m in metrics if any(r.get(m) is not None for r in good)]
    with_model = len({r["model"] for r in rows}) > 1
    order = lambda values: list(dict.fromkeys(values))  # noqa: E731 - first-seen order (the config's)
    defences = order(r["defence"] for r in rows)
    varying = [k for k in ("model", "attack", "transform") if len({r[k] for r in rows}) > 1] or ["attack"]

    def combo_of(row: dict) -> str:  # a chart group: the attack settings that vary in this benchmark
        return " | ".join(str(row[k]) for k in varying)

    combos = order(combo_of(r) for r in rows)

    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in good:
        groups[_group_key(r, with_model)].append(r)
    clean_name = next((d["name"] for d in config.get("defences", []) if d.get("kind") == "none"), None)

    sections = [
        f"<p>{len(rows)} cell × seed results ({len(failed)} failed) over {len({r['subject'] for r in rows})} subject(s), "
        f"seeds {', '.join(str(s) for s in order(r['seed'] for r in rows))}. Every number is the mean ± std over "
        "subjects and seeds. Arrows give the direction in which a defence works (e.g. ↓ identity match: the "
        "attacker's images look less like the subject).</p>"
    ]

    # summary table
    headers = (["model"] if with_model else []) + ["defence", "attack", "transform", "n"]
    headers += [f"{METRIC_INFO[m][0]} {'↓' if METRIC_INFO[m][1] == 'lower' else '↑'}" for m in metrics]
    main_metric = next((m for m in ("identity_match_rate", "ism") if m in metrics), None)
    if clean_name and main_metric:
        headers.append(f"Δ {METRIC_INFO[main_metric][0]} vs {clean_name}")
    table_rows = []
    for key, members in groups.items():
        cells = list(key) + [len(members)] + [_fmt(mean_std([r.get(m) for r in members])) for m in metrics]
        if clean_name and main_metric:
            clean_key = ((key[0],) if with_model else ()) + (clean_name,) + key[-2:]
            here, base = mean_std([r.get(main_metric) for r in members]), \
                mean_std([r.get(main_metric) for r in groups.get(clean_key, [])])
            cells.append(f"{here[0] - base[0]:+.3f}" if here and base else "–")
        table_rows.append(cells)
    sections += ["<h2>Summary</h2>", table(headers, table_rows)]

    # charts
    charts = []
    for m in metrics:
        values = {}
        for key, members in groups.items():
            values[(combo_of(members[0]), key[-3])] = mean_std([r.get(m) for r in members])
        title, direction = METRIC_INFO[m]
        charts.append(bar_chart(title, combos, defences, values, f"{direction} = better protection",
                                " | ".join(varying)))
    sections += ["<h2>Charts</h2>", "<div class='row'>" + "".join(charts) + "</div>"]

    # image grids: per subject, per cell (first seed): references | attacker's photos | clean attack | this defence
    pictures = Pictures(settings.get("image_format", "png"))
    n_show = int(settings.get("images_per_cell", 8))
    first_seed = order(r["seed"] for r in rows)[:1]
    by_cell = {(r["model"], r["subject"], r["defence"], r["transform"], r["attack"]): r for r in good
               if r["seed"] in first_seed}
    grid_sections = []
    for subject in order(r["subject"] for r in rows):
        body = []
        for (model, subj, defence, transform, attack), r in by_cell.items():
            if subj != subject:
                continue
            a = r["artifacts"]
            clean = by_cell.get((model, subj, clean_name, transform, attack)) if clean_name else None
            prefix = html.escape(model) + " | " if with_model else ""
            label = (f"<div>{prefix}<b>{html.escape(defence)}</b> | {html.escape(attack)} | {html.escape(transform)}"
                     f"<br><span class='cap'>{_metric_caption(r, metrics)}</span></div>")
            body.append([
                label,
                _folder_grid(pictures, out, a.get("references"), 4, 2, "references"),
                _folder_grid(pictures, out, clean["artifacts"].get("generated") if clean else None, n_show,
                             GRID_COLUMNS, "clean attack"),
                _folder_grid(pictures, out, a.get("generated"), n_show, GRID_COLUMNS, f"attack on {defence}"),
                _folder_grid(pictures, out, a.get("photos"), 6, 3, "the attacker's photos"),
            ])
        if body:
            grid_sections.append(f"<h3>{html.escape(subject)}</h3>" + table(
                ["cell", "references", f"clean attack ({clean_name or 'n/a'})", "attack on this defence",
                 "attacker's photos (after defence and transform)"], body).replace("<table>", "<table class='cells'>", 1))
    sections += ["<h2>Images</h2>", f"<p class='cap'>First seed; up to {n_show} generated images per cell; "
                 "prompts: " + html.escape("; ".join(config.get("prompts", []))) + "</p>"] + grid_sections

    # timings
    t_headers = (["model"] if with_model else []) + ["defence", "attack", "transform"] + \
        [f"{s} s" for s in STAGE_TIMES] + ["total s", "peak RSS MB", "peak GPU MB"]
    t_rows = []
    for key, members in groups.items():
        t = [mean_std([r.get(f"t_{s}") for r in members]) for s in STAGE_TIMES + ("total",)]
        rss = [r.get("peak_rss_mb") for r in members if r.get("peak_rss_mb") is not None]
        gpu = [r.get("peak_gpu_mb") for r in members if r.get("peak_gpu_mb") is not None]
        t_rows.append(list(key) + [f"{x[0]:.1f}" if x else "–" for x in t]
                      + [f"{max(rss):.0f}" if rss else "–", f"{max(gpu):.0f}" if gpu else "–"])
    sections += ["<h2>Timing</h2>", "<p class='cap'>Compute seconds of each stage a cell depends on, as measured when "
                 "the stage ran (a stage shared by several cells, like a protected model, counts in each); peak "
                 "memory is the process's peak resident set size when the stage finished.</p>", table(t_headers, t_rows)]

    if failed:
        sections += ["<h2>Failed cells</h2>", table(["defence", "attack", "transform", "subject", "seed", "error"],
                     [[r["defence"], r["attack"], r["transform"], r["subject"], r["seed"], r["error"]] for r in failed])]
    all_headers = ["model", "subject", "defence", "transform", "attack", "seed"] + metrics + ["t_total"]
    sections.append("<details><summary>All rows</summary>" + table(
        all_headers, [[r.get(h) if r.get(h) is not None else "–" for h in all_headers] for r in rows]) + "</details>")
    return page(f"noclone bench: {name}", [pictures.style()] + sections)


def _metric_caption(row: dict, metrics: list[str]) -> str:
    bits = []
    for m in metrics:
        v = row.get(m)
        if v is not None:
            bits.append(f"{METRIC_INFO[m][0]} {v:.3f}" if isinstance(v, float) else f"{METRIC_INFO[m][0]} {v}")
    return html.escape(", ".join(bits))
