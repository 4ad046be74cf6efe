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


def line_chart(path: str, series: dict[str, Sequence[float]], title: str = "",
               xlabel: str = "step", ylabel: str = "", size=(800, 480)) -> None:
    """One line per named series, x = index, y auto-scaled."""
    w, h = size
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    left, right, top, bottom = 70, 20, 30, 40
    values = [float(v) for s in series.values() for v in s if v == v]
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    n = max((len(s) for s in series.values()), default=1)
    d.rectangle([left, top, w - right, h - bottom], outline="black")
    for i in range(5):
        y = top + (h - top - bottom) * i / 4
        d.text((5, y - 6), f"{hi - (hi - lo) * i / 4:.4g}", fill="black", font=font)
    d.text((w // 2 - 4 * len(title), 8), title, fill="black", font=font)
    d.text((w // 2 - 4 * len(xlabel), h - 18), f"{xlabel} (0..{n - 1})", fill="black", font=font)
    d.text((5, top - 22), ylabel, fill="black", font=font)
    for k, (name, ys) in enumerate(series.items()):
        color = _COLORS[k % len(_COLORS)]
        pts = [(left + (w - left - right) * i / max(n - 1, 1),
                top + (h - top - bottom) * (hi - float(y)) / (hi - lo)) for i, y in enumerate(ys)]
        if len(pts) > 1:
            d.line(pts, fill=color, width=2)
        elif pts:
            d.ellipse([pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2], fill=color)
        d.text((w - right - 160, top + 5 + 14 * k), name, fill=color, font=font)
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
