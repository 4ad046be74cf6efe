"""Small PNG charts drawn with Pillow (no matplotlib on the GPU machines):
a line chart for loss curves and a horizontal bar chart for benchmarks.
Files are written atomically (temp file, then rename)."""
from __future__ import annotations

import os
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

_COLORS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189))


def _save(img: Image.Image, path: str) -> None:
    tmp = f"{path}.tmp.png"
    img.save(tmp)
    os.replace(tmp, path)


def _panel(d: ImageDraw.ImageDraw, box: tuple[int, int, int, int], series: dict[str, Sequence[float]],
           xs: dict[str, Sequence[float]], x_range: tuple[float, float], title: str, xlabel: str, ylabel: str,
           font) -> None:
    """One chart in box (x0, y0, x1, y1) of the image: frame, y ticks, lines."""
    x0, y0, x1, y1 = box
    left, right, top, bottom = x0 + 70, x1 - 20, y0 + 30, y1 - 40
    values = [float(v) for s in series.values() for v in s if v == v]
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    xlo, xhi = x_range
    d.rectangle([left, top, right, bottom], outline="black")
    for i in range(5):
        y = top + (bottom - top) * i / 4
        d.text((x0 + 5, y - 6), f"{hi - (hi - lo) * i / 4:.4g}", fill="black", font=font)
    d.text(((x0 + x1) // 2 - 4 * len(title), y0 + 8), title, fill="black", font=font)
    d.text(((x0 + x1) // 2 - 4 * len(xlabel), y1 - 18), f"{xlabel} ({xlo:g}..{xhi:g})", fill="black", font=font)
    d.text((x0 + 5, top - 22), ylabel, fill="black", font=font)
    for k, (name, ys) in enumerate(series.items()):
        color = _COLORS[k % len(_COLORS)]
        pts = [(left + (right - left) * (float(x) - xlo) / max(xhi - xlo, 1e-12),
                top + (bottom - top) * (hi - float(y)) / (hi - lo)) for x, y in zip(xs[name], ys)]
        if len(pts) > 1:
            d.line(pts, fill=color, width=2)
        if len(pts) < 30:   # sparse series (one point per evaluation): mark every point
            for px, py in pts:
                d.ellipse([px - 2, py - 2, px + 2, py + 2], fill=color)
        d.text((right - 160, top + 5 + 14 * k), name, fill=color, font=font)


def line_chart(path: str, series: dict[str, Sequence[float]], title: str = "",
               xlabel: str = "step", ylabel: str = "", size=(800, 480), xs: dict[str, Sequence[float]] | None = None,
               below: dict | None = None) -> None:
    """One line per named series, y auto-scaled; x = the index, or xs[name].
    below: a second panel under the first with the same x axis, given as
    dict(series=..., xs=..., title=..., ylabel=...)."""
    w, h = size
    panels = [dict(series=series, xs=xs, title=title, ylabel=ylabel)] + ([below] if below else [])
    for p in panels:
        p["xs"] = {n: (p.get("xs") or {}).get(n, range(len(ys))) for n, ys in p["series"].items()}
    allx = [float(x) for p in panels for v in p["xs"].values() for x in v]
    x_range = (min(allx), max(allx)) if allx else (0.0, 1.0)
    img = Image.new("RGB", (w, h * len(panels)), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    for i, p in enumerate(panels):
        _panel(d, (0, i * h, w, (i + 1) * h), p["series"], p["xs"], x_range, p.get("title", ""), xlabel,
               p.get("ylabel", ""), font)
    _save(img, path)


def bar_chart(path: str, labels: Sequence[str], values: Sequence[float], title: str = "",
              unit: str = "", size=(900, None)) -> None:
    """Horizontal bars, one per label, value printed at the end of each bar."""
    w = size[0]
    h = size[1] or 60 + 26 * len(labels)
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    d.text((10, 8), title, fill="black", font=font)
    left, right = 260, 120
    vmax = max([float(v) for v in values] + [1e-12])
    for i, (label, v) in enumerate(zip(labels, values)):
        y = 36 + 26 * i
        d.text((10, y + 4), str(label)[:40], fill="black", font=font)
        x1 = left + (w - left - right) * float(v) / vmax
        d.rectangle([left, y, x1, y + 18], fill=_COLORS[i % len(_COLORS)])
        d.text((x1 + 6, y + 4), f"{float(v):.3g} {unit}", fill="black", font=font)
    _save(img, path)
