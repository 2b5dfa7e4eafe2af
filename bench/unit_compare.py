"""Reconstruct one stretch of a quantized model with different unit schedules and compare the
output error each leaves: whether half-block units (PFCR's level 0) lose against block units
by themselves, apart from the rest of a method.

    python bench/unit_compare.py --schedule block9 --schedule attn9,mlp9 --schedule mlp9

Each schedule starts from the same calibrated model (``--w-bits``/``--a-bits``, the
reconstruction methods' calibration, nothing reconstructed before it) and is reconstructed
with ``ReconConfig(method=--method, iters=--iters)`` plus ``--set`` options; a schedule is
one level of comma-separated unit names. Prints and writes every unit's output MSE against
the float model before and after its training (the same numbers as a run's ``recon_units``)
to bench/results/unit_compare_<model>_<method>_w<W>a<A>.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="dinov2-s14-fmnist")
    p.add_argument("--w-bits", type=int, default=4)
    p.add_argument("--a-bits", type=int, default=4)
    p.add_argument("--method", default="brecq", help="the reconstruction method whose defaults apply")
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--calib-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--schedule", action="append", required=True, help="unit names, comma-separated (repeatable)")
    p.add_argument("--set", action="append", default=[], help="a ReconConfig field or option, NAME=VALUE")
    p.add_argument("--threads", type=int)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import fastquant
    from fastquant import QuantConfig
    from fastquant.cli import _apply_recon_settings, _recon_setting
    from fastquant.data import calibration_indices, load_dataset, stack
    from fastquant.models import load_model
    from fastquant.recon import ReconConfig
    from fastquant.recon.engine import reconstruct
    from run import commit, device_name, versions

    torch.manual_seed(args.seed)
    model, dcfg, _ = load_model(args.model)
    train = load_dataset("fmnist", "train", dcfg)
    calib = stack(train, calibration_indices(len(train), args.calib_size, args.seed))[0]
    # the calibrated model a reconstruction starts from: a calibration preset with the
    # reconstruction methods' calibration spec (QuantConfig(method=...).calib_spec())
    qcfg = QuantConfig(w_bits=args.w_bits, a_bits=args.a_bits, method=args.method)
    import fastquant.api as api

    real = api.run_method
    api.run_method = lambda *a, **k: None  # calibrate only
    try:
        q0 = fastquant.quantize(model, calib, qcfg, progress=False)
    finally:
        api.run_method = real
    cfg = _apply_recon_settings(ReconConfig(method=args.method, iters=args.iters, seed=args.seed),
                                [_recon_setting(t) for t in args.set])
    rows = []
    for sched in args.schedule:
        q = copy.deepcopy(q0)
        t0 = time.time()
        rec = reconstruct(q, [sched.split(",")], calib, cfg, fp_model=model, progress=False)
        units = [{"name": u.name, "mse_before": u.mse_before, "mse_after": u.mse_after} for u in rec.units]
        rows.append({"schedule": sched, "units": units, "seconds": round(time.time() - t0, 1)})
        print(f"{sched}: " + ", ".join(f"{u['name']} {u['mse_before']:.4f} -> {u['mse_after']:.4f}" for u in units),
              flush=True)
    stem = f"unit_compare_{args.model}_{args.method}_w{args.w_bits}a{args.a_bits}"
    out = args.json or ROOT / "bench" / "results" / f"{stem}.json"
    out.write_text(json.dumps({"model": args.model, "w_bits": args.w_bits, "a_bits": args.a_bits,
                               "recon_config": cfg.to_dict(), "calib_size": args.calib_size, "seed": args.seed,
                               "device": device_name(torch.device("cpu")), "commit": commit(), **versions(),
                               "date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
