"""Where a quantized model loses its accuracy: top-1 with every quantizer on, then with one
kind of quantizer at a time left in float (the same kind in every block: e.g. the input of
every ``mlp.fc2``), then (``--per-block``) with one block's activation quantizers in float.

    python bench/error_sources.py --method repq --w-bits 4 --a-bits 4 --eval-size 1000
    python bench/error_sources.py --quantized bench/results/models/<run>.safetensors

A row's gain over "all quantized" is what that kind of quantizer costs with the others on.
Bias correction is off by default (see --bias-correct). Writes
bench/results/error_sources_<model>_<method>_w<W>a<A>_bc-<on|off|method>.json (with the machine and
commit) and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))


BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")


def kind_of(name: str) -> str:
    """A quantizer's kind: its module path after the block index (``attn.qkv.input_quant``)."""
    m = BLOCK.search(name)
    return name[m.end():] if m else name


def block_of(name: str) -> int | None:
    m = BLOCK.search(name)
    return int(m.group(1)) if m else None


def main(argv=None):
    import fastquant
    from fastquant.data import calibration_indices, load_dataset, stack
    from fastquant.evaluate import evaluate
    from fastquant.models import load_model
    from fastquant.quant import set_mode
    from fastquant.quant.base import Quantizer
    from run import commit, device_name, versions

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="dinov2-s14-fmnist")
    p.add_argument("--method", default="repq", help="a calibration preset (rtn, repq)")
    p.add_argument("--w-bits", type=int, default=4)
    p.add_argument("--a-bits", type=int, default=4)
    p.add_argument("--calib-size", type=int, default=128)
    p.add_argument("--bias-correct", choices=("on", "off", "method"), default="off",
                   help="bias correction (default off: it corrects the mean shift of the fully quantized "
                        "model, so with some quantizers in float it overshoots; 'method': the preset's)")
    p.add_argument("--eval-size", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--quantized", type=Path, help="a saved quantized model (fastquant.save, e.g. from "
                   "bench/recon.py's bench/results/models/) instead of calibrating one here")
    p.add_argument("--per-block", action="store_true", help="also one block's activation quantizers at a time")
    p.add_argument("--threads", type=int)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.quantized:
        q = fastquant.load(args.quantized)
        spec, cfg = fastquant.record_of(q).spec, fastquant.record_of(q).config
        args.model, args.method, args.w_bits, args.a_bits = spec.name, cfg.method, cfg.w_bits, cfg.a_bits
        args.bias_correct = args.calib_size = None
        _, dcfg, _ = load_model(spec.name)
        test = load_dataset("fmnist", "test", dcfg)
    else:
        model, dcfg, spec = load_model(args.model)
        train, test = load_dataset("fmnist", "train", dcfg), load_dataset("fmnist", "test", dcfg)
        calib, _ = stack(train, calibration_indices(len(train), args.calib_size, 0))
        bias_correct = {"on": True, "off": False, "method": None}[args.bias_correct]
        cfg = fastquant.QuantConfig(method=args.method, w_bits=args.w_bits, a_bits=args.a_bits,
                                    bias_correct=bias_correct)
        q = fastquant.quantize(model, calib, cfg, progress=False)
    quantizers = {n: m for n, m in q.named_modules() if isinstance(m, Quantizer)}
    kinds: dict[str, list] = {}
    for name, qz in quantizers.items():
        kinds.setdefault(kind_of(name), []).append(qz)
    n = min(args.eval_size, len(test))

    def top1(float_ones, label):
        set_mode(quantizers.values(), "quant")
        set_mode(float_ones, "off")
        t = time.time()
        acc = evaluate(q, test, n, args.batch_size, desc=label)
        print(f"| {label} | {acc:.2f} |", flush=True)
        return {"row": label, "top1": round(acc, 2), "seconds": round(time.time() - t, 1)}

    print(f"\n{args.model} {args.method} W{args.w_bits}A{args.a_bits}, first {n} test images\n\n"
          "| in float | top-1 |\n|---|---|")
    rows = [top1([], "nothing (all quantized)")]
    weights = [qz for name, qz in quantizers.items() if name.endswith("weight_quant")]
    rows.append(top1([qz for qz in quantizers.values() if qz not in weights], "every activation"))
    if args.quantized:
        # a saved model holds its weights on their grid: with the weight quantizers off they
        # are the same values, so the weight rows would only repeat "all quantized"
        print("(a saved model stores its weights as integers: no float weights to compare)")
    else:
        rows.append(top1(weights, "every weight"))
    for kind, qzs in sorted(kinds.items()):
        if not (args.quantized and kind.endswith("weight_quant")):
            rows.append(top1(qzs, kind))
    if args.per_block:
        blocks = sorted({block_of(name) for name in quantizers} - {None})
        for b in blocks:
            acts = [qz for name, qz in quantizers.items()
                    if block_of(name) == b and not name.endswith("weight_quant")]
            rows.append(top1(acts, f"block {b} activations"))
    set_mode(quantizers.values(), "quant")
    stem = args.quantized.stem if args.quantized else (
        f"{args.model}_{args.method}_w{args.w_bits}a{args.a_bits}_bc-{args.bias_correct}")
    out = args.json or ROOT / "bench" / "results" / f"error_sources_{stem}.json"
    record = {"date": time.strftime("%Y-%m-%d"), "model": args.model, "method": args.method, "w_bits": args.w_bits,
              "a_bits": args.a_bits, "quantized": str(args.quantized) if args.quantized else None,
              "bias_correct": args.bias_correct, "calib_size": args.calib_size,
              "eval_size": n, "device": device_name(torch.device("cpu")), "commit": commit(), **versions(),
              "rows": rows}
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nsaved {out}")


if __name__ == "__main__":
    main()
