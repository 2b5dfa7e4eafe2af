"""Which backends this process has, and why not: decided once, at import."""
from __future__ import annotations

import importlib

from ..kernels import TRITON_AVAILABLE, TRITON_REASON


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

AVAILABLE = {"torch": True, "cpu": CPU_EXT_AVAILABLE, "triton": TRITON_AVAILABLE, "cuda": CUDA_EXT_AVAILABLE}
REASONS = {"torch": "", "cpu": CPU_EXT_REASON, "triton": TRITON_REASON, "cuda": CUDA_EXT_REASON}
