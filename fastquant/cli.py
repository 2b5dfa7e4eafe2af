"""The ``fastquant`` command line: quantize and evaluate Vision Transformers.

User mistakes print one line, ``error: ...``, and exit with code 2.
"""
from __future__ import annotations

import argparse
import ast
import copy
import json
import platform
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

from ._compat import cpu_info
from .config import CALIB_PRESETS
from .errors import FastquantError
from .files import atomic_write_text, check_writable, check_writable_folder
from .recon import method_names as recon_methods

# Reconstruction presets (--budget): calibration images and steps per unit; each method's
# record adds its own settings for a budget (fastquant.recon.ReconMethod.budgets).
BUDGETS = {
    "cpu": dict(calib_size=256, iters=300),
    "full": dict(calib_size=1024, iters=20000),
}
# Per-unit reconstruction results in the JSON output.
RECORD_KEYS = ("level", "name", "loss_first", "loss_last", "mse_before", "mse_after", "seconds")
# What `fastquant quantize` runs with no arguments at all (see README: the embedded default).
EMBEDDED_DEFAULT = ["--model", "dinov2-s14-fmnist", "--data", "fmnist", "--method", "repq",
                    "--w-bits", "6", "--a-bits", "6", "--eval-size", "2000"]


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 2
        raise FastquantError(message)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _recon_setting(text: str) -> tuple[str, object]:
    """KEY=VALUE for --recon-set: VALUE as a Python literal (number, True/False, None, a tuple), else a string."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        parsed = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
        parsed = value.strip()
    return key.strip(), parsed


def _add_model_args(p: argparse.ArgumentParser, from_file: bool = False):
    p.add_argument("--model", default=None if from_file else "dinov2-s14-fmnist",
                   help="dinov2-s14-fmnist, vit-tiny-fmnist, or any timm model name "
                        + ("(default: the saved model's, else dinov2-s14-fmnist)" if from_file else "(default: %(default)s)"))
    p.add_argument("--checkpoint", help="local weights for a timm model (.safetensors, .pth, .pt)")
    p.add_argument("--img-size", type=_positive, help="input size in pixels (default: the model's)")
    p.add_argument("--data", default="fmnist", help="fmnist or imagefolder:PATH (default: %(default)s)")
    p.add_argument("--eval-size", type=_positive, help="evaluate on the first N test images (default: all)")
    p.add_argument("--batch-size", type=_positive, default=100, help="evaluation batch size (default: %(default)s)")
    p.add_argument("--json", type=Path, help="write the result as JSON to this file")
    p.add_argument("--threads", type=_positive, help="CPU threads for torch (default: torch's choice)")


def _budget_help(budget: str) -> str:
    """'cpu (256 images, 300 steps per unit; pfcr: stop_at=2, ...)' from the presets and the methods' records."""
    from .recon import get_method

    preset = BUDGETS[budget]
    extra = [f"{m}: " + ", ".join(f"{k}={v}" for k, v in get_method(m).budgets[budget].items())
             for m in recon_methods() if get_method(m).budgets.get(budget)]
    return (f"{budget} ({preset['calib_size']:,} images, {preset['iters']:,} steps per unit"
            + ("; " + "; ".join(extra) if extra else "") + ")")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fastquant", description="Post-training quantization for Vision Transformers.")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)
    q = sub.add_parser("quantize", help="quantize a model, evaluate it against full precision",
                       description="Quantize a model and evaluate it against full precision. With no arguments: "
                                   + " ".join(EMBEDDED_DEFAULT))
    _add_model_args(q)
    q.add_argument("--method", default="repq",
                   help=f"{', '.join(CALIB_PRESETS)}, or a reconstruction: {', '.join(recon_methods())} "
                        "(default: %(default)s)")
    q.add_argument("--w-bits", type=_int, default=6, help="weight bits, 2-8 (default: %(default)s)")
    q.add_argument("--a-bits", type=_int, default=6, help="activation bits, 2-8 (default: %(default)s)")
    q.add_argument("--calib-size", type=_int, default=None,
                   help="calibration images from the training split (default: 128, or the budget's for reconstruction)")
    q.add_argument("--seed", type=_int, default=0, help="seed for drawing calibration images (default: %(default)s)")
    q.add_argument("--out", type=Path, help="save the quantized model (safetensors, integer weights)")
    q.add_argument("--per-token", action="store_true", help="dynamic per-token activation scales")
    q.add_argument("--fc2-smooth", type=float, metavar="ALPHA",
                   help="move the MLPs' fc2 input ranges into fc2's weights with strength ALPHA in [0, 1] "
                        "(0: off; default: the method's, 1 for repq, 0 otherwise)")
    q.add_argument("--no-zero-point-search", action="store_true",
                   help="activation steps' MSE search without the zero points that keep the observed minimum "
                        "(the search before that option existed; rtn does not search)")
    q.add_argument("--edge-rounding", choices=("nearest", "gptq"),
                   help="rounding of the patch embedding's and the classifier's weights, which no reconstruction "
                        "unit learns (default: the method's, gptq except for rtn)")
    q.add_argument("--deploy", choices=("cpu", "cuda", "triton", "torch"),
                   help="also convert to integer layers with this backend (cpu: the fused int8 kernels of the CPU "
                        "extension; triton: Triton kernels on a GPU; cuda: the CUDA C++ extension on a GPU; torch: "
                        "the PyTorch twins), evaluate the deployed model and save it with --out")
    r = q.add_argument_group(f"reconstruction ({', '.join(recon_methods())})")
    r.add_argument("--budget", choices=tuple(BUDGETS),
                   help="preset: " + " or ".join(_budget_help(b) for b in BUDGETS)
                        + " (default: full with CUDA, else cpu)")
    r.add_argument("--iters", type=_positive, help="steps per unit (default: the budget's)")
    r.add_argument("--no-pos", action="store_true",
                   help="the same as --recon-set pos=False: without the progressive optimisation strategy "
                        "(pfcr; its default since measured, --recon-set pos=True turns it on)")
    r.add_argument("--recon-set", type=_recon_setting, action="append", default=[], metavar="KEY=VALUE",
                   help="set a reconstruction setting or a method option (fastquant.recon.ReconConfig), e.g. "
                        "qdrop_p=0.5, carry=0.5, stop_at=0 (repeatable; applied after the budget and --no-pos)")
    r.add_argument("--state-dir", type=Path, help="save the reconstruction state here after every unit")
    r.add_argument("--resume", action="store_true", help="continue the reconstruction saved in --state-dir")
    r.add_argument("--plot", type=Path, help="write a PNG of every unit's loss across levels")
    e = sub.add_parser("eval", help="evaluate a full-precision or saved quantized model")
    _add_model_args(e, from_file=True)
    e.add_argument("--quantized", type=Path, help="a model saved by `fastquant quantize --out`")
    x = sub.add_parser("export", help="write a saved quantized model as a QDQ ONNX model",
                       description="Write a model saved by `fastquant quantize --out` as a standard QDQ ONNX "
                                   "model (int8 weights, QuantizeLinear/DequantizeLinear activations) for ONNX "
                                   "Runtime, OpenVINO or TensorRT.")
    x.add_argument("--quantized", type=Path, required=True, help="a model saved by `fastquant quantize --out`")
    x.add_argument("--onnx", type=Path, required=True, help="the ONNX file to write")
    x.add_argument("--softmax", choices=("uint8", "exact"), default="uint8",
                   help="the log softmax quantizer as uint8 QDQ with step 1/255 (integer kernels) or exactly, "
                        "in float operations (default: %(default)s)")
    x.add_argument("--per-head", choices=("tensor", "exact"), default="tensor",
                   help="per-head Q/K steps as one covering per-tensor QDQ, or exactly in float operations "
                        "(default: %(default)s)")
    x.add_argument("--weights", choices=("asymmetric", "symmetric", "unsigned"), default="asymmetric",
                   help="int8 weight codes with fastquant's zero points (exact; fastest in ONNX Runtime), with "
                        "zero point 0 (OpenVINO's and TensorRT's form; at 8 bits a near-exact correction), or "
                        "uint8 codes (exact also on x86 CPUs without VNNI, where int8 kernels saturate at 8-bit "
                        "weights) (default: %(default)s)")
    x.add_argument("--opset", type=_positive, default=17, help="ONNX opset, 13 or later (default: %(default)s)")
    x.add_argument("--json", type=Path, help="write what was exported as JSON to this file")
    x.add_argument("--threads", type=_positive, help="CPU threads for torch (default: torch's choice)")
    return p


def _check_out_path(path: Path | None, what: str):
    """Before any work: the folder exists and takes a new file, the path is not a folder."""
    if path is not None:
        check_writable(path, what)


def _write_json(path: Path, obj: dict):
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def _commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


# The instruction-set extensions that decide this machine's speed (bf16 and int8 products).
CPU_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def _cpu() -> str:
    """The CPU's model name and which of CPU_FEATURES it has, e.g. "AMD EPYC (avx2, avx512f)"."""
    name, flags = cpu_info()
    name = name or platform.processor() or platform.machine()
    have = [feat for feat in CPU_FEATURES if feat in (flags or ())]
    return f"{name} ({', '.join(have)})" if have else name


def _check_classes(test, spec):
    """Warn when the data's classes cannot be the model head's (top-1 compares label indices)."""
    classes = getattr(test, "classes", None)
    if classes is not None and len(classes) != spec.num_classes:
        warnings.warn(f"the data has {len(classes)} classes and the model's head {spec.num_classes}: top-1 compares "
                      "class indices (sorted folder names), which then do not match the head's classes", stacklevel=2)


def _eval_size(asked: int | None, test) -> int:
    """The number of test images to evaluate: all by default; more than there are is capped, said."""
    if asked is not None and asked > len(test):
        warnings.warn(f"--eval-size {asked}: the test set has {len(test)} images; evaluating all of them",
                      stacklevel=2)
    return min(asked or len(test), len(test))


def _table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def cmd_quantize(args) -> dict:
    import torch

    from . import QuantConfig, quantize, record_of, save
    from .data import calibration_indices, load_dataset, stack
    from .deploy import resolve_backend
    from .evaluate import evaluate
    from .models import load_model
    from .recon import ReconConfig, get_method, plot_losses
    from .recon.checkpoint import STATE_FILE
    from .validate import check_images

    t0 = time.time()
    cfg = QuantConfig(w_bits=args.w_bits, a_bits=args.a_bits, method=args.method, per_token=args.per_token,
                      fc2_smooth=args.fc2_smooth, zero_point_search=False if args.no_zero_point_search else None,
                      edge_rounding=args.edge_rounding)
    reconstructs = cfg.reconstructs
    given = [flag for flag, on in (("--budget", args.budget), ("--iters", args.iters), ("--no-pos", args.no_pos),
                                   ("--recon-set", args.recon_set),
                                   ("--state-dir", args.state_dir), ("--resume", args.resume), ("--plot", args.plot))
             if on]
    if given and not reconstructs:
        raise FastquantError(f"{', '.join(given)}: only for the reconstruction methods ({', '.join(recon_methods())})")
    if args.no_pos and "pos" not in get_method(cfg.method).options:
        with_pos = [m for m in recon_methods() if "pos" in get_method(m).options]
        raise FastquantError(f"--no-pos applies to {', '.join(with_pos)} only")
    if args.deploy in ("triton", "cuda") and not torch.cuda.is_available():
        raise FastquantError(f"--deploy {args.deploy} needs a CUDA GPU (use --deploy cpu)")
    if args.deploy is not None:
        resolve_backend(args.deploy, torch.device("cuda" if args.deploy in ("triton", "cuda") else "cpu"))
    if args.resume and args.state_dir is None:
        raise FastquantError("--resume needs --state-dir (the folder of the run to continue)")
    if args.state_dir is not None:
        check_writable_folder(args.state_dir, "--state-dir")
    if args.state_dir is not None and not args.resume and (args.state_dir / STATE_FILE).exists():
        raise FastquantError(f"{args.state_dir / STATE_FILE} already holds a reconstruction state: "
                             "add --resume to continue it, or choose another --state-dir")
    budget = args.budget or ("full" if torch.cuda.is_available() else "cpu")
    preset = BUDGETS[budget]
    calib_size = args.calib_size if args.calib_size is not None else (preset["calib_size"] if reconstructs else 128)
    rcfg = None
    if reconstructs:
        settings = dict(get_method(cfg.method).budgets.get(budget, {}))
        if args.no_pos:
            settings["pos"] = False
        rcfg = ReconConfig(method=cfg.method, iters=args.iters or preset["iters"], seed=args.seed, **settings)
        rcfg = _apply_recon_settings(rcfg, args.recon_set).check_options_apply()
    _check_out_path(args.out, "--out")
    _check_out_path(args.json, "--json")
    _check_out_path(args.plot, "--plot")
    model, dcfg, spec = load_model(args.model, args.checkpoint, args.img_size)
    train = load_dataset(args.data, "train", dcfg)
    test = load_dataset(args.data, "test", dcfg)
    idx = calibration_indices(len(train), calib_size, args.seed)
    calib = check_images(stack(train, idx)[0])
    _check_classes(test, spec)
    eval_size = _eval_size(args.eval_size, test)
    fp = evaluate(model, test, eval_size, args.batch_size, desc="eval fp32")
    t1 = time.time()
    qmodel = quantize(model, calib, cfg, recon=rcfg, state_dir=args.state_dir, resume=args.resume)
    t_quant = time.time() - t1
    record = record_of(qmodel).recon
    q = evaluate(qmodel, test, eval_size, args.batch_size, desc=f"eval W{cfg.w_bits}A{cfg.a_bits}")
    deployed = None
    if args.deploy:
        from . import convert

        dmodel = convert(copy.deepcopy(qmodel).cuda(), args.deploy, inplace=True) if args.deploy in ("triton", "cuda") \
            else convert(qmodel, args.deploy)
        deployed = evaluate(dmodel, test, eval_size, args.batch_size, desc=f"eval deployed ({args.deploy})")
        qmodel = dmodel
    deploy_report = record_of(qmodel).deploy
    if args.out:  # the most expensive result first; the JSON (main) and the plot come after it
        save(qmodel, args.out)
    if args.plot:
        try:
            plot_losses(record, args.plot)
        except (OSError, FastquantError) as exc:
            warnings.warn(f"the loss plot {args.plot} was not written ({exc})", stacklevel=1)
    result = {
        "model": spec.name, "data": args.data, "method": cfg.method, "w_bits": cfg.w_bits, "a_bits": cfg.a_bits,
        "fp_top1": round(fp, 2), "q_top1": round(q, 2), "drop": round(fp - q, 2),
        "calib_size": len(idx), "eval_size": eval_size, "seed": args.seed, "img_size": spec.img_size,
        "quantize_seconds": round(t_quant, 1), "seconds": round(time.time() - t0, 1),
        "config": json.loads(cfg.to_json()), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "cpu": _cpu(), "commit": _commit(), "out": str(args.out) if args.out else None,
        "budget": budget if reconstructs else None, "iters_per_unit": rcfg.iters if rcfg else None,
        "recon_config": rcfg.to_dict() if rcfg else None,
        "recon_units": [{k: getattr(u, k) for k in RECORD_KEYS} for u in record.units] if record else None,
        "recon_resumed_from": record.resumed_from if record else None,
        "deploy": args.deploy, "deployed_top1": round(deployed, 2) if deployed is not None else None,
        "deployed_layers": len(deploy_report.converted) if deployed is not None else None,
        "deployed_backend": deploy_report.backend if deployed is not None else None,
    }
    print(_table([
        ("model", f"{spec.name} ({spec.img_size} px) on {args.data}"),
        ("method", f"{cfg.method} W{cfg.w_bits}A{cfg.a_bits}"
                   + (f" ({budget} budget: {rcfg.iters} steps per unit, {len(record.units)} units)" if record else "")),
        ("calibration", f"{len(idx)} training images, seed {args.seed}"),
        ("evaluation", f"first {eval_size} test images"),
        ("fp32 top-1", f"{fp:.2f}"),
        ("quantized top-1", f"{q:.2f} ({q - fp:+.2f})"),
        ("time", f"{result['seconds']:.0f} s (quantize {t_quant:.0f} s)"),
    ] + ([("deployed top-1", f"{deployed:.2f} ({args.deploy}: {result['deployed_layers']} integer layers)")]
         if deployed is not None else [])
      + ([("saved", str(args.out))] if args.out else [])))
    return result


def _apply_recon_settings(rcfg, settings):
    """ReconConfig with the --recon-set fields replaced (ReconConfig validates the values)."""
    import dataclasses

    if not settings:
        return rcfg
    from .recon.registry import options

    names = [f.name for f in dataclasses.fields(rcfg) if f.name != "options"] + sorted(options())
    for key, _ in settings:
        if key not in names:
            raise FastquantError(f"--recon-set {key}: not a reconstruction setting "
                                 f"(one of {', '.join(n for n in names if n != 'method')})")
        if key == "method":
            raise FastquantError("--recon-set method: choose the method with --method")
    changes = dict(settings)
    if "beta" in changes and isinstance(changes["beta"], list):
        changes["beta"] = tuple(changes["beta"])
    return dataclasses.replace(rcfg, **changes)


def cmd_eval(args) -> dict:
    import torch

    from . import load, record_of
    from .data import load_dataset
    from .evaluate import evaluate
    from .models import build_model, load_model
    from .serialize import read_config, read_metadata

    t0 = time.time()
    _check_out_path(args.json, "--json")
    if args.quantized:
        if args.checkpoint is not None:
            raise FastquantError("--checkpoint: the weights come from --quantized")
        _, spec = read_config(args.quantized, read_metadata(args.quantized))
        if args.model not in (None, spec.name):
            raise FastquantError(f"{args.quantized} holds {spec.name}, not {args.model}")
        model = load(args.quantized)
        _, dcfg = build_model(spec, weights=False, empty=True)
        qcfg = record_of(model).config
        label = f"{qcfg.method} W{qcfg.w_bits}A{qcfg.a_bits}"
    else:
        model, dcfg, spec = load_model(args.model or "dinov2-s14-fmnist", args.checkpoint, args.img_size)
        label = "fp32"
    test = load_dataset(args.data, "test", dcfg)
    _check_classes(test, spec)
    eval_size = _eval_size(args.eval_size, test)
    top1 = evaluate(model, test, eval_size, args.batch_size, desc=f"eval {label}")
    result = {"model": spec.name, "data": args.data, "quantized": str(args.quantized) if args.quantized else None,
              "top1": round(top1, 2), "eval_size": eval_size, "seconds": round(time.time() - t0, 1),
              "torch": torch.__version__}
    print(_table([("model", f"{spec.name} ({label})"), ("evaluation", f"first {eval_size} test images"),
                  ("top-1", f"{top1:.2f}")]))
    return result


def cmd_export(args) -> dict:
    import dataclasses

    from . import export_onnx, load, record_of
    from .deploy.export import cpu_saturates
    from .serialize import read_config, read_metadata

    t0 = time.time()
    _check_out_path(args.onnx, "--onnx")
    _check_out_path(args.json, "--json")
    meta = read_metadata(args.quantized)
    _, spec = read_config(args.quantized, meta)
    model = load(args.quantized)
    if record_of(model).deploy is not None:
        raise FastquantError(f"{args.quantized} holds a deployed model (saved after --deploy): "
                             "export a model saved without --deploy")
    rep = export_onnx(model, args.onnx, softmax=args.softmax, per_head=args.per_head, weights=args.weights,
                      opset=args.opset)
    qcfg = record_of(model).config
    if args.weights != "unsigned" and cpu_saturates() and any(
            getattr(getattr(m, "weight_quant", None), "bits", None) == 8 for m in model.modules()):
        print("note: this CPU has no VNNI: ONNX Runtime's int8 kernels saturate here with 8-bit weights "
              "(predictions drift); --weights unsigned runs exactly on every CPU", file=sys.stderr)
    print(_table([("model", f"{spec.name} ({qcfg.method} W{qcfg.w_bits}A{qcfg.a_bits})"), ("ONNX", str(args.onnx)),
                  ("integer weights", str(len(rep.weights))), ("QDQ activations", str(len(rep.qdq))),
                  ("nearest standard form", str(len(rep.approximated))),
                  ("float operations", str(len(rep.emulated)))]))
    return {"model": spec.name, "quantized": str(args.quantized), **dataclasses.asdict(rep),
            "seconds": round(time.time() - t0, 1)}


def _terminate(signum, frame):
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    """The command line (one line on stderr and exit code 2 for a user's mistake). SIGTERM
    ends a run as SIGINT does: through the exception path, so that no partial file stays."""
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main_thread else None
    try:
        return _main(argv)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _main(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv == ["quantize"]:
        argv = ["quantize"] + EMBEDDED_DEFAULT
    warnings.formatwarning = lambda msg, cat, *a, **k: f"warning: {msg}\n"
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        result = {"quantize": cmd_quantize, "eval": cmd_eval, "export": cmd_export}[args.command](args)
    except FastquantError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except SystemExit as exc:  # SIGTERM, turned into an exception so that partial files are removed
        if exc.code == 128 + signal.SIGTERM:
            print("terminated", file=sys.stderr)
        raise
    if args.json:
        try:
            _write_json(args.json, result)
        except (OSError, FastquantError) as exc:
            kept = f" (the model was saved to {args.out})" if getattr(args, "out", None) else ""
            print(f"error: the JSON result {args.json} was not written ({exc}){kept}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
