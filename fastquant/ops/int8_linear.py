"""Deployed int8 linear layers: activation quantization, the int8 GEMM with its
dequantization epilogue, the whole layer, and the one 4-bit packing.

Contract (the Triton kernels in ``kernels/int8_linear.py`` and the CUDA C++ kernels in
``csrc/int8_linear.cu`` compute the same; the twins here are their tests' oracle):

``quantize_asym`` (x [M, K] read as float32, ``bits`` <= 8, ``qmax = 2^bits - 1``,
``o = 2^(bits-1)``):

    per token:  lo = min(min_k x, 0), hi = max(max_k x, 0)
                s = max((hi - lo) / qmax, 1e-8),  z = clamp(round(-lo / s), 0, qmax)
    per tensor: s, z given (a calibrated step and zero point)
    a[m, k]   = clamp(round(x / s) + z, 0, qmax) - o            int8
    A[m]      = sum_k a[m, k]                                    int32 (exact)
    s_x[m]    = s,   c_x[m] = o - z                              float32

``int8_gemm``, weight codes ``b = q_w - o_w`` as int8 [K, N] (or packed two per byte,
``pack_weight_int4``), per output channel ``s_w``, ``c_w = o_w - z_w``,
``B' = sum_k b + K c_w``, optional bias:

    acc = a @ b (int32, exact)
    y   = (((acc + A c_w) + c_x B') * (s_x s_w)) + bias          float32 math

``int8_linear``: the deployed layer ``Int8Linear``'s forward, quantize then GEMM; for a
calibrated input step the per-tensor constants are folded into two per-channel vectors
``col_scale = s_x s_w`` and ``col_add = c_x B' + bias / (s_x s_w)``, so
``y = (acc + A c_w + col_add) * col_scale`` (backends ``torch`` and ``cpu``; ``triton``
and ``cuda`` take the unfolded epilogue above: equal up to float rounding).

4-bit codes are packed two per byte, element 2j in the low nibble and 2j + 1 in the high
one (``pack_int4``): saved models pack weight rows ([N, K] codes 0..15, along K), the GEMMs
read packed columns of ``b`` ([K, N] values -8..7 as codes + 8, along K: ``pack_weight_int4``).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..quant.functional import range_to_qparams
from .op import declare

__all__ = ["QUANTIZE_ASYM", "INT8_GEMM", "INT8_LINEAR", "PACK_WEIGHT_INT4", "torch_quantize_asym",
           "torch_int8_gemm", "torch_int8_linear", "pack_int4", "unpack_int4", "pack_weight_int4",
           "unpack_weight_int4"]


# -- the one 4-bit packing -----------------------------------------------------------------
def pack_int4(codes: torch.Tensor, dim: int = -1, pad: int = 0) -> torch.Tensor:
    """4-bit codes (0..15) packed two per byte along ``dim`` (uint8, half the length rounded
    up): element 2j in the low nibble of byte j, 2j + 1 in the high nibble; an odd length is
    padded with the code ``pad``."""
    c = codes.to(torch.uint8).movedim(dim, -1)
    if c.shape[-1] % 2:
        c = torch.cat([c, torch.full_like(c[..., :1], pad)], -1)
    return (c[..., 0::2] | (c[..., 1::2] << 4)).movedim(-1, dim).contiguous()


def unpack_int4(packed: torch.Tensor, length: int, dim: int = -1) -> torch.Tensor:
    """The inverse of :func:`pack_int4`: the first ``length`` codes along ``dim`` (uint8)."""
    p = packed.movedim(dim, -1)
    out = torch.stack([p & 0xF, p >> 4], -1).reshape(*p.shape[:-1], -1)
    return out[..., :length].movedim(-1, dim)


def pack_weight_int4(weight_t: torch.Tensor) -> torch.Tensor:
    """The GEMMs' packed 4-bit weight: int8 [K, N] values -8..7 -> uint8 [ceil(K/2), N], rows
    2j and 2j + 1 as codes + 8 in the low and high nibble of row j (an odd K's missing row:
    code 8, the value 0). The twin of ``_C.pack_int4``."""
    return pack_int4((weight_t.to(torch.int16) + 8).to(torch.uint8), dim=0, pad=8)


def unpack_weight_int4(packed: torch.Tensor, k: int) -> torch.Tensor:
    """int8 [K, N] values -8..7 from :func:`pack_weight_int4`'s layout."""
    return (unpack_int4(packed, k, dim=0).to(torch.int16) - 8).to(torch.int8)


# -- twins ------------------------------------------------------------------------------------
def torch_quantize_asym(x: torch.Tensor, bits: int, scale: Optional[torch.Tensor] = None,
                        zero_point: Optional[torch.Tensor] = None):
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
    the integer product is exact (int64 on the CPU). ``b`` may be packed (uint8)."""
    if b.dtype == torch.uint8:
        b = unpack_weight_int4(b, a.shape[1])
    acc = (a.long() @ b.long()).float()
    y = acc + rowsum.float()[:, None] * c_w[None, :]
    y = y + c_x[:, None] * b_sum[None, :]
    y = y * (s_x[:, None] * s_w[None, :])
    if bias is not None:
        y = y + bias[None, :]
    return y.to(out_dtype)


def torch_int8_linear(x2, weight, a_bits: int, per_token: bool, x_scale, x_zero, w_scale, w_corr, b_sum, bias,
                      col_scale, col_add):
    """The deployed layer on ``x2`` [rows, K] (float32 out), per the module docstring: the
    oracle of the fused CPU kernels and the path of devices without one."""
    if weight.dtype == torch.uint8:
        weight = unpack_weight_int4(weight, x2.shape[1])
    if per_token:
        a8, row, s_x, c_x = torch_quantize_asym(x2, a_bits)
    else:
        a8, row, _, _ = torch_quantize_asym(x2, a_bits, x_scale, x_zero)
    # torch._int_mm on the CPU (VNNI); elsewhere float64 products, exact for these sums (< 2^53)
    acc = torch._int_mm(a8, weight).float() if a8.device.type == "cpu" else (a8.double() @ weight.double()).float()
    acc.addr_(row.float(), w_corr)  # exact row sums: integers below 2^24 in magnitude
    if per_token:
        acc.add_(c_x[:, None] * b_sum).mul_(s_x[:, None] * w_scale)
        if bias is not None:
            acc.add_(bias)
    else:
        acc.add_(col_add).mul_(col_scale)
    return acc


# -- the ops ----------------------------------------------------------------------------------
def _lib_quantize_asym(x: torch.Tensor, bits: int, scale: Optional[torch.Tensor],
                       zero_point: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                    torch.Tensor]:
    return tuple(t.clone() for t in QUANTIZE_ASYM(x, bits, scale, zero_point))


def _fake_quantize_asym(x, bits, scale, zero_point):
    m, k = x.shape
    f32 = dict(dtype=torch.float32, device=x.device)
    return (x.new_empty((m, k), dtype=torch.int8), x.new_empty((m,), dtype=torch.int32),
            torch.empty((m,), **f32), torch.empty((m,), **f32))


QUANTIZE_ASYM = declare("quantize_asym", torch_quantize_asym, _fake_quantize_asym, _lib_quantize_asym)


def _lib_int8_gemm(a: torch.Tensor, b: torch.Tensor, rowsum: torch.Tensor, s_x: torch.Tensor, c_x: torch.Tensor,
                   s_w: torch.Tensor, c_w: torch.Tensor, b_sum: torch.Tensor, bias: Optional[torch.Tensor],
                   out_dtype: torch.dtype) -> torch.Tensor:
    return INT8_GEMM(a, b, rowsum, s_x, c_x, s_w, c_w, b_sum, bias, out_dtype)


def _fake_int8_gemm(a, b, rowsum, s_x, c_x, s_w, c_w, b_sum, bias, out_dtype):
    return a.new_empty((a.shape[0], s_w.shape[0]), dtype=out_dtype)


INT8_GEMM = declare("int8_gemm", torch_int8_gemm, _fake_int8_gemm, _lib_int8_gemm)


def _lib_int8_linear(x2: torch.Tensor, weight: torch.Tensor, a_bits: int, per_token: bool, x_scale: torch.Tensor,
                     x_zero: torch.Tensor, w_scale: torch.Tensor, w_corr: torch.Tensor, b_sum: torch.Tensor,
                     bias: Optional[torch.Tensor], col_scale: torch.Tensor, col_add: torch.Tensor) -> torch.Tensor:
    return INT8_LINEAR(x2, weight, a_bits, per_token, x_scale, x_zero, w_scale, w_corr, b_sum, bias, col_scale,
                       col_add)


def _fake_int8_linear(x2, weight, a_bits, per_token, x_scale, x_zero, w_scale, w_corr, b_sum, bias, col_scale,
                      col_add):
    return x2.new_empty((x2.shape[0], w_scale.shape[0]), dtype=torch.float32)


INT8_LINEAR = declare("int8_linear", torch_int8_linear, _fake_int8_linear, _lib_int8_linear)


def _lib_pack_weight_int4(weight_t: torch.Tensor) -> torch.Tensor:
    return PACK_WEIGHT_INT4(weight_t)


def _fake_pack_weight_int4(weight_t):
    return weight_t.new_empty(((weight_t.shape[0] + 1) // 2, weight_t.shape[1]), dtype=torch.uint8)


PACK_WEIGHT_INT4 = declare("pack_weight_int4", pack_weight_int4, _fake_pack_weight_int4, _lib_pack_weight_int4)
