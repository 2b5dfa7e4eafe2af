"""The output error of the layers outside the transformer blocks (the patch embedding and the
classifier head) at the reconstruction methods' start, with their weights rounded to nearest
and with GPTQ (``QuantConfig.edge_rounding``).

    python bench/edge_error.py [--model dinov2-s14-fmnist] [--w-bits 4] [--a-bits 4] [--calib-size 256]

Calibrates the model twice as a reconstruction method starts (``brecq``'s calibration:
round-to-nearest weights in the blocks, no bias correction), once per edge rounding, on
``--calib-size`` training images (seed 0), and measures on as many other training images:
the patch embedding's output error (its 8-bit input and its weights quantized, against the
float convolution on the same images) and the head's (the quantized head, weights and
4-bit input, fed what it receives with every quantizer off, which is the reparameterised
final norm's output; against the float model's logits), each as a mean squared error over
the float output's variance. Prints a table; writes bench/results/edge_error_<model>_w<W>a<A>.json
with the machine, versions and commit.
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


def relative(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).double().pow(2).mean() / ref.double().var())


@torch.no_grad()
def head_input(model, images: torch.Tensor) -> torch.Tensor:
    """What the model's classifier receives for ``images`` (a forward pre-hook)."""
    seen = []
    head = model.get_classifier()
    hook = head.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    try:
        model(images)
    finally:
        hook.remove()
    return torch.cat(seen)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="dinov2-s14-fmnist")
    p.add_argument("--data", default="fmnist")
    p.add_argument("--w-bits", type=int, default=4)
    p.add_argument("--a-bits", type=int, default=4)
    p.add_argument("--calib-size", type=int, default=256)
    args = p.parse_args(argv)

    import fastquant
    from fastquant.data import calibration_indices, load_dataset, stack
    from fastquant.models import load_model
    from fastquant.nn import QuantConv2d
    from fastquant.quant import quantizers_in, set_mode
    from run import commit, device_name, versions

    t0 = time.time()
    model, data_cfg, _ = load_model(args.model)
    train = load_dataset(args.data, "train", data_cfg)
    calib_idx = calibration_indices(len(train), args.calib_size, seed=0)
    calib, _ = stack(train, calib_idx)
    other, _ = stack(train, held_out(len(train), list(calib_idx), args.calib_size))
    fconv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    with torch.no_grad():
        ref_conv, ref_head = fconv(other), model(other)
    rows = {}
    for rounding in ("nearest", "gptq"):
        # The reconstruction methods' start (fastquant.recon.ReconMethod.calibration), calibration only.
        cfg = fastquant.QuantConfig(w_bits=args.w_bits, a_bits=args.a_bits, method="repq", weight_rounding="nearest",
                                    bias_correct=False, fc2_smooth=0.0, edge_rounding=rounding)
        q = fastquant.quantize(model, calib, cfg, progress=False)
        conv = next(m for m in q.modules() if isinstance(m, QuantConv2d))
        set_mode(quantizers_in(q), "off")
        x_head = head_input(q, other)
        set_mode(quantizers_in(q), "quant")
        with torch.no_grad():
            rows[rounding] = {"patch_embed": relative(conv(other), ref_conv),
                              "head": relative(q.get_classifier()(x_head), ref_head)}
        print(f"{rounding}: patch embedding {rows[rounding]['patch_embed']:.2e}, head {rows[rounding]['head']:.2e}",
              flush=True)
    out = ROOT / "bench" / "results" / f"edge_error_{args.model}_w{args.w_bits}a{args.a_bits}.json"
    meta = {"model": args.model, "data": args.data, "w_bits": args.w_bits, "a_bits": args.a_bits,
            "calib_size": args.calib_size, "held_out": args.calib_size, "seed": 0, "errors": rows,
            "device": device_name(torch.device("cpu")), "versions": versions(), "commit": commit(),
            "date": time.strftime("%Y-%m-%d"), "seconds": round(time.time() - t0, 1)}
    out.write_text(json.dumps(meta, indent=2) + "\n")
    print("\n| edge rounding | patch embedding output error | head output error |\n|---|---|---|")
    for k, r in rows.items():
        print(f"| {k} | {r['patch_embed']:.2%} | {r['head']:.2%} |")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
