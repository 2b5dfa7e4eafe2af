"""Compile every Triton kernel in fastquant.kernels for NVIDIA GPUs, without a GPU.

    python -m fastquant.kernels.compile_check            # sm_80 and sm_90
    python -m fastquant.kernels.compile_check --arch 90

Triton lowers a kernel to PTX and runs its bundled ptxas for a ``GPUTarget`` given by
hand, so a CPU-only machine catches what would otherwise only fail on an A100 or H100:
type errors, unsupported ops, layouts that do not lower, register or shared-memory
overflows at ptxas time. Every module of this package that defines ``COMPILE_SPECS``
is checked, and a ``@triton.jit`` function named ``*_kernel`` with no spec is a
failure. Exit status: 0 when everything compiled, 1 otherwise.
"""
from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass

DEFAULT_ARCHS = (80, 90)


@dataclass(frozen=True)
class CheckResult:
    module: str
    name: str
    arch: int
    ok: bool
    seconds: float
    detail: str = ""


def kernel_modules() -> list[str]:
    """Names of the modules in this package that hold kernels (all but this one)."""
    from fastquant import kernels

    return sorted(
        f"{kernels.__name__}.{info.name}"
        for info in pkgutil.iter_modules(kernels.__path__)
        if not info.ispkg and not info.name.startswith("_") and info.name != "compile_check"
    )


def _compile(spec, arch: int) -> None:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(spec.kernel, spec.signature, spec.constexprs)
    triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(spec.options))


def check(archs=DEFAULT_ARCHS) -> list[CheckResult]:
    """Compile every spec of every kernel module for every arch; never raises on a failure."""
    import triton

    results = []
    for module_name in kernel_modules():
        short = module_name.rsplit(".", 1)[-1]
        try:
            module = importlib.import_module(module_name)
        except Exception:  # a module that does not import fails the check, the rest go on
            results.append(CheckResult(short, "(import)", 0, False, 0.0, traceback.format_exc()))
            continue
        specs = list(getattr(module, "COMPILE_SPECS", []))

        covered = {spec.kernel.__name__ for spec in specs}
        for attr, obj in vars(module).items():
            if (attr.endswith("_kernel") and attr not in covered
                    and isinstance(obj, triton.runtime.KernelInterface)
                    and getattr(obj, "__module__", module_name) == module_name):
                results.append(CheckResult(short, attr, 0, False, 0.0,
                                           "no COMPILE_SPECS entry for this kernel"))

        for spec in specs:
            if not isinstance(spec.kernel, triton.runtime.JITFunction):
                results.append(CheckResult(
                    short, spec.name, 0, False, 0.0,
                    "not a JIT function (was TRITON_INTERPRET set when it was imported?)"))
                continue
            for arch in archs:
                start = time.perf_counter()
                try:
                    _compile(spec, arch)
                except Exception as exc:  # report every kind of compiler failure, then go on
                    detail = "".join(traceback.format_exception_only(exc))
                    results.append(CheckResult(short, spec.name, arch, False,
                                               time.perf_counter() - start, detail))
                else:
                    results.append(CheckResult(short, spec.name, arch, True,
                                               time.perf_counter() - start))
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastquant.kernels.compile_check",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, action="append",
                        help="compute capability times ten, e.g. 80 or 90 (repeatable; "
                             "default: 80 and 90)")
    parser.add_argument("--use-cache", action="store_true",
                        help="reuse Triton's cache (default: compile from scratch in a "
                             "temporary cache, so every kernel really goes through ptxas)")
    args = parser.parse_args(argv)
    archs = tuple(args.arch or DEFAULT_ARCHS)

    from fastquant.kernels import TRITON_AVAILABLE, TRITON_REASON

    if not TRITON_AVAILABLE:
        print(f"compile_check: {TRITON_REASON}", file=sys.stderr)
        return 1
    # The interpreter replaces @triton.jit functions with objects that cannot be compiled.
    # Kernel modules imported from here on see the variable gone.
    os.environ.pop("TRITON_INTERPRET", None)

    import triton

    print(f"triton {triton.__version__}: compiling for "
          + ", ".join(f"sm_{a}" for a in archs))
    if args.use_cache:
        results = check(archs)
    else:
        with tempfile.TemporaryDirectory(prefix="fastquant-triton-cache-") as cache_dir:
            os.environ["TRITON_CACHE_DIR"] = cache_dir
            results = check(archs)
    for r in results:
        where = f"sm_{r.arch}" if r.arch else "-"
        print(f"{'ok  ' if r.ok else 'FAIL'}  {r.module}.{r.name}  {where}  {r.seconds:.2f} s")
        if not r.ok:
            print("      " + r.detail.strip().replace("\n", "\n      "))
    failed = sum(not r.ok for r in results)
    if not results:
        print("no kernels found")
        return 1
    print(f"{len(results) - failed} compiled, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
