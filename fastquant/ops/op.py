"""How an op is declared once and implemented per backend.

An :class:`Op` is declared in its module of ``fastquant/ops`` with its PyTorch twin, which
states the contract in code: it is the ``torch`` backend (every device), the CPU fallback
and the tests' oracle. Its other implementations are registered by ``fastquant.backends``
(the only code that imports the compiled extensions and the Triton kernels), one per
backend:

==========  =========================================  ===============
backend     what                                       tensors on
==========  =========================================  ===============
``torch``   the PyTorch twin                           any device
``cpu``     the C++ extension ``fastquant._C_cpu``     the CPU
``triton``  the Triton kernels (``kernels/``)          CUDA devices
``cuda``    the CUDA C++ extension ``fastquant._C``    CUDA devices
==========  =========================================  ===============

That is the one meaning of "backend" in fastquant: ``convert(model, backend)``, a
deployed layer's ``backend`` and the ``backend=`` argument of every op name one of these.

``op(*args)`` runs the preferred backend registered for the tensors' device (CUDA:
``cuda``, then ``triton``; CPU: ``cpu``; then ``torch``), skipping one whose ``supports``
predicate refuses the arguments; ``op(*args, backend="triton")`` runs that backend (its
keyword options, such as tile sizes, pass through). Each op is also a ``torch.library``
custom op ``torch.ops.fastquant.<name>`` with a fake implementation, so ``torch.compile``
traces it; the library op runs ``op(*args)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..errors import FastquantError

BACKENDS = ("torch", "cpu", "triton", "cuda")
# Which backends run tensors of a device type, in order of preference (torch: always, last).
PREFERENCE = {"cuda": ("cuda", "triton"), "cpu": ("cpu",)}

REGISTRY: dict[str, "Op"] = {}


@dataclass(frozen=True)
class Implementation:
    fn: Callable
    devices: tuple[str, ...]
    supports: Optional[Callable[..., bool]] = None


class Op:
    """An op of fastquant (see the module docstring)."""

    def __init__(self, name: str, twin: Callable, *, library=None):
        if name in REGISTRY:
            raise ValueError(f"op {name!r} is declared twice")
        self.name = name
        self.twin = twin
        self.library = library  # the torch.library custom op, when declared with one
        self._impls: dict[str, Implementation] = {"torch": Implementation(twin, ())}
        self._missing: dict[str, str] = {}  # backend -> why it is not registered
        REGISTRY[name] = self

    def __repr__(self) -> str:
        return f"Op({self.name!r}, backends={self.backends()})"

    # -- registration (fastquant.backends) -------------------------------------------------
    def register(self, backend: str, fn: Callable, devices: tuple[str, ...],
                 supports: Optional[Callable[..., bool]] = None):
        if backend not in BACKENDS or backend == "torch":
            raise ValueError(f"{self.name}: cannot register backend {backend!r} (one of {', '.join(BACKENDS[1:])})")
        self._impls[backend] = Implementation(fn, tuple(devices), supports)
        self._missing.pop(backend, None)

    def unavailable(self, backend: str, reason: str):
        """Record why ``backend`` does not implement this op here (said when it is asked for)."""
        if backend not in self._impls:
            self._missing[backend] = reason

    # -- lookup ----------------------------------------------------------------------------
    def backends(self) -> list[str]:
        """The backends registered in this process, ``torch`` first."""
        return list(self._impls)

    def available(self, backend: str) -> bool:
        return backend in self._impls

    def why_not(self, backend: str) -> str:
        """Why ``backend`` cannot run this op ('' if it can)."""
        if backend in self._impls:
            return ""
        if backend not in BACKENDS:
            return f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})"
        return self._missing.get(backend, f"the {backend} backend does not implement {self.name}")

    def implementation(self, backend: str) -> Callable:
        """The function of ``backend``; FastquantError naming the reason when it is not there."""
        impl = self._impls.get(backend)
        if impl is None:
            raise FastquantError(f"{self.name}: backend {backend!r} is unavailable: {self.why_not(backend)}")
        return impl.fn

    def supports(self, backend: str, *args, **kwargs) -> bool:
        """Whether ``backend`` is registered and takes these arguments."""
        impl = self._impls.get(backend)
        return impl is not None and (impl.supports is None or bool(impl.supports(*args, **kwargs)))

    def resolve(self, device_type: str, *args, **kwargs) -> str:
        """The backend ``op(*args)`` runs for tensors on ``device_type``."""
        for backend in PREFERENCE.get(device_type, ()):
            impl = self._impls.get(backend)
            if impl is not None and device_type in impl.devices and self.supports(backend, *args, **kwargs):
                return backend
        return "torch"

    def __call__(self, *args, backend: Optional[str] = None, **options):
        if backend is None:
            device = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
            backend = self.resolve(device, *args)
        return self.implementation(backend)(*args, **options)


def declare(name: str, twin: Callable, fake: Callable, library_fn: Callable) -> Op:
    """An :class:`Op` ``name`` with its twin, and the custom op ``torch.ops.fastquant.<name>``
    (schema from ``library_fn``'s annotations; its body dispatches through the Op) with
    ``fake`` for tracing."""
    op = Op(name, twin)
    library = torch.library.custom_op(f"fastquant::{name}", mutates_args=())(library_fn)
    library.register_fake(fake)
    op.library = library
    return op


def op_named(name: str) -> Op:
    if name not in REGISTRY:
        raise KeyError(f"no op {name!r} (declared: {', '.join(sorted(REGISTRY))})")
    return REGISTRY[name]
