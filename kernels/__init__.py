"""Triton kernels of fastquant, installed as ``fastquant.kernels``.

This folder sits at the top of the repository and is mapped onto the package
``fastquant.kernels`` by setup.py, so the same import works from a wheel and from
an editable install.

Importing this package never needs Triton: ``TRITON_AVAILABLE`` and
``TRITON_REASON`` record whether it can be used, and kernel modules (which import
Triton) are only imported by the code that launches them.

Conventions every kernel module follows:

- a Triton kernel is a ``@triton.jit`` function whose name ends in ``_kernel``;
  it sits next to a docstring stating its contract, and next to a wrapper
  ``triton_<op>(...)`` that checks what the launch needs, allocates the outputs and
  launches (the op's contract and its input checks live in ``fastquant.ops``, the
  wrappers' caller through ``fastquant.backends``);
- nothing here imports fastquant: the package is the kernels alone;
- the module defines ``COMPILE_SPECS``, a list of :class:`KernelSpec`, with at
  least one entry per kernel. ``python -m fastquant.kernels.compile_check``
  finds every module here and compiles every spec for sm_80 and sm_90 without a
  GPU; a kernel with no spec fails the check. Adding a kernel means adding its
  module and its entries, nothing else.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

try:
    import triton  # noqa: F401  (only probed here)
except ImportError as exc:
    TRITON_AVAILABLE = False
    TRITON_REASON = f"triton is not importable ({exc})"
else:
    TRITON_AVAILABLE = True
    TRITON_REASON = ""


def interpreting() -> bool:
    """Whether TRITON_INTERPRET asks for Triton's CPU interpreter (read, as Triton reads it,
    when a kernel module is imported)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on")


def _interpreter_numpy_compat() -> None:
    """Let Triton 3.6's CPU interpreter run with numpy >= 2.4.

    The interpreter holds every scalar as a one-element numpy array and turns it into a
    Python integer with ``int(array)`` (``range(0, N, BLOCK)`` with a run-time N does), which
    numpy 2.4 refuses for arrays that are not 0-dimensional. This replaces that conversion by
    ``int(array.reshape(-1)[0])`` for one-element arrays; everything else is unchanged. It is
    applied only under the interpreter, and only where the interpreter has the hook it
    patches (a Triton that fixed this, or moved it, is left alone).
    """
    import numpy as np
    from triton.runtime import interpreter

    patch_tensor = getattr(interpreter, "_patch_lang_tensor", None)
    if patch_tensor is None or getattr(patch_tensor, "_fastquant_numpy_compat", False):
        return

    def index(self):
        data = self.handle.data
        return int(np.asarray(data).reshape(-1)[0]) if np.size(data) == 1 else int(data)

    def patched(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", index)

    patched._fastquant_numpy_compat = True
    interpreter._patch_lang_tensor = patched


if TRITON_AVAILABLE and interpreting():
    _interpreter_numpy_compat()


@dataclass(frozen=True)
class KernelSpec:
    """One specialisation of a Triton kernel to compile ahead of time.

    ``signature`` maps every argument name of the kernel to its Triton type
    (``"*fp32"`` for a pointer, ``"i32"`` for an integer, ``"constexpr"`` for a
    compile-time constant); ``constexprs`` gives the value of each constexpr, as
    ``triton.compiler.ASTSource`` expects them in Triton 3.x. ``label`` tells
    the specialisations of one kernel apart in the report.
    """

    kernel: Any
    signature: dict[str, str]
    constexprs: dict[str, Any]
    label: str
    options: dict[str, Any] = field(default_factory=lambda: {"num_warps": 4})

    @property
    def name(self) -> str:
        return f"{self.kernel.__name__}[{self.label}]"


def is_interpreted(kernel) -> bool:
    """Whether ``kernel`` (a ``@triton.jit`` function) runs in Triton's CPU interpreter.
    TRITON_INTERPRET is read when ``@triton.jit`` runs, so the kernel object itself knows:
    each kernel module records it as ``INTERPRETED`` once its kernels are defined."""
    import triton

    return not isinstance(kernel, triton.runtime.JITFunction)


def check_device(t, name: str, interpreted: bool) -> None:
    """Refuse a tensor that is not on a CUDA device, unless the kernels are interpreted."""
    if t.device.type != "cuda" and not interpreted:
        raise ValueError(f"{name}: expected CUDA tensors, got device {t.device} "
                         "(set TRITON_INTERPRET=1 before import to run on the CPU)")
