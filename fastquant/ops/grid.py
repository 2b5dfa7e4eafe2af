"""Linear layers on integer-grid operands, the reconstruction hot loop's product.

A fake-quantized operand is an integer code times a scale: ``x~ = g_x * s_x`` with
``g_x = clamp(round(x / s_x) + z, 0, qmax) - z`` and one scale for the whole tensor (or
one per row), ``W~ = g_w * s_w`` with one scale per output channel. So

    x~ W~^T = (g_x g_w^T) * s_x * s_w^T,

and the product of the grids can run in a narrow float type with the scales applied
afterwards in fp32. bfloat16 holds every integer up to 256 exactly, so for hard-rounded
operands of up to 8 bits each product is exact and the CPU's (or GPU's) bf16 matmul
accumulates them in fp32; what is rounded is the result, to bf16's 8 significant bits
(a relative error of at most 2^-8 per output element). AdaRound's soft-rounded weights
``floor(W/s) + h`` are not integers: bf16 keeps h to 2^-5 or finer for codes below 8 in
magnitude, and QDrop's float elements ``x / s_x`` to 8 significant bits.

This is the pure-PyTorch path; a fused kernel can replace it behind the same call.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def grid_linear(x_grid: torch.Tensor, x_scale: torch.Tensor, w_grid: torch.Tensor, w_scale: torch.Tensor,
                bias: torch.Tensor | None, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``(x_grid @ w_grid^T) * x_scale * w_scale^T + bias`` with the product in ``dtype``.

    ``x_grid`` [..., K] and ``w_grid`` [N, K] are codes minus zero points (float tensors);
    ``x_scale`` is a scalar tensor or broadcasts as [..., 1]; ``w_scale`` has N elements
    (or one). The result is in ``x_grid``'s dtype; gradients flow to all float inputs.
    """
    out_dtype = x_grid.dtype
    y = F.linear(x_grid.to(dtype), w_grid.to(dtype)).to(out_dtype)
    y = y * (x_scale * w_scale.reshape(-1))
    return y if bias is None else y + bias
