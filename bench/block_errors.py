"""How far each block's output of a reconstructed model is from the float model's, on the
images it was calibrated on and on other training images: where the error grows with
depth, and how much of what a reconstruction fits holds beyond its calibration images.

    python bench/block_errors.py bench/results/runs/dinov2-s14-fmnist_brecq-lract-seed1_cpu_w4a4.json [...]

Each argument is a run's JSON from bench/recon.py (it names the saved model, the data, the
calibration size and seed). For each block the error is relative: the mean squared
difference of the quantized model's block output from the float model's (both fed the same
images, each its own earlier blocks) over the variance of the float output. The residual
stream's scale grows by 20x in the last block of DINOv2 ViT-S/14, so absolute errors (a run's
``recon_units``) make the last block look like the one that fails. "held-out" images are
training images outside the calibration set. In brackets, the error of the float block fed
the quantized model's input: the part a block inherits from the blocks before it. Also the
share of images whose predicted class matches the float model's (rough: 128 images).
Prints a Markdown table; writes bench/results/block_errors_<name>.json (with the machine and
commit).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))


def held_out(n_total: int, calib: list[int], n: int) -> list[int]:
    """``n`` training indices outside ``calib``, drawn deterministically."""
    g = torch.Generator().manual_seed(12345)
    taken = set(calib)
    return [i for i in torch.randperm(n_total, generator=g).tolist() if i not in taken][:n]


def block_outputs(model, blocks, x: torch.Tensor):
    """Every block's input and output, and the logits of ``model`` on ``x``."""
    ins, outs = [], []

    def keep(m, i, o):
        ins.append(i[0].detach())
        outs.append(o.detach())

    hooks = [b.register_forward_hook(keep) for b in blocks]
    try:
        with torch.no_grad():
            logits = model(x)
    finally:
        for h in hooks:
            h.remove()
    return ins, outs, logits


def main(argv=None):
    import fastquant
    from fastquant.adapters import find_vit
    from fastquant.data import calibration_indices, load_dataset, stack
    from fastquant.models import load_model
    from run import commit, device_name, versions

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="bench/results/runs/<run>.json files of bench/recon.py")
    p.add_argument("--images", type=int, default=128, help="images in each set (default: %(default)s)")
    p.add_argument("--name", default="runs", help="the JSON is bench/results/block_errors_<name>.json")
    p.add_argument("--threads", type=int)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    runs = []
    for path in args.runs:
        if not path.is_file():
            sys.exit(f"error: no run JSON at {path}")
        run = json.loads(path.read_text())
        if not run.get("out") or not Path(run["out"]).is_file():
            sys.exit(f"error: {path} names no saved model that exists here ({run.get('out')!r}); rerun the row")
        runs.append((path, run))

    floats, rows = {}, []
    for path, run in runs:
        q = fastquant.load(run["out"]).eval()
        spec = fastquant.record_of(q).spec
        data = run["data"]
        if data.startswith("imagefolder:") and not Path(data[len("imagefolder:"):]).is_absolute():
            data = "imagefolder:" + str(ROOT / data[len("imagefolder:"):])  # as bench/recon.py ran it
        key = (spec.name, spec.checkpoint, spec.img_size, data)
        if key not in floats:
            model, dcfg, _ = load_model(spec.name, spec.checkpoint, spec.img_size)
            floats[key] = (model.eval(), load_dataset(data, "train", dcfg), {})
        model, train, float_runs = floats[key]  # float_runs: the float model's pass per image set
        calib = calibration_indices(len(train), run["calib_size"], run["seed"])
        sets = {"calibration": calib[:args.images], "held-out": held_out(len(train), calib, args.images)}
        row = {"run": path.stem, "model": str(run["out"]), "q_top1": run.get("q_top1"), "sets": {}}
        t = time.time()
        for label, idx in sets.items():
            f_blocks = find_vit(model).blocks
            if tuple(idx) not in float_runs:  # runs of one seed share their calibration images
                x = stack(train, idx)[0]
                float_runs[tuple(idx)] = (x, *block_outputs(model, f_blocks, x)[1:])
            x, f_out, f_logits = float_runs[tuple(idx)]
            q_in, q_out, q_logits = block_outputs(q, find_vit(q).blocks, x)
            rel = [round(((a - b).pow(2).mean() / b.var()).item(), 5) for a, b in zip(q_out, f_out)]
            with torch.no_grad():  # the float block on the quantized model's input: what it inherits
                inherited = [round(((blk(i) - b).pow(2).mean() / b.var()).item(), 5)
                             for blk, i, b in zip(f_blocks, q_in, f_out)]
            same = (q_logits.argmax(1) == f_logits.argmax(1)).float().mean().item()
            if not rows and not row["sets"]:
                print("| run | images | " + " | ".join(f"block {i}" for i in range(len(rel)))
                      + " | same class as float |\n" + "|---" * (len(rel) + 3) + "|")
            row["sets"][label] = {"images": len(idx), "relative_mse": rel, "inherited_relative_mse": inherited,
                                  "same_class": round(100 * same, 2)}
            print(f"| {path.stem} | {label} | " + " | ".join(f"{100 * r:.1f}% ({100 * h:.1f}%)"
                                                           for r, h in zip(rel, inherited))
                  + f" | {100 * same:.1f} |", flush=True)
        row["seconds"] = round(time.time() - t, 1)
        rows.append(row)
    out = ROOT / "bench" / "results" / f"block_errors_{args.name}.json"
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "images": args.images,
                               "device": device_name(torch.device("cpu")), "commit": commit(), **versions(),
                               "rows": rows}, indent=2) + "\n")
    print(f"\nsaved {out}")


if __name__ == "__main__":
    main()
