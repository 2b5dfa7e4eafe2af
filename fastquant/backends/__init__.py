"""Which backends this process has, and why not; the registration of their kernels on the ops.

The only part of fastquant that imports the Triton kernels (``fastquant.kernels``) and the
compiled extensions (``fastquant._C``, ``fastquant._C_cpu``). Decided once, at import:

- ``TRITON_AVAILABLE`` / ``TRITON_REASON``: Triton imports (it still needs a CUDA tensor,
  or ``TRITON_INTERPRET=1`` set before the kernels are imported, to run);
- ``CPU_EXT_AVAILABLE`` / ``CPU_EXT_REASON``: the CPU extension ``fastquant._C_cpu`` imports.
  setup.py builds it with the C++ compiler whenever it can;
- ``CUDA_EXT_AVAILABLE`` / ``CUDA_EXT_REASON``: the CUDA extension ``fastquant._C``
  imports. setup.py builds it only against a CUDA build of torch with a CUDA toolkit.

A reason is the empty string when the backend is available. Then each backend module
(``cpu_ext``, ``cuda_ext``, ``triton_kernels``) registers its implementations on the ops of
``fastquant.ops`` (or records why it cannot), so ``op(*args)`` finds the best one for the
tensors' device and ``op(..., backend=name)`` the one asked for (``fastquant.ops.op``).
"""
from __future__ import annotations

import os

import torch

from ..kernels import interpreting
from ..ops import REGISTRY
from . import cpu_ext, cuda_ext, triton_kernels  # noqa: F401  (each registers its kernels on the ops)
from .availability import (AVAILABLE, CPU_EXT_AVAILABLE, CPU_EXT_REASON, CUDA_EXT_AVAILABLE, CUDA_EXT_REASON,
                           REASONS, TRITON_AVAILABLE, TRITON_REASON)


__all__ = ["TRITON_AVAILABLE", "TRITON_REASON", "CPU_EXT_AVAILABLE", "CPU_EXT_REASON", "CUDA_EXT_AVAILABLE",
           "CUDA_EXT_REASON", "AVAILABLE", "REASONS", "triton_interpret", "describe", "registered"]


def triton_interpret() -> bool:
    """Whether TRITON_INTERPRET asks for Triton's CPU interpreter (Triton's own parsing)."""
    return interpreting()


def registered() -> dict[str, list[str]]:
    """{op name: the backends registered for it in this process}."""
    return {name: op.backends() for name, op in sorted(REGISTRY.items())}


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
        "ops": registered(),
        "fused_recon_env": os.environ.get("FASTQUANT_FUSED_RECON"),
    }

