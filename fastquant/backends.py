"""Which kernel backends this process can use, and why not.

Decided once, at import:

- ``TRITON_AVAILABLE`` / ``TRITON_REASON``: Triton imports (it still needs a CUDA tensor,
  or ``TRITON_INTERPRET=1`` set before the kernels are imported, to run).
- ``CPU_EXT_AVAILABLE`` / ``CPU_EXT_REASON``: the compiled CPU extension
  ``fastquant._C_cpu`` (fused kernels of deployed int8 linear layers) imports. setup.py
  builds it with the C++ compiler whenever it can; without it, deployed layers run their
  PyTorch reference path.
- ``CUDA_EXT_AVAILABLE`` / ``CUDA_EXT_REASON``: the compiled extension ``fastquant._C``
  imports. setup.py builds it only against a CUDA build of torch with a CUDA toolkit.

A reason is the empty string when the backend is available. The ops in
``fastquant.ops`` use these flags to pick an implementation for CUDA tensors: the CUDA
extension, then Triton, then the PyTorch reference.
"""
from __future__ import annotations

import importlib
import os

import torch

from fastquant.kernels import TRITON_AVAILABLE, TRITON_REASON


def _probe(name: str, not_built: str) -> tuple[bool, str]:
    """(importable, reason if not) for a compiled extension module of fastquant."""
    try:
        importlib.import_module(name)
    except ImportError as exc:
        if isinstance(exc, ModuleNotFoundError) and exc.name == name:
            return False, f"{name} is not built ({not_built})"
        return False, f"{name} failed to load ({exc})"
    return True, ""


CPU_EXT_AVAILABLE, CPU_EXT_REASON = _probe(
    "fastquant._C_cpu", "reinstall fastquant with a C++ compiler; FASTQUANT_CPU_EXT=1 makes a failed build an error")
CUDA_EXT_AVAILABLE, CUDA_EXT_REASON = _probe(
    "fastquant._C", "it needs a CUDA build of torch and a CUDA toolkit at install time")

__all__ = ["TRITON_AVAILABLE", "TRITON_REASON", "CPU_EXT_AVAILABLE", "CPU_EXT_REASON", "CUDA_EXT_AVAILABLE",
           "CUDA_EXT_REASON",
           "triton_interpret", "describe"]


def triton_interpret() -> bool:
    """Whether TRITON_INTERPRET asks for Triton's CPU interpreter (Triton's own parsing)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on")


def describe() -> dict:
    """Versions and backend availability, for printing beside benchmark results."""
    triton_version = None
    if TRITON_AVAILABLE:
        import triton

        triton_version = triton.__version__
    cuda_device = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_device": cuda_device,
        "triton": triton_version,
        "triton_available": TRITON_AVAILABLE,
        "triton_reason": TRITON_REASON,
        "triton_interpret": triton_interpret(),
        "cpu_ext_available": CPU_EXT_AVAILABLE,
        "cpu_ext_reason": CPU_EXT_REASON,
        "cuda_ext_available": CUDA_EXT_AVAILABLE,
        "cuda_ext_reason": CUDA_EXT_REASON,
    }
