"""The classifier head's input step on a saved model: how much of its error the head's 4-bit
input holds, and how much of that the step trained against the float logits recovers
(``ReconConfig.head_iters``, here applied after the fact with the same function).

    python bench/head_step.py bench/results/models/dinov2-s14-fmnist_pfcr-lract-edge_cpu_w4a4.safetensors \\
        [--seed 0] [--iters 300] [--lr-act 2.7e-3] [--eval-size 2000] [--out MODEL]

The calibration images are the run's (``--seed``: its seed; 256 images from the training
split), the float model is the saved model's (``--data``/``--checkpoint`` as for
``fastquant quantize``). Prints and writes bench/results/head_step_<model file>.json: top-1
on the first ``--eval-size`` test images as saved, with the head's input in float, and with
the trained step; the logits' MSE on the calibration images before and after. The batch
order differs from a run with ``head_iters`` (its seed also names the unit), so the numbers
are those of the method, not of that run. ``--out``: save the model with the trained step.
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("quantized", type=Path, help="a model saved by `fastquant quantize --out`")
    p.add_argument("--data", default="fmnist")
    p.add_argument("--checkpoint", help="the float model's weights (a timm model's checkpoint)")
    p.add_argument("--seed", type=int, default=0, help="the run's seed: its calibration images")
    p.add_argument("--calib-size", type=int, default=256)
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--lr-act", type=float, default=2.7e-3)
    p.add_argument("--eval-size", type=int, default=2000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, help="save the model with the trained step here")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    import fastquant
    from fastquant.adapters import depth_of, embed, run_head, run_span
    from fastquant.data import calibration_indices, load_dataset, stack
    from fastquant.models import load_model
    from fastquant.recon import ReconConfig, quantized_head, train_head_step
    from fastquant.serialize import read_config, read_metadata
    from run import commit, device_name, versions

    t0 = time.time()
    _, spec = read_config(args.quantized, read_metadata(args.quantized))
    q = fastquant.load(args.quantized).eval()
    fp, dcfg, _ = load_model(spec.name, args.checkpoint or spec.checkpoint, spec.img_size or None)
    fp.eval()
    train, test = load_dataset(args.data, "train", dcfg), load_dataset(args.data, "test", dcfg)
    calib = stack(train, calibration_indices(len(train), args.calib_size, args.seed))[0]
    n = min(args.eval_size, len(test))
    x_test, y_test = stack(test, list(range(n)))
    end = 2 * depth_of(q)

    @torch.no_grad()
    def batched(fn, x):
        return torch.cat([fn(x[i:i + 64]) for i in range(0, len(x), 64)])

    final = lambda x: run_span(q, embed(q, x), 0, end)  # noqa: E731
    tok_calib, tok_test = batched(final, calib), batched(final, x_test)
    fp_calib = batched(fp, calib)
    fp_top1 = 100.0 * (batched(fp, x_test).argmax(-1) == y_test).float().mean().item()

    def top1() -> float:
        with torch.no_grad():
            return round(100.0 * (run_head(q, tok_test).argmax(-1) == y_test).float().mean().item(), 2)

    head = quantized_head(q)
    saved = top1()
    mode = head.input_quant.mode
    head.input_quant.mode = "off"
    float_input = top1()
    head.input_quant.mode = mode
    step_before = head.input_quant.step().item()
    cfg = ReconConfig(method="brecq", head_iters=args.iters, lr_act=args.lr_act, seed=args.seed)
    history, before, after = train_head_step(q, tok_calib, fp_calib, cfg, seed=args.seed)
    trained = top1()
    result = {"quantized": str(args.quantized), "model": spec.name, "data": args.data, "seed": args.seed,
              "calib_size": args.calib_size, "head_iters": args.iters, "lr_act": args.lr_act, "eval_size": n,
              "fp_top1": round(fp_top1, 2), "top1_as_saved": saved, "top1_head_input_float": float_input,
              "top1_trained_step": trained, "step_before": step_before, "step_after": head.input_quant.step().item(),
              "calib_logits_mse_before": before, "calib_logits_mse_after": after,
              "loss_first": history[0], "loss_last": history[-1], "seconds": round(time.time() - t0, 1),
              "device": device_name(torch.device("cpu")), "commit": commit(), **versions(),
              "date": time.strftime("%Y-%m-%d")}
    if args.out:
        fastquant.save(q, args.out)
        result["out"] = str(args.out)
    out = args.json or ROOT / "bench" / "results" / f"head_step_{args.quantized.stem}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"top-1 on the first {n} test images (full precision {fp_top1:.2f}): as saved {saved:.2f}, head input in "
          f"float {float_input:.2f}, trained step {trained:.2f} (step {step_before:.4f} -> "
          f"{result['step_after']:.4f}; calibration logits' MSE {before:.4f} -> {after:.4f})")
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
