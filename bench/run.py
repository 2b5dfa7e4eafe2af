"""Latency benchmarks: whole models (full precision, fastquant deployments, peers) and kernels.

    python bench/run.py [--json PATH] [--sections e2e,kernels,recon] [--models M1,M2]
                        [--batches 1,8,64] [--reps 10] [--eval-size 2000]

e2e: for each model and batch size, the median latency of a forward pass of: full
precision (fp32 eager on the CPU, fp16 on a GPU), the fake-quantized model, fastquant's
W8A8 and W4A8 deployments (``fastquant.convert``: integer GEMMs; the cpu backend on the
CPU; on a GPU each of the cuda and triton backends that is available, with the attention
fused where the softmax is log-quantized, run in fp16 like the baseline) and the peers:
on the CPU torch's dynamic int8 quantization of the Linear layers and (bench/peers.py,
unless --no-peers) fastquant's W8A8 exported to ONNX (``fastquant.export_onnx``) and run in
ONNX Runtime and OpenVINO, ONNX Runtime's int8 dynamic and static QDQ quantization and
OpenVINO's int8 through NNCF (each skipped with the reason when its package is missing;
``--pin`` pins the cores, ``--threads`` sets every runtime's threads), on a GPU torchao's
int8 dynamic quantization when its wheel is installed (skipped with the reason otherwise). Each variant gets 3 warm-up calls, then the variants are timed in interleaved
rounds (one call each per round), so a shared machine's drift hits all of them alike. dinov2-s14-fmnist is
quantized with repq on 128 Fashion-MNIST training images and the W8A8 deployment's top-1
is compared with the fake-quantized model's on the first --eval-size test images;
timm models (vit_base_patch16_224 by default) use random weights and random calibration
images (rtn). Ratios are measured side by side in one run.

kernels: the Triton/CUDA kernels against the PyTorch reference (needs a CUDA device;
skipped with the reason otherwise): per-token int8 quantization, and the W8A8 linear
layer (Triton quantize + int8 GEMM with the dequantization epilogue) against fp16
torch.matmul at ViT-S/B shapes (record ``target:w8a8_gemm`` at 12,608 x 768 x 3,072), and
the fused quantized attention against fp16 scaled_dot_product_attention at batch 64, 197
tokens, head dim 64, 12 heads (record ``target:attention``) and 6 heads. Where the CUDA
extension is built, its C++ kernels (quantize, GEMM, W4A8 GEMM, attention) are timed on
the same operands beside the Triton ones (``cuda_vs_triton``: Triton time over CUDA time).
Last, one reconstruction training step (forward, backward, Adam) of a ViT-B block at batch
32, W4A4 with AdaRound, LSQ and QDrop, with the fused fake-quant linear and attention ops against the
reference fake-quant path in fp32 and the bf16 grid product (record ``target:recon_step``,
with the loss trajectories of both over five steps); ``--sections recon`` runs it alone.

Prints tables with the device, versions and commit, and saves everything as JSON
(default bench/results/run_<device>.json). Records named ``target:...`` hold the
figures the project's targets are judged by.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent

# The shapes the kernel benchmarks time: real ViT-S/B layers (64 images of 197 tokens), or, with
# --smoke, tiny ones that run the same code on the CPU through Triton's interpreter (every line
# of the GPU benchmarks executed, nothing timed that means anything), so that a broken
# benchmark shows on a CPU machine before the GPU run.
SHAPES = {
    "quantize": [(64 * 197, 768), (64 * 197, 3072)],
    "gemm": [(64 * 197, 768, 3072), (64 * 197, 3072, 768), (64 * 197, 768, 2304), (64 * 197, 384, 1536),
             (64 * 197, 1536, 384)],
    "attention": [(64, 12, 197, 64), (64, 6, 197, 64)],
    "recon_step": ("vit_base_patch16_224", 224, 32, 5),  # model, image size, batch, steps compared
}
SMOKE_SHAPES = {
    "quantize": [(17, 64)],
    "gemm": [(33, 64, 48)],
    "attention": [(1, 12, 17, 64)],
    "recon_step": ("vit_tiny_patch16_224", 32, 2, 2),
}


# -- environment -------------------------------------------------------------------------
def commit() -> str:
    """The commit under test (bench/gpu_report.py: git, else FASTQUANT_COMMIT, else the GPU kit's)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gpu_report import commit as _commit

    return _commit()


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {torch.get_num_threads()} threads"


def versions() -> dict:
    from fastquant._compat import import_timm  # timm beside a CPU-only torch needs fastquant's shim

    v = {"python": platform.python_version(), "torch": torch.__version__, "timm": import_timm().__version__}
    for pkg in ("triton", "onnxruntime", "openvino", "nncf"):
        try:
            v[pkg] = __import__(pkg).__version__
        except ImportError:
            v[pkg] = None
    return v


# -- timing ------------------------------------------------------------------------------
def median_ms(fns: dict, reps: int, warmup: int = 3, max_seconds: float = 120.0) -> dict:
    """{name: (median wall time of ``fn()`` in ms, runs)} for a dict of callables, timed
    side by side: after ``warmup`` untimed calls of each, rounds that call every one once,
    until each has ``reps`` timed runs (at least 3 once ``max_seconds`` have passed).
    Interleaving spreads the drift of a shared machine over all variants alike."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
        sync()
    times = {k: [] for k in fns}
    start = time.perf_counter()
    for r in range(reps):
        if r >= 3 and time.perf_counter() - start >= max_seconds:
            break
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            sync()
            times[k].append(time.perf_counter() - t)
    return {k: (1e3 * statistics.median(v), len(v)) for k, v in times.items()}


# -- models ------------------------------------------------------------------------------
def prepare(name: str, device: torch.device, eval_size: int, peers: bool = False):
    """{variant: model} for one model name, and accuracy figures (dinov2 only)."""
    import fastquant
    from fastquant.data import calibration_indices, load_dataset, stack
    from fastquant.evaluate import evaluate
    from fastquant.models import load_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, dcfg, _ = load_model(name)
    model = model.to(device).eval()
    real_data = name.endswith("-fmnist")
    if real_data:
        train = load_dataset("fmnist", "train", dcfg)
        calib, _ = stack(train, calibration_indices(len(train), 128, 0))
        method = "repq"
    else:
        calib = torch.randn(8, 3, dcfg.img_size, dcfg.img_size, generator=torch.Generator().manual_seed(0))
        method = "rtn"
    calib = calib.to(device)
    base = "fp32" if device.type == "cpu" else "fp16"
    variants = {base: model if device.type == "cpu" else copy.deepcopy(model).half()}
    info = {"img_size": dcfg.img_size, "quantize_method": method, "calib_images": len(calib), "skipped": {}}
    from fastquant import backends

    # On a GPU every deployment backend that is there, cast to fp16 like the baseline (the
    # integer layers keep their scales in fp32); the first listed is convert()'s default.
    gpu_backends = [b for b, ok in (("cuda", backends.CUDA_EXT_AVAILABLE), ("triton", backends.TRITON_AVAILABLE)) if ok]
    if device.type == "cuda" and not gpu_backends:
        info["skipped"]["fastquant"] = "neither the CUDA extension nor Triton is available"
    info["default_backend"] = "cpu" if device.type == "cpu" else (gpu_backends or [None])[0]
    for w, a in ((8, 8), (4, 8)):
        # fc2_smooth 0: the model the committed tables (bench/results/cpu/) were measured with
        cfg = fastquant.QuantConfig(method=method, w_bits=w, a_bits=a, fc2_smooth=0.0)
        q = fastquant.quantize(model, calib, cfg, progress=False)
        variants[f"fake W{w}A{a}"] = q
        for backend in (["cpu"] if device.type == "cpu" else gpu_backends):
            label = f"fastquant W{w}A{a}" + ("" if device.type == "cpu" else f" {backend}")
            try:
                dep = fastquant.convert(q, backend)
                variants[label] = dep if device.type == "cpu" else dep.half()
            except fastquant.FastquantError as exc:
                info["skipped"][label] = str(exc)
                print(f"{label}: skipped ({exc})")
            else:
                info.setdefault("fused_attention", {})[label] = len(fastquant.record_of(dep).deploy.fused_attention)
    if device.type == "cpu":
        from torch.ao.quantization import quantize_dynamic

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            variants["torch dynamic int8"] = quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)
        if peers:  # the other CPU runtimes (bench/peers.py), each skipped with the reason when missing
            import tempfile

            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from peers import peer_variants

            work = Path(tempfile.mkdtemp(prefix="fastquant-peers-"))
            found, missing = peer_variants(model, variants["fake W8A8"], calib.cpu(), dcfg.img_size,
                                           torch.get_num_threads(), work)
            variants.update(found)
            info["skipped"].update(missing)
            info["peers_threads"] = torch.get_num_threads()
    if device.type == "cuda":  # the GPU peer, when its wheel is installed and matches this torch
        try:
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

            peer = copy.deepcopy(model).half()
            quantize_(peer, Int8DynamicActivationInt8WeightConfig())
            variants["torchao int8 dynamic"] = peer
        except Exception as exc:  # not installed, or an API or build that does not match
            info["skipped"]["torchao int8 dynamic"] = f"{type(exc).__name__}: {exc}"
            print(f"torchao int8 dynamic: skipped ({type(exc).__name__}: {exc})")
    if real_data and eval_size:
        test = load_dataset("fmnist", "test", dcfg)
        acc = {"fp32": evaluate(model, test, eval_size, 100, progress=False)}
        for k in [k for k in variants if k.startswith(("fake W", "fastquant W", "torch dynamic", "ORT", "OpenVINO"))]:
            try:
                acc[k] = evaluate(variants[k], test, eval_size, 100, progress=False)
            except Exception as exc:  # noqa: BLE001 - recorded, the other variants go on
                info.setdefault("failed", {})[f"{k} evaluation"] = f"{type(exc).__name__}: {exc}"
                print(f"{k}: evaluation FAILED ({type(exc).__name__}: {exc})", flush=True)
                del variants[k]
        info["top1"] = acc
        info["eval_size"] = eval_size
    return variants, info


def bench_e2e(args, device, env, save=lambda records: None) -> list[dict]:
    """Every model of ``--models`` in turn; a model that fails is recorded with its error
    (``e2e_error``) and the others still run. ``save(records)`` is called after each model."""
    records = []
    for name in args.models.split(","):
        try:
            _bench_model(name, args, device, env, records)
        except Exception as exc:  # noqa: BLE001 - one model's failure must not lose the others' numbers
            print(f"\n## {name}: FAILED ({type(exc).__name__}: {exc})", flush=True)
            traceback.print_exc()
            records.append({"name": "e2e_error", "model": name, "error": f"{type(exc).__name__}: {exc}", **env})
        save(records)
    return records


def _bench_model(name: str, args, device, env, records: list[dict]):
    """Prepare one model's variants and time them at every batch size, appending to
    ``records`` as it goes. A variant that fails when first run is dropped, with its error
    in the model's ``e2e_info`` record (``failed``)."""
    print(f"\n## {name}: preparing (quantize, convert{', evaluate' if name.endswith('-fmnist') else ''})",
          flush=True)
    variants, info = prepare(name, device, args.eval_size, peers=args.peers and device.type == "cpu")
    if "top1" in info:
        print("top-1 on the first", info["eval_size"], "test images:",
              ", ".join(f"{k} {v:.2f}" for k, v in info["top1"].items()))
    first = next(iter(variants))
    info_record = {"name": "e2e_info", "model": name, **info}
    records.append(info_record)
    print(f"\n| batch | variant | median ms | images/s | vs {first} |\n|---|---|---|---|---|")
    for batch in (int(b) for b in args.batches.split(",")):
        x = torch.randn(batch, 3, info["img_size"], info["img_size"], generator=torch.Generator().manual_seed(1))
        x = x.to(device)
        inputs = {v: x.half() if v == "fp16" or (device.type == "cuda" and v.startswith(("fastquant", "torchao")))
                  else x for v in variants}
        for v in list(variants)[1:]:  # the baseline must run; the others may fail alone
            try:
                with torch.inference_mode():
                    variants[v](inputs[v])
            except Exception as exc:  # noqa: BLE001 - recorded, the other variants go on
                info_record.setdefault("failed", {})[f"{v} at batch {batch}"] = f"{type(exc).__name__}: {exc}"
                print(f"{v}: FAILED at batch {batch} ({type(exc).__name__}: {exc})", flush=True)
                del variants[v]
        with torch.inference_mode():
            timed = median_ms({v: (lambda m=m, xv=inputs[v]: m(xv)) for v, m in variants.items()}, args.reps)
        base = timed[first][0]
        for variant, (ms, n) in timed.items():
            rec = {"name": "e2e", "model": name, "batch": batch, "variant": variant, "median_ms": round(ms, 3),
                   "runs": n, "images_per_s": round(batch / ms * 1e3, 2), "baseline": first,
                   "speedup": round(base / ms, 3), **env}
            records.append(rec)
            print(f"| {batch} | {variant} | {ms:.1f} | {rec['images_per_s']:.1f} | {base / ms:.2f}x |", flush=True)
    if name == "vit_base_patch16_224" and device.type == "cuda":
        at64 = {r["variant"]: r for r in records if r.get("model") == name and r.get("batch") == 64}
        label = f"fastquant W8A8 {info['default_backend']}"
        if label in at64:
            records.append({"name": "target:gpu_e2e_w8a8", "model": name, "batch": 64, "variant": label,
                            "speedup": at64[label]["speedup"], "baseline": "fp16 eager (SDPA)",
                            **{f"speedup_{b}": at64[f"fastquant W8A8 {b}"]["speedup"]
                               for b in ("cuda", "triton") if f"fastquant W8A8 {b}" in at64}, **env})
    if name == "dinov2-s14-fmnist" and device.type == "cpu":
        at8 = {r["variant"]: r for r in records if r.get("model") == name and r.get("batch") == 8}
        if "fastquant W8A8" in at8:
            target = {"name": "target:cpu_e2e_w8a8", "model": name, "batch": 8,
                      "speedup": at8["fastquant W8A8"]["speedup"], "baseline": "fp32 eager", **env}
            if "top1" in info:
                target["accuracy_drop"] = round(info["top1"]["fake W8A8"] - info["top1"]["fastquant W8A8"], 2)
            records.append(target)


def bench_kernels(args, device, env, save=lambda records: None) -> list[dict]:
    """The kernel benchmarks, key figures first (W8A8 GEMM, attention, reconstruction step,
    then per-token quantization); one that fails is recorded with its error
    (``kernel_error``) and the others still run. ``save(records)`` is called after each."""
    if device.type != "cuda" and not args.smoke:
        reason = "no CUDA device"
        print(f"\n## kernels: skipped ({reason})")
        return [{"name": "kernels", "skipped": reason, **env}]
    records = []
    for bench in (bench_gemm, bench_attention, bench_recon_step, bench_quantize):
        try:
            records += bench(args, device, env)
        except Exception as exc:  # noqa: BLE001 - one kernel's failure must not lose the others' numbers
            print(f"\n## {bench.__name__}: FAILED ({type(exc).__name__}: {exc})", flush=True)
            traceback.print_exc()
            records.append({"name": "kernel_error", "bench": bench.__name__, "error": f"{type(exc).__name__}: {exc}",
                            **env})
        save(records)
    return records


def bench_quantize(args, device, env) -> list[dict]:
    """Per-token symmetric int8 quantization: the op (CUDA extension, else Triton) against
    its PyTorch reference."""
    from fastquant.ops import quantize_per_token_int8, torch_quantize_per_token_int8

    records = []
    print("\n| kernel | shape | reference ms | fastquant ms | speed-up |\n|---|---|---|---|---|")
    for rows, cols in args.shapes["quantize"]:
        x = torch.randn(rows, cols, device=device, dtype=torch.float16)
        timed = median_ms({"ref": lambda: torch_quantize_per_token_int8(x), "fast": lambda: quantize_per_token_int8(x)},
                          args.reps)
        ref, fast = timed["ref"][0], timed["fast"][0]
        records.append({"name": "kernel:quantize_per_token_int8", "shape": [rows, cols], "reference_ms": ref,
                        "fastquant_ms": fast, "speedup": ref / fast, **env})
        print(f"| quantize_per_token_int8 | {rows}x{cols} | {ref:.3f} | {fast:.3f} | {ref / fast:.2f}x |", flush=True)
    return records


def _has_cuda_backend() -> bool:
    """Whether the cuda backend (the CUDA C++ kernels) is registered (else the reason is printed)."""
    from fastquant import backends

    if not backends.CUDA_EXT_AVAILABLE:
        print(f"CUDA C++ kernels: not measured ({backends.CUDA_EXT_REASON})")
    return backends.CUDA_EXT_AVAILABLE


def bench_gemm(args, device, env) -> list[dict]:
    """The W8A8 linear layer (Triton quantize + int8 GEMM with its epilogue) against fp16
    torch.matmul (cuBLAS) and the PyTorch reference path, at ViT-S/B layer shapes; and the
    GEMM with packed 4-bit weights (W4A8)."""
    from fastquant.ops.int8_linear import INT8_GEMM, QUANTIZE_ASYM, pack_weight_int4, torch_quantize_asym

    def triton_quantize_asym(x, bits):
        return QUANTIZE_ASYM(x, bits, backend="triton")

    def triton_int8_gemm(*a):
        return INT8_GEMM(*a, backend="triton")

    cuda = _has_cuda_backend()
    records = []
    print("\n| W8A8 linear | M x K x N | fp16 matmul ms | reference ms | GEMM ms (TFLOP/s) | quantize+GEMM ms "
          "| W4A8 GEMM ms | GEMM vs fp16 |\n|---|---|---|---|---|---|---|---|")
    for m, k, n in args.shapes["gemm"]:
        gen = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(m, k, device=device, dtype=torch.float16, generator=gen)
        w16 = torch.randn(k, n, device=device, dtype=torch.float16, generator=gen)
        b = torch.randint(-128, 128, (k, n), device=device, dtype=torch.int8, generator=gen)
        s_w = torch.rand(n, device=device) * 0.01
        c_w = torch.zeros(n, device=device)
        b_sum = b.float().sum(0)
        bias = torch.randn(n, device=device)
        a, rowsum, s_x, c_x = triton_quantize_asym(x, 8)
        b4 = pack_weight_int4(torch.randint(-8, 8, (k, n), device=device, dtype=torch.int8, generator=gen))

        def reference():  # the PyTorch path: quantize, int8 GEMM (torch._int_mm), float epilogue
            a_r, rs, sx, cx = torch_quantize_asym(x, 8)
            acc = torch._int_mm(a_r, b).float() + rs.float()[:, None] * c_w
            return ((acc + cx[:, None] * b_sum) * (sx[:, None] * s_w) + bias).half()

        def linear():  # the deployed layer: per-token quantize, then the GEMM
            a_t, rs, sx, cx = triton_quantize_asym(x, 8)
            return triton_int8_gemm(a_t, b, rs, sx, cx, s_w, c_w, b_sum, bias, torch.float16)

        fns = {
            "fp16": lambda: x @ w16,
            "reference": reference,
            "gemm": lambda: triton_int8_gemm(a, b, rowsum, s_x, c_x, s_w, c_w, b_sum, bias, torch.float16),
            "linear": linear,
            "gemm_w4": lambda: triton_int8_gemm(a, b4, rowsum, s_x, c_x, s_w, c_w, b_sum, bias, torch.float16),
        }
        if cuda:  # the CUDA C++ kernels on the same operands
            fns["cuda_gemm"] = lambda: INT8_GEMM(a, b, rowsum, s_x, c_x, s_w, c_w, b_sum, bias, torch.float16,
                                                 backend="cuda")
            fns["cuda_gemm_w4"] = lambda: INT8_GEMM(a, b4, rowsum, s_x, c_x, s_w, c_w, b_sum, bias, torch.float16,
                                                    backend="cuda")
            fns["cuda_quantize"] = lambda: QUANTIZE_ASYM(x, 8, backend="cuda")
            fns["triton_quantize"] = lambda: triton_quantize_asym(x, 8)
        timed = median_ms(fns, args.reps)
        ms = {key: v[0] for key, v in timed.items()}
        tflops = 2 * m * k * n / (ms["gemm"] * 1e-3) / 1e12
        rec = {"name": "kernel:w8a8_linear", "shape": [m, k, n], **{f"{key}_ms": round(v, 4) for key, v in ms.items()},
               "gemm_tflops": round(tflops, 1), "speedup_gemm_vs_fp16": round(ms["fp16"] / ms["gemm"], 3),
               "speedup_linear_vs_reference": round(ms["reference"] / ms["linear"], 3), **env}
        records.append(rec)
        print(f"| | {m}x{k}x{n} | {ms['fp16']:.3f} | {ms['reference']:.3f} | {ms['gemm']:.3f} ({tflops:.0f}) | "
              f"{ms['linear']:.3f} | {ms['gemm_w4']:.3f} | {ms['fp16'] / ms['gemm']:.2f}x |", flush=True)
        if cuda:
            print(f"|   CUDA C++ | {m}x{k}x{n} | GEMM {ms['cuda_gemm']:.3f} ms ({ms['gemm'] / ms['cuda_gemm']:.2f}x the "
                  f"Triton one), W4A8 {ms['cuda_gemm_w4']:.3f} ms, quantize {ms['cuda_quantize']:.3f} ms (Triton "
                  f"{ms['triton_quantize']:.3f}) | | | | | |", flush=True)
            rec["cuda_vs_triton_gemm"] = round(ms["gemm"] / ms["cuda_gemm"], 3)
        if (m, k, n) == (64 * 197, 768, 3072):
            records.append({"name": "target:w8a8_gemm", "shape": [m, k, n], "speedup": rec["speedup_gemm_vs_fp16"],
                            "baseline": "fp16 torch.matmul (cuBLAS)", "fastquant_ms": ms["gemm"],
                            "baseline_ms": ms["fp16"], **env})
    return records


def bench_attention(args, device, env) -> list[dict]:
    """The fused quantized attention (Triton: Q, K, V quantized in the kernel, int8 Q K^T,
    log-quantized softmax, P V) against fp16 scaled_dot_product_attention, at ViT-B and
    ViT-S attention shapes (batch 64, 197 tokens, head dim 64). Both read q, k, v as the
    model has them (views of one qkv tensor); the fused kernel also writes the output in
    the [B, N, H, D] layout the projection reads, which SDPA's caller gets from a
    transpose-and-copy (timed separately). A6 codes with the log-sqrt2 softmax quantizer
    (6 bits), fastquant's default at 6-bit activations."""
    import torch.nn.functional as F

    from fastquant.ops.attention import QUANT_ATTENTION
    from fastquant.quant import range_to_qparams

    cuda = _has_cuda_backend()
    records = []
    a_bits, p_steps, p_bits = 6, 2, 6
    print("\n| attention | B x H x N x D | SDPA fp16 ms | SDPA + transpose ms | fastquant ms | vs SDPA |"
          "\n|---|---|---|---|---|---|")
    for batch, heads, n, d in args.shapes["attention"]:
        gen = torch.Generator(device=device).manual_seed(0)
        qkv = torch.randn(batch, n, 3, heads, d, device=device, dtype=torch.float16, generator=gen)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        qmax = (1 << a_bits) - 1
        per_head = [range_to_qparams(x.float().transpose(0, 1).reshape(heads, -1).amin(1),
                                     x.float().transpose(0, 1).reshape(heads, -1).amax(1), qmax) for x in (q, k)]
        s_v, z_v = range_to_qparams(v.float().amin(), v.float().amax(), qmax)
        qparams = (*per_head[0], *per_head[1], s_v, z_v)
        p_scale = torch.ones((), device=device)
        sm_scale = d ** -0.5

        op_args = (q, k, v, *qparams[:4], float(qparams[4]), float(qparams[5]), a_bits, sm_scale, float(p_scale),
                   p_steps, p_bits)

        def fused():
            return QUANT_ATTENTION(*op_args, backend="triton")

        fns = {
            "sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
            "sdpa_transpose": lambda: F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(
                batch, n, heads * d),
            "fastquant": fused,
        }
        if cuda:  # the CUDA C++ kernel with the same quantizers
            fns["cuda"] = lambda: QUANT_ATTENTION(*op_args, backend="cuda")
        timed = median_ms(fns, args.reps)
        ms = {key: val[0] for key, val in timed.items()}
        shape = [batch, heads, n, d]
        rec = {"name": "kernel:quant_attention", "shape": shape, "a_bits": a_bits, "p_steps": p_steps,
               "p_bits": p_bits, **{f"{key}_ms": round(val, 4) for key, val in ms.items()},
               "speedup_vs_sdpa": round(ms["sdpa"] / ms["fastquant"], 3),
               "speedup_vs_sdpa_transpose": round(ms["sdpa_transpose"] / ms["fastquant"], 3), **env}
        records.append(rec)
        print(f"| | {batch}x{heads}x{n}x{d} | {ms['sdpa']:.3f} | {ms['sdpa_transpose']:.3f} | "
              f"{ms['fastquant']:.3f} | {ms['sdpa'] / ms['fastquant']:.2f}x |", flush=True)
        if cuda:
            rec["cuda_ms"] = round(ms["cuda"], 4)
            rec["cuda_vs_triton"] = round(ms["fastquant"] / ms["cuda"], 3)
            print(f"|   CUDA C++ | {batch}x{heads}x{n}x{d} | | | {ms['cuda']:.3f} | {ms['sdpa'] / ms['cuda']:.2f}x |",
                  flush=True)
        if heads == 12:
            records.append({"name": "target:attention", "shape": shape, "speedup": rec["speedup_vs_sdpa"],
                            "baseline": "torch sdpa fp16", "fastquant_ms": ms["fastquant"],
                            "baseline_ms": ms["sdpa"], **env})
    return records


def _recon_step_setup(model_name: str, batch: int, device: torch.device, seed: int = 0, img: int = 224):
    """A reconstruction unit as fastquant.recon.engine trains it, self-contained: block 1 of a
    randomly initialised timm ``model_name`` quantized W4A4 (rtn, random calibration images),
    its float input tokens (block 0 of the float model on ``batch`` random images) and its
    float output (the target). Returns ``make(variant, reg) -> (step, params)``: a fresh copy
    of the quantized block with reconstruction's wrappers (LearnableState: AdaRound soft
    rounding, LSQ steps, QDrop p = 0.5 drawn from a generator seeded with ``seed``), Adam at
    the engine's learning rates, and ``step()``: forward, the MSE to the target (plus, with
    ``reg``, the AdaRound regulariser at its first beta, as after the engine's warm-up),
    backward, Adam step, returning the MSE. Variants: ``fused`` (grid path, fused op), ``bf16_grid``
    (grid path in bf16, fused op off: the CUDA default before the fused op), ``reference``
    (plain fake-quant layers in fp32: ``matmul_dtype="float32"``)."""
    import fastquant
    from fastquant import settings
    from fastquant._compat import import_timm
    from fastquant.adapters import embed
    from fastquant.nn import QuantLinear
    from fastquant.recon import LearnableState
    from fastquant.recon.config import LR_ROUND, ReconConfig

    timm = import_timm()
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = timm.create_model(model_name, pretrained=False, img_size=img).to(device).eval()
    gen = torch.Generator().manual_seed(seed)
    calib = torch.randn(8, 3, img, img, generator=gen).to(device)
    q = fastquant.quantize(model, calib, fastquant.QuantConfig(w_bits=4, a_bits=4, method="rtn"), progress=False)
    for p in list(model.parameters()) + list(q.parameters()):
        p.requires_grad_(False)
    with torch.no_grad():
        tokens = model.blocks[0](embed(model, torch.randn(batch, 3, img, img, generator=gen).to(device)))
        target = model.blocks[1](tokens)
    cfg = ReconConfig(method="qdrop")

    def make(variant: str, reg: bool = True):
        block = copy.deepcopy(q.blocks[1])
        state = LearnableState([block])
        weights, acts = state.of([block])
        alphas = [w.alpha for _, w in weights]
        scales = [a.scale for a in acts if a.scale is not None]
        for p in alphas + scales:
            p.requires_grad_(True)
        drop_gen = torch.Generator(device=device).manual_seed(seed)
        state.start_training(weights, acts, drop_gen)
        state.enter_stage(weights, acts, False, False, cfg.resolved("qdrop_p"))
        dtype = {"fused": torch.bfloat16, "bf16_grid": torch.bfloat16, "reference": None}[variant]
        for m in block.modules():
            if isinstance(m, QuantLinear):
                m.set_grid_dtype(dtype)
        opt = torch.optim.Adam([{"params": alphas, "lr": LR_ROUND * 10}, {"params": scales, "lr": cfg.resolved("lr_act")}])

        def step() -> torch.Tensor:
            with settings.overridden(fused_recon=variant == "fused"):
                fit = torch.nn.functional.mse_loss(block(tokens), target)
                loss = fit + cfg.round_weight * sum(w.regularizer(cfg.beta[0]) for _, w in weights) if reg else fit
                opt.zero_grad(set_to_none=True)
                loss.backward()
            opt.step()
            return fit.detach()

        return step, alphas + scales

    return make


def bench_recon_step(args, device, env) -> list[dict]:
    """One reconstruction training step (forward, backward, Adam) of a ViT-B block at batch 32
    (197 tokens), W4A4 with AdaRound, LSQ and QDrop p = 0.5: the fused fake-quant linear and
    attention ops (Triton; fp16 grids for the linear layers; one switch,
    ``fastquant.settings.fused_recon()``) against the reference fake-quant path in fp32 and the bf16 grid
    product, each on its own copy of the same block with the same seed; and the loss over a
    few steps of each without the regulariser (they should agree to fp16 operand rounding).
    The timed steps include the regulariser, as the engine's steps after its warm-up do."""
    if device.type != "cuda" and not args.smoke:
        reason = "no CUDA device"
        print(f"\n## recon step: skipped ({reason})")
        return [{"name": "recon_step", "skipped": reason, **env}]
    from fastquant import backends

    if not backends.TRITON_AVAILABLE:
        print(f"\n## recon step: skipped ({backends.TRITON_REASON})")
        return [{"name": "recon_step", "skipped": backends.TRITON_REASON, **env}]
    model_name, img, batch, n_steps = args.shapes["recon_step"]
    make = _recon_step_setup(model_name, batch, device, img=img)
    losses = {}
    for variant in ("fused", "reference"):  # fresh copies, same seed: the MSE trajectories
        step, _ = make(variant, reg=False)  # (the warm-up's steps: the regulariser would dominate)
        losses[variant] = [float(step()) for _ in range(n_steps)]
    steps = {variant: make(variant)[0] for variant in ("fused", "reference", "bf16_grid")}
    timed = median_ms(steps, args.reps)
    ms = {k: v[0] for k, v in timed.items()}
    rel = [abs(a - b) / abs(b) for a, b in zip(losses["fused"], losses["reference"])]
    speedup = ms["reference"] / ms["fused"]
    tokens = (img // 16) ** 2 + 1
    rec = {"name": "recon_step", "model": model_name, "block": 1, "batch": batch, "tokens": tokens, "w_bits": 4,
           "a_bits": 4, "qdrop_p": 0.5, **{f"{k}_ms": round(v, 3) for k, v in ms.items()},
           "speedup_vs_reference": round(speedup, 3), "speedup_vs_bf16_grid": round(ms["bf16_grid"] / ms["fused"], 3),
           "tf32": torch.backends.cuda.matmul.allow_tf32, "loss_fused": losses["fused"],
           "loss_reference": losses["reference"], "loss_max_rel_diff": max(rel), **env}
    print("\n## recon step: one block's training step (forward, backward, Adam)\n\n"
          "| model | batch | reference fp32 ms | bf16 grid ms | fused ms | vs fp32 | vs bf16 grid | loss max rel diff |"
          "\n|---|---|---|---|---|---|---|---|")
    print(f"| {model_name} block 1 W4A4 | {batch}x{tokens} | {ms['reference']:.2f} | {ms['bf16_grid']:.2f} | "
          f"{ms['fused']:.2f} | {speedup:.2f}x | {rec['speedup_vs_bf16_grid']:.2f}x | {max(rel):.2e} |", flush=True)
    print("losses (fused / reference): " + ", ".join(f"{a:.5g}/{b:.5g}" for a, b in
                                                        zip(losses["fused"], losses["reference"])))
    return [rec, {"name": "target:recon_step", "model": model_name, "batch": batch, "speedup": round(speedup, 3),
                  "baseline": "reference fake-quant path (fp32)", "fastquant_ms": ms["fused"],
                  "baseline_ms": ms["reference"], "loss_max_rel_diff": max(rel), **env}]


def bench_load(args, device, env) -> list[dict]:
    """Loading a saved model (``fastquant.load``, dinov2-s14-fmnist W4A8 round-to-nearest):
    the whole load, side by side with its parts: the integrity checks (the checksum of every
    tensor and of the metadata, the value checks) and building the architecture with its
    tensors left uninitialised (what the load does) or randomly initialised."""
    import tempfile

    import fastquant
    from fastquant import serialize
    from fastquant.models import build_model, load_model
    from safetensors.torch import load_file

    records = []
    print("\n| model | file MB | load ms | integrity checks ms | build, uninitialised ms | build, random init ms |"
          "\n|---|---|---|---|---|---|")
    name = "dinov2-s14-fmnist"
    model, _, spec = load_model(name)
    calib = torch.rand(8, 3, spec.img_size, spec.img_size)
    q = fastquant.quantize(model, calib, fastquant.QuantConfig(method="rtn", w_bits=4, a_bits=8), progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "q.safetensors"
        fastquant.save(q, path)
        meta, sd = serialize.read_metadata(path), load_file(str(path))

        def checks():
            serialize._verify(path, serialize._saved_checksums(path, meta), sd)

        timed = median_ms({"load": lambda: fastquant.load(path), "checks": checks,
                           "empty": lambda: build_model(spec, weights=False, empty=True),
                           "init": lambda: build_model(spec, weights=False)}, args.reps)
        mb = path.stat().st_size / 2**20
    ms = {k: v[0] for k, v in timed.items()}
    records.append({"name": "load", "model": name, "w_bits": 4, "a_bits": 8, "file_mib": round(mb, 2),
                    "load_ms": ms["load"], "checks_ms": ms["checks"], "build_empty_ms": ms["empty"],
                    "build_random_init_ms": ms["init"], "runs": timed["load"][1],
                    "threads": torch.get_num_threads(), **env})
    print(f"| {name} W4A8 | {mb:.2f} | {ms['load']:.1f} | {ms['checks']:.1f} | {ms['empty']:.1f} | "
          f"{ms['init']:.1f} |", flush=True)
    return records


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", type=Path, help="where to save the records (default bench/results/run_<device>.json)")
    p.add_argument("--sections", default="e2e,kernels",
                   help="comma-separated: e2e, kernels, recon (in kernels), load (fastquant.load's time)")
    p.add_argument("--models", default="dinov2-s14-fmnist,vit_base_patch16_224")
    p.add_argument("--batches", default="1,8,64")
    p.add_argument("--reps", type=int, default=10, help="timed runs per measurement")
    p.add_argument("--eval-size", type=int, default=2000, help="test images for the accuracy check (0: none)")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--no-peers", dest="peers", action="store_false",
                   help="on the CPU, leave out the other runtimes (bench/peers.py: fastquant's ONNX export in ONNX "
                        "Runtime and OpenVINO, their own int8 quantization); each is skipped when its package "
                        "is missing (pip install -e .[peers])")
    p.add_argument("--pin", help="pin the process to these CPUs, e.g. 0 or 0,1 (Linux)")
    p.add_argument("--smoke", action="store_true",
                   help="the kernel sections on tiny shapes, on the CPU through Triton's interpreter (set "
                        "TRITON_INTERPRET=1): runs every line of the GPU benchmarks, measures nothing")
    args = p.parse_args(argv)
    args.shapes = SMOKE_SHAPES if args.smoke else SHAPES
    sections = args.sections.split(",")
    unknown = set(sections) - {"e2e", "kernels", "recon", "load"}
    if unknown:
        p.error(f"unknown section(s): {', '.join(sorted(unknown))} (choose from e2e, kernels, recon, load)")
    if args.pin:
        try:
            os.sched_setaffinity(0, {int(c) for c in args.pin.split(",")})
        except (AttributeError, ValueError, OSError) as exc:
            p.error(f"--pin {args.pin}: {exc}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = {"device": device_name(device), "commit": commit(), **versions(), "threads": torch.get_num_threads(),
           "pinned": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None}
    print(f"device: {env['device']}; torch {env['torch']}, timm {env['timm']}, triton {env['triton']}; "
          f"commit {env['commit']}")
    out = args.json or ROOT / "bench" / "results" / f"run_{'cuda' if device.type == 'cuda' else 'cpu'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    done: list[dict] = []  # the records of finished sections

    def save(current: list[dict]):
        """Write every record so far (finished sections and the one running): a run cut
        short (a deadline, a crash) keeps what it measured."""
        tmp = out.with_name(f".{out.name}.{os.getpid()}.partial")
        tmp.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), **env, "records": done + current}, indent=2)
                       + "\n")
        os.replace(tmp, out)

    if "e2e" in sections:
        done += bench_e2e(args, device, env, save)
        save([])
    if "kernels" in sections:
        done += bench_kernels(args, device, env, save)
    elif "recon" in sections:  # the kernels section includes it
        done += bench_recon_step(args, device, env)
    if "load" in sections:
        done += bench_load(args, device, env)
    save([])
    print(f"\nsaved {out}")


if __name__ == "__main__":
    sys.exit(main())
