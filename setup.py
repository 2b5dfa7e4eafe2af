"""Build script: the Python packages, the CPU extension ``fastquant._C_cpu`` and the
optional CUDA extension ``fastquant._C``.

Metadata lives in pyproject.toml. Install with ``pip install -e . --no-build-isolation``
(or ``pip wheel . --no-build-isolation``) so that the torch already installed decides
the build; build isolation would fetch a different torch.

The top-level folder ``kernels/`` (Triton kernels) is installed as ``fastquant.kernels``.

The CPU extension (``csrc/cpu_int8.cpp``: the fused kernels of deployed int8 linear
layers) is built with the C++ compiler against the installed torch; it is optional: if it
fails to build, the install goes on and fastquant uses its PyTorch path
(``fastquant.backends.CPU_EXT_REASON`` says why). ``FASTQUANT_CPU_EXT=0`` skips it.

The CUDA extension is built from ``csrc/*.cu`` and ``csrc/bindings.cpp`` when torch is a
CUDA build and a CUDA toolkit is found; whether this machine has a GPU does not matter.
``FASTQUANT_CUDA=1`` makes a missing prerequisite an error, ``FASTQUANT_CUDA=0`` skips the
extension. Otherwise a skipped extension is reported on one line (shown by ``pip -v``).
"""
import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))

# Ampere (A100) and Hopper (H100/H200; sm_90a allows wgmma and TMA). No --use_fast_math:
# the quantize kernels must round exactly like PyTorch.
NVCC_FLAGS = [
    "-O3",
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90a,code=sm_90a",
]
CXX_FLAGS = ["-O3"]
# The CPU kernels must round like PyTorch: no fused multiply-add contraction, no fast math.
# OpenMP runs at::parallel_for on torch's threads (the loader reuses torch's libgomp).
CPU_CXX_FLAGS = ["-O3", "-ffp-contract=off", "-fopenmp"]


def _cuda_build_blocker():
    """Why the CUDA extension cannot be built here, or None when it can."""
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
    except ImportError as exc:
        return (f"torch is not importable at build time ({exc}); install torch first and "
                "build with --no-build-isolation")
    if torch.version.cuda is None:
        return f"torch {torch.__version__} has no CUDA"
    if CUDA_HOME is None:
        return f"no CUDA toolkit found for torch {torch.__version__} (set CUDA_HOME)"
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc")
    if not os.path.exists(nvcc):
        return f"no nvcc at {nvcc} (CUDA_HOME={CUDA_HOME})"
    return None


def _env_mode(var: str, what: str) -> str:
    """'' (default), '0' (skip, said on one line) or '1' (required) from the variable ``var``."""
    mode = os.environ.get(var, "").strip()
    if mode not in ("", "0", "1"):
        sys.exit(f"fastquant: {var} must be 0 or 1, got {mode!r}")
    if mode == "0":
        print(f"fastquant: skipping {what}: {var}=0", file=sys.stderr)
    return mode


def cuda_extensions():
    """``(ext_modules, cmdclass)`` for the CUDA extension, or empty ones with a reason."""
    mode = _env_mode("FASTQUANT_CUDA", "CUDA extension")
    if mode == "0":
        return [], {}
    blocker = _cuda_build_blocker()
    if blocker is not None:
        if mode == "1":
            sys.exit("fastquant: FASTQUANT_CUDA=1 but the CUDA extension cannot be built: "
                     + blocker)
        print(f"fastquant: skipping CUDA extension: {blocker}", file=sys.stderr)
        return [], {}

    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    # setuptools wants source paths relative to setup.py.
    cu_files = glob.glob(os.path.join(ROOT, "csrc", "*.cu"))
    sources = sorted(os.path.relpath(p, ROOT) for p in cu_files)
    sources.append(os.path.join("csrc", "bindings.cpp"))
    ext = CUDAExtension(
        name="fastquant._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS},
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


def cpu_extensions():
    """The CPU extension (optional: a failed build leaves the PyTorch path), or none."""
    mode = _env_mode("FASTQUANT_CPU_EXT", "CPU extension")
    if mode == "0":
        return []
    try:
        from torch.utils.cpp_extension import CppExtension
    except ImportError as exc:
        print(f"fastquant: skipping CPU extension: torch is not importable at build time ({exc})",
              file=sys.stderr)
        return []
    return [CppExtension(
        name="fastquant._C_cpu",
        sources=[os.path.join("csrc", "cpu_int8.cpp")],
        extra_compile_args={"cxx": CPU_CXX_FLAGS},
        extra_link_args=["-fopenmp"],
        optional=mode != "1",
    )]


ext_modules, cmdclass = cuda_extensions()
ext_modules = cpu_extensions() + ext_modules
if ext_modules and "build_ext" not in cmdclass:
    from torch.utils.cpp_extension import BuildExtension

    cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=True)}

# fastquant and its subpackages, plus kernels/ (and any subpackages) as fastquant.kernels.
packages = find_packages(where=ROOT, include=["fastquant", "fastquant.*"])
packages += ["fastquant.kernels"]
packages += [f"fastquant.kernels.{p}" for p in find_packages(where=os.path.join(ROOT, "kernels"))]

setup(
    packages=packages,
    package_dir={"fastquant.kernels": "kernels"},
    package_data={"fastquant": ["assets/*.safetensors", "assets/*.json"]},
    # Only the files named in package_data, not everything a manifest lists.
    include_package_data=False,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
