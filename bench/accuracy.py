"""Accuracy table: full precision, rtn and repq on dinov2-s14-fmnist at several bit widths.

    python bench/accuracy.py [--eval-size 2000] [--settings 8/8,6/6,4/8,4/4] [--methods rtn,repq]

Runs `fastquant quantize` once per (method, setting) with --json, collects the
records in bench/results/accuracy_<model>.json and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="dinov2-s14-fmnist")
    p.add_argument("--eval-size", type=int, default=2000)
    p.add_argument("--calib-size", type=int, default=128)
    p.add_argument("--settings", default="8/8,6/6,4/8,4/4")
    p.add_argument("--methods", default="rtn,repq")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    out = args.out or ROOT / "bench" / "results" / f"accuracy_{args.model}.json"
    tmp = out.parent / "runs"
    tmp.mkdir(parents=True, exist_ok=True)
    records = []
    for method in args.methods.split(","):
        for setting in args.settings.split(","):
            w, a = setting.split("/")
            js = tmp / f"{args.model}_{method}_w{w}a{a}.json"
            cmd = [sys.executable, "-m", "fastquant.cli", "quantize", "--model", args.model, "--data", "fmnist",
                   "--method", method, "--w-bits", w, "--a-bits", a, "--calib-size", str(args.calib_size),
                   "--eval-size", str(args.eval_size), "--json", str(js)]
            print("$", " ".join(["fastquant"] + cmd[3:]), flush=True)
            subprocess.run(cmd, check=True)
            rec = json.loads(js.read_text())
            rec["command"] = " ".join(["fastquant"] + cmd[3:-2])
            records.append(rec)
    meta = {"machine": platform.processor() or platform.machine(), "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d"), "records": records}
    out.write_text(json.dumps(meta, indent=2) + "\n")
    fp = records[0]["fp_top1"]
    print(f"\nfull precision: {fp:.2f} (first {args.eval_size} test images)\n")
    print("| method | W/A | top-1 | vs full precision | quantize time (s) |")
    print("|---|---|---|---|---|")
    for r in records:
        print(f"| {r['method']} | {r['w_bits']}/{r['a_bits']} | {r['q_top1']:.2f} | {r['q_top1'] - r['fp_top1']:+.2f} | {r['quantize_seconds']:.0f} |")


if __name__ == "__main__":
    main()
