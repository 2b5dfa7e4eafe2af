"""Build script: the Python packages, plus the optional CUDA extension ``fastquant._C``.

Metadata lives in pyproject.toml. Install with ``pip install -e . --no-build-isolation``
(or ``pip wheel . --no-build-isolation``) so that the torch already installed decides
the build; build isolation would fetch a different torch.

The top-level folder ``kernels/`` (Triton kernels) is installed as ``fastquant.kernels``.

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


def cuda_extensions():
    """``(ext_modules, cmdclass)`` for the CUDA extension, or empty ones with a reason."""
    mode = os.environ.get("FASTQUANT_CUDA", "").strip()
    if mode not in ("", "0", "1"):
        sys.exit(f"fastquant: FASTQUANT_CUDA must be 0 or 1, got {mode!r}")
    if mode == "0":
        print("fastquant: skipping CUDA extension: FASTQUANT_CUDA=0", file=sys.stderr)
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


ext_modules, cmdclass = cuda_extensions()

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
