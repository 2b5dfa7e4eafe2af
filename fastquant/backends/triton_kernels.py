"""The ``triton`` backend: the Triton kernels of ``kernels/`` (installed as ``fastquant.kernels``).

Every kernel module is imported on the first call of one of its functions, so importing
fastquant does not compile or even load them. On CUDA tensors; under Triton's CPU
interpreter (``TRITON_INTERPRET=1`` set before the kernels are imported) also on CPU
tensors, when asked for by name (``backend="triton"``), which is how the tests run them.
"""
from __future__ import annotations

import importlib

import torch

from ..ops.attention import QUANT_ATTENTION
from ..ops.fq_attention import FQ_ATTENTION_BWD, FQ_ATTENTION_FWD
from ..ops.fq_linear import FQ_LINEAR_BWD, FQ_LINEAR_FWD
from ..ops.int8_linear import INT8_GEMM, INT8_LINEAR, QUANTIZE_ASYM
from ..ops.quantize_int8 import QUANTIZE_PER_TOKEN_INT8
from .availability import TRITON_AVAILABLE, TRITON_REASON

OPS = (QUANTIZE_PER_TOKEN_INT8, QUANTIZE_ASYM, INT8_GEMM, INT8_LINEAR, QUANT_ATTENTION, FQ_LINEAR_FWD,
       FQ_LINEAR_BWD, FQ_ATTENTION_FWD, FQ_ATTENTION_BWD)
_FLOAT = (torch.float16, torch.bfloat16, torch.float32)


def kernel(module: str, name: str):
    """``fastquant.kernels.<module>.<name>``, imported when first called (``call.resolve()``
    imports it now: what tests/test_backends.py checks for every registered kernel)."""
    def resolve():
        return getattr(importlib.import_module(f"fastquant.kernels.{module}"), name)

    def call(*args, **kwargs):
        return resolve()(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    call.resolve = resolve
    return call


quantize_asym = kernel("int8_linear", "triton_quantize_asym")
int8_gemm = kernel("int8_linear", "triton_int8_gemm")


def int8_linear(x2, weight, a_bits, per_token, x_scale, x_zero, w_scale, w_corr, b_sum, bias, col_scale, col_add):
    """Quantize, then the GEMM with the unfolded epilogue; output in x2's float dtype."""
    if per_token:
        a, rowsum, s_x, c_x = quantize_asym(x2, a_bits)
    else:
        a, rowsum, s_x, c_x = quantize_asym(x2, a_bits, x_scale, x_zero)
    out_dtype = x2.dtype if x2.dtype in _FLOAT else torch.float32
    y = int8_gemm(a, weight, rowsum, s_x, c_x, w_scale, w_corr, b_sum, bias, out_dtype=out_dtype)
    return y.to(x2.dtype)


def quant_attention_supports(q, *args) -> bool:
    """Head dims 16 to 128; the log softmax quantizers (p_steps 1, 2) only."""
    return q.shape[3] in (16, 32, 64, 128) and (len(args) < 12 or args[11] in (1, 2))


if TRITON_AVAILABLE:
    QUANTIZE_PER_TOKEN_INT8.register("triton", kernel("quant_int8", "triton_quantize_per_token_int8"), ("cuda",))
    QUANTIZE_ASYM.register("triton", quantize_asym, ("cuda",))
    INT8_GEMM.register("triton", int8_gemm, ("cuda",))
    INT8_LINEAR.register("triton", int8_linear, ("cuda",))
    QUANT_ATTENTION.register("triton", kernel("attention", "triton_quant_attention"), ("cuda",),
                             quant_attention_supports)
    FQ_LINEAR_FWD.register("triton", kernel("fq_linear", "triton_fq_linear_forward"), ("cuda",))
    FQ_LINEAR_BWD.register("triton", kernel("fq_linear", "triton_fq_linear_backward"), ("cuda",))
    FQ_ATTENTION_FWD.register("triton", kernel("fq_attention", "triton_fq_attention_forward"), ("cuda",))
    FQ_ATTENTION_BWD.register("triton", kernel("fq_attention", "triton_fq_attention_backward"), ("cuda",))
else:
    for op in OPS:
        op.unavailable("triton", TRITON_REASON)
