"""The ``cuda`` backend: the CUDA C++ extension ``fastquant._C`` (csrc/*.cu, bindings.cpp).

Per-token int8 quantization, asymmetric activation quantization with row sums, the int8
GEMM with its dequantization epilogue (int8 or packed 4-bit weights, unpacked in shared
memory), the 4-bit weight packing, the deployed linear layer composed of the two, and the
fused quantized attention for inference (head dim 64, at most 256 tokens: the whole row of
keys sits in shared memory).
"""
from __future__ import annotations

import torch

from ..ops.attention import QUANT_ATTENTION, log_level_table
from ..ops.int8_linear import INT8_GEMM, INT8_LINEAR, PACK_WEIGHT_INT4, QUANTIZE_ASYM
from ..ops.quantize_int8 import QUANTIZE_PER_TOKEN_INT8
from .availability import CUDA_EXT_AVAILABLE, CUDA_EXT_REASON

OPS = (QUANTIZE_PER_TOKEN_INT8, QUANTIZE_ASYM, INT8_GEMM, PACK_WEIGHT_INT4, INT8_LINEAR, QUANT_ATTENTION)
_FLOAT = (torch.float32, torch.float16, torch.bfloat16)


def quantize_per_token_int8(x):
    from fastquant import _C

    if x.dtype not in _FLOAT:  # the contract reads x as float32, so converting first changes nothing
        x = x.to(torch.float32)
    return _C.quantize_per_token_int8(x.contiguous())


def quantize_asym(x, bits, scale=None, zero_point=None):
    from fastquant import _C

    x = x if x.dtype in _FLOAT else x.float()
    if x.stride(-1) != 1:
        x = x.contiguous()
    if scale is None:
        return _C.quantize_asym(x, bits)
    return _C.quantize_asym(x, bits, scale.reshape(1), zero_point.reshape(1))


def int8_gemm(a, b, rowsum, s_x, c_x, s_w, c_w, b_sum, bias=None, out_dtype=torch.float16):
    from fastquant import _C

    return _C.int8_gemm(a, b, rowsum, s_x, c_x, s_w, c_w, b_sum, bias, out_dtype)


def pack_weight_int4(weight_t):
    from fastquant import _C

    return _C.pack_int4(weight_t.contiguous())


def int8_linear(x2, weight, a_bits, per_token, x_scale, x_zero, w_scale, w_corr, b_sum, bias, col_scale, col_add):
    """Quantize, then the GEMM with the unfolded epilogue; output in x2's float dtype."""
    x2 = x2 if x2.dtype in _FLOAT else x2.float()
    if per_token:
        a, rowsum, s_x, c_x = quantize_asym(x2, a_bits)
    else:
        a, rowsum, s_x, c_x = quantize_asym(x2, a_bits, x_scale, x_zero)
    return int8_gemm(a, weight, rowsum, s_x, c_x, w_scale, w_corr, b_sum, bias, x2.dtype)


def quant_attention(q, k, v, s_q, z_q, s_k, z_k, s_v, z_v, a_bits, sm_scale, p_scale, p_steps, p_bits):
    from fastquant import _C

    if q.dtype not in _FLOAT:
        q, k, v = q.float(), k.float(), v.float()
    levels = log_level_table(float(p_scale), p_steps, p_bits, q.device)
    return _C.quant_attention(q, k, v, s_q, z_q, s_k, z_k, float(s_v), float(z_v), a_bits, float(sm_scale), levels,
                              float(p_scale), p_steps, p_bits, q.dtype)


def quant_attention_supports(q, *args) -> bool:
    """The kernel holds a whole row of keys in shared memory: head dim 64, N <= 256; the log
    softmax quantizers (p_steps 1, 2) only."""
    return q.shape[3] == 64 and q.shape[2] <= 256 and (len(args) < 12 or args[11] in (1, 2))


def _cuda_rows(x2, *args) -> bool:
    return x2.is_cuda and x2.shape[0] > 0


if CUDA_EXT_AVAILABLE:
    QUANTIZE_PER_TOKEN_INT8.register("cuda", quantize_per_token_int8, ("cuda",))
    QUANTIZE_ASYM.register("cuda", quantize_asym, ("cuda",))
    INT8_GEMM.register("cuda", int8_gemm, ("cuda",))
    PACK_WEIGHT_INT4.register("cuda", pack_weight_int4, ("cuda",))
    INT8_LINEAR.register("cuda", int8_linear, ("cuda",), _cuda_rows)
    QUANT_ATTENTION.register("cuda", quant_attention, ("cuda",), quant_attention_supports)
else:
    for op in OPS:
        op.unavailable("cuda", CUDA_EXT_REASON)
