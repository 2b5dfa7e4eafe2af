"""Ablation of fastquant's `repq` on dinov2-s14-fmnist: which refinement buys what.

    python bench/ablation.py [--settings 6/6,4/4] [--eval-size 2000] [--calib-size 128]

Starts from RepQ-ViT's recipe (reparameterisation, log-sqrt2 softmax, plain MSE range
search, round-to-nearest weights) and switches on fastquant's refinements one at a
time: output-aware range search, GPTQ weight rounding, bias correction. The full
precision model is evaluated once; every row uses the same calibration images (seed 0)
and the first N test images. Writes bench/results/ablation_<model>.json (keeping rows
of other settings measured with the same protocol) and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

import fastquant
from fastquant.data import calibration_indices, load_dataset
from fastquant.evaluate import evaluate
from fastquant.models import load_model

ROOT = Path(__file__).resolve().parent.parent

STEPS = [
    ("RepQ-ViT recipe", dict(output_aware=False, weight_rounding="nearest", bias_correct=False)),
    ("+ output-aware search", dict(output_aware=True, weight_rounding="nearest", bias_correct=False)),
    ("+ GPTQ rounding", dict(output_aware=True, weight_rounding="gptq", bias_correct=False)),
    ("+ bias correction (= repq)", dict(output_aware=True, weight_rounding="gptq", bias_correct=True)),
]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="dinov2-s14-fmnist")
    p.add_argument("--settings", default="6/6,4/4")
    p.add_argument("--eval-size", type=int, default=2000)
    p.add_argument("--calib-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    model, dcfg, spec = load_model(args.model)
    train = load_dataset("fmnist", "train", dcfg)
    test = load_dataset("fmnist", "test", dcfg)
    calib = train.batch(calibration_indices(len(train), args.calib_size, args.seed))[0]
    fp = evaluate(model, test, args.eval_size, desc="eval fp32")
    records = []
    for setting in args.settings.split(","):
        w, a = (int(v) for v in setting.split("/"))
        for label, switches in STEPS:
            t0 = time.time()
            cfg = fastquant.QuantConfig(w_bits=w, a_bits=a, method="repq", **switches)
            q = fastquant.quantize(model, calib, cfg)
            t_q = time.time() - t0
            top1 = evaluate(q, test, args.eval_size, desc=f"eval W{w}A{a} {label}")
            records.append({"w_bits": w, "a_bits": a, "step": label, "config": json.loads(cfg.to_json()),
                            "q_top1": round(top1, 2), "quantize_seconds": round(t_q, 1)})
            print(f"W{w}A{a} {label}: {top1:.2f}", flush=True)
    out = ROOT / "bench" / "results" / f"ablation_{args.model}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    # Keep rows of other settings from earlier runs with the same protocol.
    if out.is_file():
        old = json.loads(out.read_text())
        same = all(old.get(k) == v for k, v in (("eval_size", args.eval_size), ("calib_size", args.calib_size),
                                                   ("seed", args.seed), ("fp_top1", round(fp, 2))))
        if same:
            done = {(r["w_bits"], r["a_bits"]) for r in records}
            records = [r for r in old["records"] if (r["w_bits"], r["a_bits"]) not in done] + records
    meta = {"model": args.model, "fp_top1": round(fp, 2), "eval_size": args.eval_size, "calib_size": args.calib_size,
            "seed": args.seed, "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"), "records": records}
    out.write_text(json.dumps(meta, indent=2) + "\n")
    print(f"\nfull precision: {fp:.2f} (first {args.eval_size} test images)\n")
    print("| W/A | " + " | ".join(label for label, _ in STEPS) + " |")
    print("|---|" + "---|" * len(STEPS))
    for w, a in sorted({(r["w_bits"], r["a_bits"]) for r in records}, reverse=True):
        row = [r for r in records if (r["w_bits"], r["a_bits"]) == (w, a)]
        print(f"| W{w}A{a} | " + " | ".join(f"{r['q_top1']:.2f}" for r in row) + " |")


if __name__ == "__main__":
    main()
