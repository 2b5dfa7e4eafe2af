"""The interface every quantizer of fastquant implements, plain or learnable.

A quantizer is an ``nn.Module`` whose state lives in parameters and buffers (so
``state_dict()``, ``.to()`` and saving see it) and whose calibration is an explicit phase:

    q.start_observing()   # forward() passes x through unchanged and records statistics
    ...run calibration data...
    q.finish_observing()  # picks its parameters; forward() now fake-quantizes

``mode`` is ``"off"`` (pass through: the float model), ``"observe"`` or ``"quant"``.
What code outside ``quant/`` may ask of any quantizer, instead of checking its class:

- ``kind``: ``"uniform"`` (an integer grid with a zero point) or ``"log"`` (powers of
  2^(1/steps) below a scale, and zero); ``bits``; ``qmax`` (the largest code);
- ``per_token``: whether the parameters are computed per row at run time (no calibrated
  state to fold into a kernel);
- ``step()``: the calibrated step of a uniform quantizer that has one (a tensor shaped by
  its granularity), else None. Reconstruction learns it (LSQ); deployment folds it;
- ``quantize(x)`` / ``dequantize(codes)``, and ``forward(x)`` (the fake-quantized value);
- ``grid(x)``: ``(g, s)`` with ``g * s == forward(x)`` and ``g`` integers minus the zero point
  (or the float values QDrop keeps), for products taken on integer grids; None when the
  quantizer cannot say (the caller then uses ``forward``).

``set_mode`` and ``modes_of`` switch and read many quantizers at once (``quantizers_off`` as
a context manager restores them).
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Optional

import torch
from torch import nn

from ..errors import FastquantError
from .functional import check_bits

MODES = ("off", "observe", "quant")


class Quantizer(nn.Module):
    """Base class of fastquant's quantizers (see the module docstring)."""

    kind = ""
    per_token = False

    def __init__(self, bits: int):
        super().__init__()
        self.bits = check_bits(bits)
        self._mode = "off"

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str):
        if value not in MODES:
            raise FastquantError(f"quantizer mode must be one of {', '.join(MODES)}, got {value!r}")
        self._mode = value

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1

    def step(self) -> Optional[torch.Tensor]:
        return None

    def grid(self, x: torch.Tensor) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        return None

    def start_observing(self):
        raise NotImplementedError

    def observe(self, x: torch.Tensor):
        raise NotImplementedError

    def finish_observing(self):
        raise NotImplementedError

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dequantize(self, q: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def check_activations(x: torch.Tensor):
    """What a quantizer observes must be finite (NaN or Inf would poison its range)."""
    if not torch.isfinite(x).all():
        raise FastquantError("calibration data produced NaN or Inf activations")


def quantizers_in(module: nn.Module) -> list[Quantizer]:
    """Every quantizer inside ``module`` (plain ones; a learnable wrapper's inner quantizer
    is listed, the wrapper follows its mode)."""
    return [m for m in module.modules() if isinstance(m, Quantizer)]


def set_mode(quantizers: Iterable[Quantizer], mode: str):
    for q in quantizers:
        q.mode = mode


def modes_of(quantizers: Iterable[Quantizer]) -> list[str]:
    return [q.mode for q in quantizers]


@contextlib.contextmanager
def quantizers_off(quantizers: Iterable[Quantizer]):
    """Run with ``quantizers`` passing values through; their modes are restored after."""
    quantizers = list(quantizers)
    saved = modes_of(quantizers)
    set_mode(quantizers, "off")
    try:
        yield
    finally:
        for q, m in zip(quantizers, saved):
            q.mode = m
