"""PyTorch reference twins of the deployed int8 linear kernels (``kernels/int8_linear.py``).

The contract is in that module's docstring (and in csrc/int8_linear.h for the CUDA C++
kernels, which compute the same); these functions implement it with plain
PyTorch ops and are the oracle the Triton kernels are tested against.
``Int8Linear.reference`` (fastquant.deploy) quantizes with ``torch_quantize_asym`` and
computes the same epilogue, with the per-tensor case's constants folded.
"""
from __future__ import annotations

import torch

from fastquant.quantizers import range_to_qparams

__all__ = ["torch_quantize_asym", "torch_int8_gemm", "pack_int4_t"]


def torch_quantize_asym(x: torch.Tensor, bits: int, scale: torch.Tensor | None = None,
                        zero_point: torch.Tensor | None = None):
    """``(a int8 [M, K], rowsum int32 [M], s_x [M], c_x [M])``: per token when ``scale`` is
    None (range_to_qparams of each row), else with the calibrated step and zero point."""
    xf = x.float()
    qmax, o = (1 << bits) - 1, 1 << (bits - 1)
    if scale is None:
        s, z = range_to_qparams(xf.amin(1, keepdim=True), xf.amax(1, keepdim=True), qmax)
    else:
        s = scale.float().reshape(1, 1).expand(xf.shape[0], 1)
        z = zero_point.float().reshape(1, 1).expand(xf.shape[0], 1)
    a = torch.clamp(torch.round(xf / s) + z, 0, qmax) - o
    return a.to(torch.int8), a.sum(1).to(torch.int32), s.reshape(-1).contiguous(), (o - z).reshape(-1).contiguous()


def torch_int8_gemm(a, b, rowsum, s_x, c_x, s_w, c_w, b_sum, bias=None, out_dtype=torch.float16):
    """``(((a @ b + A c_w) + c_x B') * (s_x s_w)) + bias`` in float32, returned as ``out_dtype``;
    the integer product is exact (int64 on the CPU)."""
    acc = (a.long() @ b.long()).float()
    y = acc + rowsum.float()[:, None] * c_w[None, :]
    y = y + c_x[:, None] * b_sum[None, :]
    y = y * (s_x[:, None] * s_w[None, :])
    if bias is not None:
        y = y + bias[None, :]
    return y.to(out_dtype)


def pack_int4_t(weight_t):
    """int8 [K, N] weight codes minus 8 (4-bit weights, values -8..7) -> uint8
    [ceil(K/2), N]: row j holds k = 2j in the low nibble and k = 2j + 1 in the high one
    (code + 8; an odd K's missing high nibble is code 8, i.e. zero)."""
    codes = (weight_t.to(torch.int16) + 8).to(torch.uint8)
    if codes.shape[0] % 2:
        codes = torch.cat([codes, torch.full_like(codes[:1], 8)], 0)
    return (codes[0::2] | (codes[1::2] << 4)).contiguous()
