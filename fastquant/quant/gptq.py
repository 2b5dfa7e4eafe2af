"""GPTQ weight rounding (Frantar et al., arXiv 2210.17323) on a calibrated grid."""
from __future__ import annotations

import torch

from .functional import fake_quant_uniform
from .uniform import UniformQuantizer


def round_to_grid(w: torch.Tensor, quantizer: UniformQuantizer) -> torch.Tensor:
    """Round-to-nearest fake quantization of a weight [O, ...] with the quantizer's
    fixed per-output-channel parameters."""
    shape = (-1,) + (1,) * (w.dim() - 1)
    scale = quantizer.scale.reshape(shape).to(w)
    zp = quantizer.zero_point.reshape(shape).to(w)
    return fake_quant_uniform(w, scale, zp, quantizer.qmax)


@torch.no_grad()
def gptq_round(weight: torch.Tensor, quantizer: UniformQuantizer, second_moment: torch.Tensor,
               damp: float = 0.01, block: int = 128, compensated: bool = False):
    """Round ``weight`` [O, C] onto ``quantizer``'s per-output-channel grid with GPTQ
    (Frantar et al., arXiv 2210.17323): columns are quantized one at a time and each
    column's rounding error is spread over the columns not yet quantized so that
    E||x W^T - x Q^T||^2 stays smallest for inputs with second moment E[x x^T]
    (``second_moment``, [C, C]). Scales and zero points stay as calibrated. Returns
    the dequantized weight: values on the grid, which the quantizer maps to the same codes.

    ``compensated=True`` returns ``(rounded, before)``: ``before`` holds each column as it
    was when GPTQ rounded it (the float weight plus the errors spread onto it), so that
    rounding ``before`` to nearest gives ``rounded``; reconstruction starts its learned
    rounding there (``ReconConfig.round_start="gptq"``).
    """
    w = weight.detach().float().clone()
    cols = w.shape[1]
    h = second_moment.to(w).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += torch.eye(cols, dtype=h.dtype, device=h.device) * (damp * torch.diag(h).mean())
    try:
        # Upper Cholesky factor of H^-1: row i holds how column i's error spreads to later columns.
        u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    except RuntimeError:  # not positive definite even after damping: plain rounding
        rounded = round_to_grid(weight, quantizer)
        return (rounded, weight.detach().clone()) if compensated else rounded
    scale = quantizer.scale.reshape(-1, 1).to(w)
    zp = quantizer.zero_point.reshape(-1, 1).to(w)
    out = torch.empty_like(w)
    before = torch.empty_like(w) if compensated else None
    for b0 in range(0, cols, block):
        b1 = min(b0 + block, cols)
        wb = w[:, b0:b1].clone()
        errs = torch.empty_like(wb)
        ub = u[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = wb[:, i : i + 1]
            q = fake_quant_uniform(col, scale, zp, quantizer.qmax)
            if before is not None:
                before[:, b0 + i : b0 + i + 1] = col
            out[:, b0 + i : b0 + i + 1] = q
            e = (col - q) / ub[i, i]
            wb[:, i:] -= e * ub[i : i + 1, i:]
            errs[:, i : i + 1] = e
        w[:, b1:] -= errs @ u[b0:b1, b1:]
    if before is not None:
        return out.to(weight.dtype), before.to(weight.dtype)
    return out.to(weight.dtype)
