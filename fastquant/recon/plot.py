"""A PNG of the training loss of every unit, level after level (``--plot``).

Drawn with Pillow (already needed by torchvision), so no plotting library is required.
Units follow each other along the x axis in the order they were reconstructed, each a
line of its per-step loss (log scale) coloured by level, with the level's number and
the unit names beneath.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

from ..errors import FastquantError
from ..files import atomic_write, check_writable

COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]


def plot_losses(record, path: str | os.PathLike, width: int = 1600, height: int = 600) -> Path:
    """Write the per-step losses of ``record`` (a ReconRecord) to ``path`` as PNG."""
    from PIL import Image, ImageDraw

    units = [u for u in record.units if u.history]
    if not units:
        raise FastquantError("the reconstruction record holds no loss history to plot")
    path = check_writable(path, "the loss plot")
    values = [v for u in units for v in u.history if v > 0 and math.isfinite(v)] or [0.1, 1.0]
    lo, hi = math.log10(min(values)), math.log10(max(values))
    hi = hi if hi > lo else lo + 1
    left, right, top, bottom = 70, 20, 30, 60
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    total = sum(len(u.history) for u in units)

    def xy(step: int, value: float) -> tuple[float, float]:
        v = math.log10(min(max(value, 10 ** lo), 10 ** hi))
        return (left + (width - left - right) * step / max(total - 1, 1),
                top + (height - top - bottom) * (hi - v) / (hi - lo))

    for k in range(math.floor(lo), math.ceil(hi) + 1):
        _, y = xy(0, 10 ** k)
        if top <= y <= height - bottom:
            draw.line([(left, y), (width - right, y)], fill="#e0e0e0")
            draw.text((5, y - 6), f"1e{k}", fill="black")
    step = 0
    for u in units:
        color = COLORS[u.level % len(COLORS)]
        pts = [xy(step + i, v) for i, v in enumerate(u.history)]
        if len(pts) > 1:
            draw.line(pts, fill=color, width=1)
        x0, _ = xy(step, 1)
        draw.line([(x0, top), (x0, height - bottom)], fill="#f0f0f0")
        draw.text((x0 + 2, height - bottom + 5 + 12 * (u.index % 3)), u.name, fill=color)
        step += len(u.history)
    draw.rectangle([(left, top), (width - right, height - bottom)], outline="black")
    levels = sorted({u.level for u in units})
    draw.text((left, 8), f"{record.method}: loss per step (log scale); levels "
              + ", ".join(f"L{lv}" for lv in levels), fill="black")
    for i, lv in enumerate(levels):
        draw.text((width - right - 40 * (len(levels) - i), 8), f"L{lv}", fill=COLORS[lv % len(COLORS)])
    return atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))
