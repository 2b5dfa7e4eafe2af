"""The ``cpu`` backend: the C++ extension ``fastquant._C_cpu`` (csrc/cpu_int8.cpp).

Fused kernels of deployed models on the CPU: the whole integer linear layer (quantize the
input with its row sums, the VNNI int8 GEMM through ``torch._int_mm``'s kernel, the
epilogue: three passes instead of about ten) and the attention operands' one-pass fake
quantization (uniform per tensor or per head; the softmax's log quantizer). Each takes
float32 CPU tensors and computes no gradient; the ops fall back to their twins otherwise.
"""
from __future__ import annotations

import torch

from ..ops.attention import QUANT_ATTENTION, log_level_table, log_weight_table
from ..ops.fake_quant import FAKE_QUANT_LOG, FAKE_QUANT_UNIFORM
from ..ops.int8_linear import INT8_LINEAR
from .availability import CPU_EXT_AVAILABLE, CPU_EXT_REASON

OPS = (INT8_LINEAR, FAKE_QUANT_UNIFORM, FAKE_QUANT_LOG, QUANT_ATTENTION)


def _no_grad_float32(x: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype == torch.float32
            and not (torch.is_grad_enabled() and x.requires_grad))


def int8_linear(x2, weight, a_bits, per_token, x_scale, x_zero, w_scale, w_corr, b_sum, bias, col_scale, col_add):
    from fastquant import _C_cpu

    x2 = x2.float().contiguous()
    if per_token:
        return _C_cpu.int8_linear_dynamic(x2, weight, a_bits, w_corr, b_sum, w_scale, bias)[0]
    return _C_cpu.int8_linear_static(x2, weight, float(x_scale), float(x_zero), a_bits, w_corr, col_add, col_scale)


def int8_linear_supports(x2, weight, *args) -> bool:
    return x2.device.type == "cpu" and x2.shape[0] > 0 and weight.dtype == torch.int8


def fake_quant_uniform(x, scale, zero_point, inner, bits):
    from fastquant import _C_cpu

    return _C_cpu.fake_quant_uniform(x, scale.reshape(-1).float().contiguous(),
                                     zero_point.reshape(-1).float().contiguous(), inner, bits)


def fake_quant_uniform_supports(x, scale, zero_point, inner, bits) -> bool:
    return _no_grad_float32(x) and inner > 0


def fake_quant_log(x, scale, steps, levels):
    from fastquant import _C_cpu

    return _C_cpu.fake_quant_log(x, float(scale), steps, levels)


def fake_quant_log_supports(x, scale, steps, levels) -> bool:
    return _no_grad_float32(x)


def quant_attention(q, k, v, s_q, z_q, s_k, z_k, s_v, z_v, a_bits, sm_scale, p_scale, p_steps, p_bits):
    from fastquant import _C_cpu

    if p_steps:
        cpu = torch.device("cpu")
        levels = log_level_table(float(p_scale), int(p_steps), int(p_bits), cpu)
        weights = log_weight_table(int(p_steps), int(p_bits), cpu)
    else:
        levels = weights = torch.empty(0)
    per_head = (t.float().contiguous() for t in (s_q, z_q, s_k, z_k))
    return _C_cpu.quant_attention(q.float(), k.float(), v.float(), *per_head, float(s_v), float(z_v), int(a_bits),
                                  float(sm_scale), float(p_scale), int(p_steps), int(p_bits), levels, weights)


def quant_attention_supports(q, *args) -> bool:
    return q.shape[3] <= 256 and (q.device.type != "cpu" or _no_grad_float32(q))


if CPU_EXT_AVAILABLE:
    INT8_LINEAR.register("cpu", int8_linear, ("cpu",), int8_linear_supports)
    FAKE_QUANT_UNIFORM.register("cpu", fake_quant_uniform, ("cpu",), fake_quant_uniform_supports)
    FAKE_QUANT_LOG.register("cpu", fake_quant_log, ("cpu",), fake_quant_log_supports)
    QUANT_ATTENTION.register("cpu", quant_attention, ("cpu",), quant_attention_supports)
else:
    for op in OPS:
        op.unavailable("cpu", CPU_EXT_REASON)
