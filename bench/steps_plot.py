"""Top-1 against steps per unit for brecq and pfcr at W4A4 on dinov2-s14-fmnist (cpu budget
otherwise), from the finished runs in bench/results/runs/ (bench/recon.py writes them):

    python bench/steps_plot.py [--out bench/results/steps_dinov2-s14-fmnist_w4a4.png]

Rows (the activation steps' learning rate scaled with the steps, lr_act=None, or its value
at 300 steps, 2.7e-3): brecq-auto-it100, brecq-lract (300), brecq-auto-it1000; PFCR with
today's defaults: pfcr-auto-it100-defaults, pfcr-lract-nopos-nodrop-anneal (300),
pfcr-auto-it1000-defaults; PFCR with its earlier settings (POS, no QDrop, carry=1) at 100
and 300: pfcr-auto-it100, pfcr-lract-nodrop-carry1. A row not run yet is listed as missing
and left out of the plot. Writes the PNG and a JSON beside it.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNS = ROOT / "bench" / "results" / "runs"
SERIES = {
    "brecq": {100: "brecq-auto-it100", 300: "brecq-lract", 1000: "brecq-auto-it1000"},
    "pfcr (defaults)": {100: "pfcr-auto-it100-defaults", 300: "pfcr-lract-nopos-nodrop-anneal",
                        1000: "pfcr-auto-it1000-defaults"},
    "pfcr (earlier settings: POS, carry=1)": {100: "pfcr-auto-it100", 300: "pfcr-lract-nodrop-carry1"},
}


COLORS = ["#1f77b4", "#d62728", "#2ca02c"]


def draw_plot(points: dict, fp, out: Path, width: int = 640, height: int = 420):
    """Top-1 against steps per unit (log x axis) as PNG, drawn with Pillow."""
    import math

    from PIL import Image, ImageDraw

    left, right, top, bottom = 60, 20, 40, 50
    values = [t for pts in points.values() for _, t, *_ in pts] + ([fp] if fp else [])
    lo, hi = math.floor(min(values) / 5) * 5 - 5, math.ceil(max(values) / 5) * 5

    def xy(steps, top1):
        x = left + (width - left - right) * (math.log10(steps) - 1.9) / (3.1 - 1.9)
        return x, top + (height - top - bottom) * (hi - top1) / (hi - lo)

    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    for v in range(lo, hi + 1, 5):
        _, y = xy(100, v)
        d.line([(left, y), (width - right, y)], fill="#e0e0e0")
        d.text((left - 30, y - 6), f"{v}", fill="black")
    for steps in (100, 300, 1000):
        x, _ = xy(steps, lo)
        d.text((x - 10, height - bottom + 8), str(steps), fill="black")
    d.text((width // 2 - 50, height - 22), "steps per unit (log scale)", fill="black")
    d.text((left, 8), "dinov2-s14-fmnist W4A4, cpu budget: top-1 on the first 2,000 test images", fill="black")
    if fp:
        _, y = xy(100, fp)
        d.line([(left, y), (width - right, y)], fill="#888888", width=1)
        d.text((width - right - 150, y - 14), f"full precision {fp:.2f}", fill="#555555")
    for k, (label, pts) in enumerate(points.items()):
        pts = sorted(pts)
        color = COLORS[k % len(COLORS)]
        xys = [xy(s, t) for s, t, *_ in pts]
        if len(xys) > 1:
            d.line(xys, fill=color, width=2)
        for (x, y), (_, t, *_) in zip(xys, pts):
            d.ellipse([(x - 3, y - 3), (x + 3, y + 3)], fill=color)
            d.text((x + 5, y + 2), f"{t:.2f}", fill=color)
        d.text((left + 10, top + 5 + 14 * k), label, fill=color)
    d.rectangle([(left, top), (width - right, height - bottom)], outline="black")
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "steps_dinov2-s14-fmnist_w4a4.png")
    args = p.parse_args(argv)
    points, missing = {}, []
    fp = None
    for label, rows in SERIES.items():
        for steps, row in rows.items():
            js = RUNS / f"dinov2-s14-fmnist_{row}_cpu_w4a4.json"
            if not js.is_file():
                missing.append(row)
                continue
            rec = json.loads(js.read_text())
            fp = rec["fp_top1"]
            points.setdefault(label, []).append((steps, rec["q_top1"], row, round(rec["quantize_seconds"] / 60, 1)))
    draw_plot(points, fp, args.out)
    summary = {label: [{"steps": s, "top1": t, "row": r, "quantize_minutes": m} for s, t, r, m in sorted(pts)]
               for label, pts in points.items()}
    args.out.with_suffix(".json").write_text(json.dumps({"fp_top1": fp, "series": summary, "missing": missing},
                                                        indent=2) + "\n")
    for label, pts in summary.items():
        print(label, ", ".join(f"{d['steps']}: {d['top1']:.2f}" for d in pts))
    if missing:
        print("missing (not run yet):", ", ".join(missing))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
