"""Compile-check every csrc/*.cu with nvcc for A100 (sm_80) and H100 (sm_90a), as C++17 and
C++20; no GPU needed.

    python csrc/compile_check.py            # every .cu file, both architectures
    python csrc/compile_check.py quant_int8.cu
    python csrc/compile_check.py --no-bindings    # skip the syntax check of bindings.cpp
    python csrc/compile_check.py --std c++17      # one language standard

The .cu files include no torch header, so each compiles in a few seconds with plain nvcc
and errors such as Hopper-only instructions in an sm_80 build are caught on a CPU-only
machine. Objects go to a temporary directory. nvcc is taken from $NVCC, then
$CUDA_HOME/bin, then PATH. Prints one line per file and architecture; exit status 1 if
anything failed, 2 if nvcc is missing. With no file named, bindings.cpp (the torch side)
is also syntax-checked with the host compiler (``check_bindings``), in the standard this
torch builds extensions with (its headers decide: torch 2.13's need C++20): the CUDA
extension itself can only be built against a CUDA build of torch.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CSRC = Path(__file__).resolve().parent

# Keep in step with NVCC_FLAGS in setup.py.
ARCHS = {
    "sm_80": "-gencode=arch=compute_80,code=sm_80",
    "sm_90a": "-gencode=arch=compute_90a,code=sm_90a",
}
# The language standard torch.utils.cpp_extension passes to nvcc for the real build:
# C++17 with torch up to 2.11 (the GPU machines' torch), C++20 from torch 2.13 on. The .cu
# files include no torch header, so each is compiled as both.
STDS = ("c++17", "c++20")
FLAGS = ["-O3", "-c"]


def find_nvcc() -> str | None:
    if os.environ.get("NVCC"):
        return os.environ["NVCC"]
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and (Path(cuda_home) / "bin" / "nvcc").exists():
        return str(Path(cuda_home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def torch_std() -> str:
    """The C++ standard this torch builds extensions with (torch.utils.cpp_extension's flag)."""
    import inspect

    from torch.utils import cpp_extension

    return "c++20" if "-std=c++20" in inspect.getsource(cpp_extension) else "c++17"


def check_bindings(nvcc: str) -> bool | None:
    """Syntax-check bindings.cpp (torch, pybind11 and the launcher headers) with the host
    C++ compiler against this torch's headers and the CUDA toolkit's runtime headers. A CPU
    build of torch lacks one generated header of c10/cuda (cuda_cmake_macros.h), which an
    empty stand-in replaces. Prints one line; True when it passed, None when it cannot run here."""
    try:
        import sysconfig

        from torch.utils.cpp_extension import include_paths
    except ImportError as exc:
        print(f"skip  bindings.cpp  (torch is not importable: {exc})")
        return None
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    homes = [Path(nvcc).resolve().parent.parent, Path(os.environ.get("CUDA_HOME") or "/usr/local/cuda")]
    found = [h / "include" for h in homes if (h / "include" / "cuda_runtime.h").exists()]
    if cxx is None or not found:
        print("skip  bindings.cpp  (no C++ compiler, or no cuda_runtime.h under "
              f"{' or '.join(str(h / 'include') for h in homes)})")
        return None
    cuda_include = found[0]
    with tempfile.TemporaryDirectory(prefix="fastquant-bindings-") as stub:
        macros = Path(stub) / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
        if not any((Path(p) / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists() for p in include_paths()):
            macros.parent.mkdir(parents=True)
            macros.write_text("#pragma once\n")
        cmd = [cxx, f"-std={torch_std()}", "-fsyntax-only", "-DTORCH_EXTENSION_NAME=_C", f"-I{CSRC}",
               *(f"-I{p}" for p in include_paths()), f"-I{stub}", f"-I{sysconfig.get_paths()['include']}",
               f"-I{cuda_include}", str(CSRC / "bindings.cpp")]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
    ok = proc.returncode == 0
    print(f"{'ok  ' if ok else 'FAIL'}  bindings.cpp  syntax  {torch_std()}  {time.perf_counter() - start:.1f} s",
          flush=True)
    if not ok:
        print("      " + " ".join(cmd))
        print("      " + (proc.stderr + proc.stdout).strip().replace("\n", "\n      "))
    return ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", help="file names in csrc/ (default: every .cu)")
    parser.add_argument("--arch", action="append", choices=sorted(ARCHS),
                        help="repeatable; default: all of them")
    parser.add_argument("--std", action="append", choices=STDS,
                        help="C++ standard for the .cu files (repeatable; default: all of them)")
    parser.add_argument("--no-bindings", action="store_true", help="skip the syntax check of bindings.cpp")
    args = parser.parse_args(argv)

    nvcc = find_nvcc()
    if nvcc is None:
        print("compile_check: nvcc not found (set NVCC or CUDA_HOME, or put it on PATH)",
              file=sys.stderr)
        return 2
    files = [CSRC / f for f in args.files] or sorted(CSRC.glob("*.cu"))
    if not files:
        print("compile_check: no .cu files in csrc/", file=sys.stderr)
        return 1
    archs = args.arch or list(ARCHS)
    stds = args.std or list(STDS)

    jobs = [(path, arch, std) for path in files for arch in archs for std in stds]
    failures = 0
    with tempfile.TemporaryDirectory(prefix="fastquant-nvcc-") as tmp:
        def compile_one(job):
            path, arch, std = job
            out = Path(tmp) / f"{path.stem}.{arch}.{std}.o"
            cmd = [nvcc, *FLAGS, f"-std={std}", ARCHS[arch], f"-I{CSRC}", str(path), "-o", str(out)]
            start = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            return cmd, proc, time.perf_counter() - start

        # nvcc runs single-threaded: one compile per core.
        with ThreadPoolExecutor(max_workers=max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
            for (path, arch, std), (cmd, proc, seconds) in zip(jobs, pool.map(compile_one, jobs)):
                ok = proc.returncode == 0
                failures += not ok
                print(f"{'ok  ' if ok else 'FAIL'}  {path.name}  {arch}  {std}  {seconds:.1f} s", flush=True)
                if not ok:
                    print("      " + " ".join(cmd))
                messages = (proc.stderr + proc.stdout).strip()
                if messages:  # the errors, or the warnings of a build that passed
                    print("      " + messages.replace("\n", "\n      "))
    total = len(jobs)
    if not args.files and not args.no_bindings:
        ok = check_bindings(nvcc)
        if ok is not None:
            total += 1
            failures += not ok
    print(f"{total - failures} compiled, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
