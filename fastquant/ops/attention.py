"""PyTorch reference twin of the fused quantized attention for inference (``kernels/``
Triton and ``csrc/`` CUDA kernels compute the same thing; this is their tests' oracle).

Contract. Inputs q, k, v [B, H, N, D] (any strides; read as float32), for each head h
the uniform quantizers' steps and zero points of Q and K (``s_q[h]``, ``z_q[h]``,
``s_k[h]``, ``z_k[h]``: one value per head, a per-tensor quantizer repeated) and of V
(``s_v``, ``z_v``: per tensor), all with ``a_bits`` bits; the softmax scale ``sm_scale``;
the log quantizer of the probabilities (``p_scale``, ``p_steps`` = 1 for log2 or 2 for
log-sqrt2, ``p_bits``). With ``qmax = 2^a_bits - 1`` and ``o = 2^(a_bits - 1)``:

    a_x   = clamp(round(x / s_x) + z_x, 0, qmax) - o          int8 codes (X = Q, K, V)
    c_x   = o - z_x                                          (an integer: x~ = s_x (a_x + c_x))
    T     = a_q a_k^T + c_k rowsum(a_q) + c_q rowsum(a_k)^T + D c_q c_k    int32, exact
    S     = T * ((s_q s_k) * sm_scale)                       float32
    P     = softmax(S) over the keys
    e     = the log quantizer's code of P (LogQuantizer.quantize: the nearest level
            p_scale 2^(-e / p_steps) in value, or the zero code 2^p_bits - 1 for 0)
    P'    = 2^(-e / p_steps), 0 for the zero code
    O     = (p_scale s_v) * (P' a_v + c_v rowsum(P'))        [B, N, H, D]

``T`` is ``(Q~ K~^T) / (s_q s_k)`` computed on integers, so ``S`` is what the fake-quant
attention computes (``QuantAttention``: quantized Q K^T times the scale) up to the
float rounding of its float matmul, and ``O`` is its ``P~ V~``. The output is laid out
[B, N, H, D] (the attention's ``transpose(1, 2)`` done), so ``O.reshape(B, N, H * D)``
feeds the projection.

Kernels differ from this twin only in float rounding: the exponential of the softmax,
the order of its sums, and P' held in fp16 for the tensor-core P V as exact powers of
two (log-sqrt2's odd levels as 2^(-(e+1)/2), their product scaled by sqrt(2) in fp32),
which flushes levels below 2^-24 to zero. A rounding difference can move a probability
lying on a level midpoint to the neighbouring level; tests bound the output difference
accordingly (tests/test_kernels_attention.py derives the bound).
"""
from __future__ import annotations

import torch

__all__ = ["torch_quant_attention", "log_codes"]


def log_codes(p: torch.Tensor, scale: float, steps: int, zero_code: int) -> torch.Tensor:
    """Codes of ``fastquant.quantizers.LogQuantizer.quantize`` (same float operations), int32."""
    p = p.float()
    hi = torch.floor(-torch.log2((p / scale).clamp_min(1e-30)) * steps).clamp(0, zero_code)
    lo = (hi + 1).clamp_max(zero_code)

    def level(c):
        val = scale * torch.exp2(-c / steps)
        return torch.where(c == zero_code, torch.zeros_like(val), val)

    code = torch.where((level(hi) - p).abs() <= (p - level(lo)).abs(), hi, lo)
    return code.to(torch.int32)


def _codes(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor, qmax: int, o: int) -> torch.Tensor:
    return (torch.clamp(torch.round(x.float() / s) + z, 0, qmax) - o).to(torch.int64)


def torch_quant_attention(q, k, v, s_q, z_q, s_k, z_k, s_v, z_v, a_bits: int, sm_scale: float,
                          p_scale: float, p_steps: int, p_bits: int) -> torch.Tensor:
    """The contract above: q, k, v [B, H, N, D]; s_q, z_q, s_k, z_k [H]; s_v, z_v scalars
    (floats or 0-d tensors). Returns float32 [B, N, H, D]."""
    B, H, N, D = q.shape
    qmax, o = (1 << a_bits) - 1, 1 << (a_bits - 1)
    per_head = dict(dtype=torch.float32, device=q.device)
    s_q, z_q = torch.as_tensor(s_q, **per_head).reshape(1, H, 1, 1), torch.as_tensor(z_q, **per_head).reshape(1, H, 1, 1)
    s_k, z_k = torch.as_tensor(s_k, **per_head).reshape(1, H, 1, 1), torch.as_tensor(z_k, **per_head).reshape(1, H, 1, 1)
    s_v, z_v = torch.as_tensor(s_v, **per_head).reshape(()), torch.as_tensor(z_v, **per_head).reshape(())
    a_q, a_k, a_v = _codes(q, s_q, z_q, qmax, o), _codes(k, s_k, z_k, qmax, o), _codes(v, s_v, z_v, qmax, o)
    c_q, c_k, c_v = (o - z_q).to(torch.int64), (o - z_k).to(torch.int64), (o - z_v).to(torch.int64)
    t = (a_q @ a_k.transpose(-2, -1) + c_k * a_q.sum(-1, keepdim=True)
         + c_q * a_k.sum(-1).unsqueeze(-2) + D * c_q * c_k)
    s = t.to(torch.float32) * ((s_q * s_k) * torch.tensor(sm_scale, dtype=torch.float32))
    p = torch.softmax(s, dim=-1)
    zero_code = (1 << p_bits) - 1
    e = log_codes(p, p_scale, p_steps, zero_code)
    pp = torch.where(e == zero_code, torch.zeros_like(p), torch.exp2(-e.float() / p_steps))
    pv = pp.double() @ a_v.double() + c_v.double() * pp.double().sum(-1, keepdim=True)
    out = (torch.tensor(p_scale, dtype=torch.float32) * s_v) * pv.float()
    return out.transpose(1, 2).contiguous()
