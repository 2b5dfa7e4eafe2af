"""One-pass fake quantization of a deployed model's attention operands (float math around
the matmuls the integer path does not take).

- ``fake_quant_uniform(x, scale, zero_point, inner, bits)``: x contiguous, viewed as runs of
  ``inner`` elements that share one step (``scale`` [C], C runs repeating: per tensor C = 1
  and ``inner = x.numel()``, per head C = H and ``inner = N D`` for [B, H, N, D]), each
  element ``(clamp(round(x / s) + z, 0, qmax) - z) * s``: exactly ``UniformQuantizer.forward``.
- ``fake_quant_log(x, scale, steps, levels)``: the log quantizer's nearest level in value,
  returned as ``(x~ - x) + x`` (``levels``: the value of every code): exactly
  ``LogQuantizer.forward``.

Backends: ``torch`` (the twins below) and ``cpu`` (``fastquant._C_cpu``: one pass instead of
about ten elementwise ops; float32 input, no autograd).
"""
from __future__ import annotations

import torch

from ..quant.functional import fake_quant_uniform, log_codes, log_levels
from .op import declare

__all__ = ["FAKE_QUANT_UNIFORM", "FAKE_QUANT_LOG", "torch_fake_quant_uniform", "torch_fake_quant_log"]


def torch_fake_quant_uniform(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, inner: int,
                             bits: int) -> torch.Tensor:
    c = scale.numel()
    runs = x.contiguous().reshape(-1, c, inner)
    out = fake_quant_uniform(runs, scale.reshape(1, c, 1), zero_point.reshape(1, c, 1), (1 << bits) - 1)
    return out.reshape(x.shape)


def torch_fake_quant_log(x: torch.Tensor, scale: float, steps: int, levels: torch.Tensor) -> torch.Tensor:
    zero_code = levels.numel() - 1
    xq = log_levels(log_codes(x.detach(), scale, steps, zero_code), scale, steps, zero_code).to(x.dtype)
    return (xq - x).detach() + x


def _lib_fake_quant_uniform(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, inner: int,
                            bits: int) -> torch.Tensor:
    return FAKE_QUANT_UNIFORM(x, scale, zero_point, inner, bits)


def _lib_fake_quant_log(x: torch.Tensor, scale: float, steps: int, levels: torch.Tensor) -> torch.Tensor:
    return FAKE_QUANT_LOG(x, scale, steps, levels)


FAKE_QUANT_UNIFORM = declare("fake_quant_uniform", torch_fake_quant_uniform,
                             lambda x, scale, zero_point, inner, bits: torch.empty_like(x), _lib_fake_quant_uniform)
FAKE_QUANT_LOG = declare("fake_quant_log", torch_fake_quant_log,
                         lambda x, scale, steps, levels: torch.empty_like(x), _lib_fake_quant_log)
