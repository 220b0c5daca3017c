"""Self-contained HTML reports: image grids embedded as base64 PNG, metric tables, no external assets."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence

import numpy as np
from PIL import Image

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2rem auto;max-width:1100px;color:#222;padding:0 1rem}
h1{font-size:1.6rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #ddd;padding-bottom:.3rem}
table{border-collapse:collapse;margin:.8rem 0}td,th{border:1px solid #ccc;padding:.35rem .7rem;text-align:right}
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}
.grid{image-rendering:pixelated;border:1px solid #ccc;max-width:100%}.cap{color:#666;font-size:.85rem}
.good{color:#137333;font-weight:600}.bad{color:#b3261e;font-weight:600}.row{display:flex;gap:1.5rem;flex-wrap:wrap}
.pair{display:grid;grid-template-columns:repeat(2,minmax(0,1fr));gap:1.5rem;align-items:start}
figure{margin:.5rem 0 1rem}.pair figure{margin:0}.pair .grid{width:100%}figcaption{margin:.3rem 0}
.targets td:nth-child(2){white-space:nowrap}.timing td:nth-child(2){text-align:left}
.verdict{padding:.2rem 1rem;border-left:6px solid #999;background:#f7f7f7}
.verdict p:first-child{font-size:1.25rem;line-height:1.5}
.verdict .verdict-cost{color:#222;font-weight:400}
.verdict.good{border-color:#137333;background:#e6f4ea}.verdict.bad{border-color:#b3261e;background:#fce8e6}
.verdict.mixed{border-color:#b06000;background:#fef7e0}
.note{background:#fff8e1;border-left:4px solid #f9ab00;padding:.5rem .8rem}
"""


def image_grid(images: Sequence[Image.Image | np.ndarray], columns: int = 8, scale: int = 2, pad: int = 2) -> Image.Image:
    """Tile images into one picture (upscaled by `scale` with nearest neighbour, so small renders stay crisp)."""
    arrays = [np.asarray(im.convert("RGB") if isinstance(im, Image.Image) else im, dtype=np.uint8) for im in images]
    if not arrays:
        return Image.new("RGB", (8, 8), "white")
    h, w = arrays[0].shape[:2]
    rows = (len(arrays) + columns - 1) // columns
    cols = min(columns, len(arrays))
    canvas = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for i, a in enumerate(arrays):
        r, c = divmod(i, columns)
        a = np.asarray(Image.fromarray(a).resize((w, h))) if a.shape[:2] != (h, w) else a
        canvas[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = a
    grid = Image.fromarray(canvas)
    return grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST) if scale > 1 else grid


def img_tag(image: Image.Image, alt: str = "") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    data = base64.b64encode(buffer.getvalue()).decode()
    return f'<img class="grid" alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.3f}"
        return html.escape(str(v)) if not str(v).startswith("<") else str(v)

    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def pair(cells: Sequence[str]) -> str:
    """HTML blocks side by side in two columns (a third wraps to the next row), never stacked in one."""
    return "<div class='pair'>" + "".join(f"<div>{c}</div>" for c in cells) + "</div>"


def page(title: str, sections: Sequence[str]) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>{''.join(sections)}</body></html>")
