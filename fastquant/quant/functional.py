"""The functional core of fastquant's quantizers: plain functions on tensors, no state.

Every quantizer module, learnable wrapper, PyTorch twin and test oracle computes its grids
with these, so one formula has one home:

- uniform asymmetric: ``q = clamp(round(x / s) + z, 0, qmax)``, ``x~ = (q - z) s``
  (``fake_quant_uniform``, ``quantize_uniform``, ``range_to_qparams``);
- logarithmic: levels ``scale 2^(-c / steps)`` for codes c = 0 .. 2^bits - 2, the last code
  standing for 0, each value taking the nearest level in value (``log_codes``,
  ``log_levels``);
- AdaRound's rectified sigmoid ``h(V) = clamp(sigmoid(V) (ZETA - GAMMA) + GAMMA, 0, 1)``.
"""
from __future__ import annotations

import torch

from ..errors import FastquantError

ZETA, GAMMA = 1.1, -0.1  # AdaRound's stretch of the sigmoid (arXiv 2004.10568)


def check_bits(bits: int, what: str = "bits") -> int:
    if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 8:
        raise FastquantError(f"{what} must be an integer from 2 to 8, got {bits!r}")
    return bits


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest (half to even); the gradient passes straight through.
    Without autograd it is plain rounding (the same values: ``round(x) - x`` is exact)."""
    if not (x.requires_grad and torch.is_grad_enabled()):
        return torch.round(x)
    return (torch.round(x) - x).detach() + x


def fake_quant_uniform(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmax: int) -> torch.Tensor:
    """Asymmetric fake quantization onto the grid {0..qmax}: (clamp(round(x/s)+z) - z) * s."""
    q = torch.clamp(round_ste(x / scale) + zero_point, 0, qmax)
    return (q - zero_point) * scale


def quantize_uniform(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmax: int) -> torch.Tensor:
    """Integer codes in {0..qmax} (as uint8), the same grid as fake_quant_uniform."""
    return torch.clamp(torch.round(x / scale) + zero_point, 0, qmax).to(torch.uint8)


def range_to_qparams(lo: torch.Tensor, hi: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point covering [lo, hi] (widened to include 0)."""
    lo = torch.minimum(lo, torch.zeros_like(lo))
    hi = torch.maximum(hi, torch.zeros_like(hi))
    scale = ((hi - lo) / qmax).clamp_min(1e-8)
    zero_point = torch.clamp(torch.round(-lo / scale), 0, qmax)
    return scale, zero_point


def log_levels(codes: torch.Tensor, scale, steps: int, zero_code: int) -> torch.Tensor:
    """The values of log codes: ``scale 2^(-c / steps)``, 0 for the zero code (float32)."""
    c = codes.float()
    val = scale * torch.exp2(-c / steps)
    return torch.where(c == zero_code, torch.zeros_like(val), val)


def log_codes(p: torch.Tensor, scale, steps: int, zero_code: int) -> torch.Tensor:
    """Codes (int32) of the nearest log level in value (not in the log domain): of the level
    at or above p (found in the log domain) and the next one down, the nearer wins, the zero
    code counting as a level of value 0 below the smallest. ``scale``: a float or a 0-d tensor."""
    p = p.float()
    hi = torch.floor(-torch.log2((p / scale).clamp_min(1e-30)) * steps).clamp(0, zero_code)
    lo = (hi + 1).clamp_max(zero_code)
    code = torch.where((log_levels(hi, scale, steps, zero_code) - p).abs()
                       <= (p - log_levels(lo, scale, steps, zero_code)).abs(), hi, lo)
    return code.to(torch.int32)


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)


def inverse_rectified_sigmoid(h: torch.Tensor) -> torch.Tensor:
    """V with ``rectified_sigmoid(V) == h`` for h in [0, 1] (finite at both ends)."""
    return -torch.log((ZETA - GAMMA) / (h - GAMMA) - 1)


def rounding_regularizer(h: torch.Tensor, beta: float) -> torch.Tensor:
    """AdaRound's ``sum(1 - |2h - 1|^beta)``: zero when every h is 0 or 1."""
    return (1 - (2 * h - 1).abs().pow(beta)).sum()
