"""Compile-check every csrc/*.cu with nvcc for A100 (sm_80) and H100 (sm_90a); no GPU needed.

    python csrc/compile_check.py            # every .cu file, both architectures
    python csrc/compile_check.py quant_int8.cu

The .cu files include no torch header, so each compiles in a few seconds with plain nvcc
and errors such as Hopper-only instructions in an sm_80 build are caught on a CPU-only
machine. Objects go to a temporary directory. nvcc is taken from $NVCC, then
$CUDA_HOME/bin, then PATH. Prints one line per file and architecture; exit status 1 if
anything failed, 2 if nvcc is missing.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CSRC = Path(__file__).resolve().parent

# Keep in step with NVCC_FLAGS in setup.py.
ARCHS = {
    "sm_80": "-gencode=arch=compute_80,code=sm_80",
    "sm_90a": "-gencode=arch=compute_90a,code=sm_90a",
}
# C++20 as torch.utils.cpp_extension passes it to nvcc for the real build.
FLAGS = ["-O3", "-std=c++20", "-c"]


def find_nvcc() -> str | None:
    if os.environ.get("NVCC"):
        return os.environ["NVCC"]
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and (Path(cuda_home) / "bin" / "nvcc").exists():
        return str(Path(cuda_home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", help="file names in csrc/ (default: every .cu)")
    parser.add_argument("--arch", action="append", choices=sorted(ARCHS),
                        help="repeatable; default: all of them")
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

    failures = 0
    with tempfile.TemporaryDirectory(prefix="fastquant-nvcc-") as tmp:
        for path in files:
            for arch in archs:
                out = Path(tmp) / f"{path.stem}.{arch}.o"
                cmd = [nvcc, *FLAGS, ARCHS[arch], f"-I{CSRC}", str(path), "-o", str(out)]
                start = time.perf_counter()
                proc = subprocess.run(cmd, capture_output=True, text=True)
                seconds = time.perf_counter() - start
                ok = proc.returncode == 0
                failures += not ok
                status = "ok  " if ok else "FAIL"
                print(f"{status}  {path.name}  {arch}  {seconds:.1f} s", flush=True)
                if not ok:
                    print("      " + " ".join(cmd))
                messages = (proc.stderr + proc.stdout).strip()
                if messages:  # the errors, or the warnings of a build that passed
                    print("      " + messages.replace("\n", "\n      "))
    print(f"{len(files) * len(archs) - failures} compiled, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
