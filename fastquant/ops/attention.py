"""PyTorch reference twin of the fused quantized attention for inference (``kernels/``
Triton and ``csrc/`` CUDA kernels compute the same thing; this is their tests' oracle).

Contract. Inputs q, k, v [B, H, N, D] (any strides; read as float32), for each head h
the uniform quantizers' steps and zero points of Q and K (``s_q[h]``, ``z_q[h]``,
``s_k[h]``, ``z_k[h]``: one value per head, a per-tensor quantizer repeated) and of V
(``s_v``, ``z_v``: per tensor), all with ``a_bits`` bits; the softmax scale ``sm_scale``;
the quantizer of the probabilities (``p_scale``, ``p_bits``; ``p_steps`` = 1 for log2 or 2
for log-sqrt2, or 0 for a uniform quantizer with step ``p_scale`` and zero point 0). With ``qmax = 2^a_bits - 1`` and ``o = 2^(a_bits - 1)``:

    a_x   = clamp(round(x / s_x) + z_x, 0, qmax) - o          int8 codes (X = Q, K, V)
    c_x   = o - z_x                                          (an integer: x~ = s_x (a_x + c_x))
    T     = a_q a_k^T + c_k rowsum(a_q) + c_q rowsum(a_k)^T + D c_q c_k    int32, exact
    S     = T * ((s_q s_k) * sm_scale)                       float32
    P     = softmax(S) over the keys
    e     = the log quantizer's code of P (quant.functional.log_codes: the nearest level
            p_scale 2^(-e / p_steps) in value, or the zero code 2^p_bits - 1 for 0)
    P'    = 2^(-e / p_steps), 0 for the zero code
            (p_steps = 0, uniform: P' = clamp(round(P / p_scale), 0, 2^p_bits - 1))
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
accordingly (tests/test_kernels_attention.py derives the bound). The GPU kernels take the
log quantizers only (p_steps 1, 2); the CPU kernel (csrc/cpu_int8.cpp) takes all three, with
uniform codes' P' V summed in int32 (exact).
"""
from __future__ import annotations

import functools
import math

import torch

from ..quant.functional import log_codes, log_levels
from .op import declare

__all__ = ["QUANT_ATTENTION", "check_qkv", "log_level_table", "log_weight_table", "quant_attention",
           "torch_quant_attention"]


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
    if p_steps == 0:  # uniform codes, zero point 0
        pp = torch.clamp(torch.round(p / torch.tensor(p_scale, dtype=torch.float32)), 0, zero_code)
    else:
        e = log_codes(p, p_scale, p_steps, zero_code)
        pp = torch.where(e == zero_code, torch.zeros_like(p), torch.exp2(-e.float() / p_steps))
    pv = pp.double() @ a_v.double() + c_v.double() * pp.double().sum(-1, keepdim=True)
    out = (torch.tensor(p_scale, dtype=torch.float32) * s_v) * pv.float()
    return out.transpose(1, 2).contiguous()


@functools.lru_cache(maxsize=256)
def log_level_table(p_scale: float, p_steps: int, p_bits: int, device: torch.device) -> torch.Tensor:
    """The value of every log code, 0 .. zero code (the kernels read them from a table),
    made once per quantizer and device."""
    zero_code = (1 << p_bits) - 1
    codes = torch.arange(zero_code + 1, device=device)
    return log_levels(codes, p_scale, p_steps, zero_code).float().contiguous()


@functools.lru_cache(maxsize=64)
def log_weight_table(p_steps: int, p_bits: int, device: torch.device) -> torch.Tensor:
    """P' of every log code, 2^(-code / p_steps), 0 for the zero code (float32)."""
    zero_code = (1 << p_bits) - 1
    codes = torch.arange(zero_code + 1, device=device)
    return torch.where(codes == zero_code, 0.0, torch.exp2(-codes.float() / p_steps)).contiguous()


def check_qkv(name: str, q, k, v, dtypes: tuple, dtype_rule: str) -> tuple[int, int, int, int]:
    """The input checks the attention ops share: q, k, v 4-D tensors [B, H, N, D] of one
    shape, one dtype among ``dtypes`` (``dtype_rule`` says which in the error) and one
    device, D one of 16, 32, 64, 128. Raises ValueError naming ``name``; returns the shape."""
    for t, label in ((q, "q"), (k, "k"), (v, "v")):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name}: {label} must be a 4-D tensor [B, H, N, D], got {shape}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"{name}: q, k and v must have the same shape [B, H, N, D], got "
                         f"{tuple(q.shape)}, {tuple(k.shape)} and {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in dtypes:
        raise ValueError(f"{name}: q, k and v must {dtype_rule}, got {q.dtype}, {k.dtype} and {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{name}: q, k and v must be on one device, got {q.device}, {k.device} and {v.device}")
    if q.shape[3] not in (16, 32, 64, 128):
        raise ValueError(f"{name}: head dim D must be 16, 32, 64 or 128, got {q.shape[3]} (shape {tuple(q.shape)})")
    return tuple(q.shape)


def quant_attention(q, k, v, s_q, z_q, s_k, z_k, s_v, z_v, a_bits: int, sm_scale: float, p_scale, p_steps: int,
                    p_bits: int, *, backend=None, **options) -> torch.Tensor:
    """The contract above, checked: ``q``, ``k``, ``v`` [B, H, N, D] of one float dtype (fp16,
    bf16 or fp32), D a power of two from 16 to 128; ``s_q``, ``z_q``, ``s_k``, ``z_k``: one
    value per head ([H]); ``s_v``, ``z_v``, ``p_scale``: floats or 1-element tensors;
    ``a_bits`` 2..8; ``sm_scale`` > 0; ``p_steps`` 0 (uniform), 1 (log2) or 2 (log-sqrt2); ``p_bits``
    2..8. Returns [B, N, H, D] (float32 from ``torch``, q's dtype from the kernels).
    ``backend``: None (the tensors' preferred one) or a backend name; ``options`` go to it."""
    name = "quant_attention"
    _, heads, _, _ = check_qkv(name, q, k, v, (torch.float16, torch.bfloat16, torch.float32),
                               "share one dtype among float16, bfloat16 and float32")
    if not 2 <= a_bits <= 8:
        raise ValueError(f"{name}: a_bits must be 2..8, got {a_bits}")
    if p_steps not in (0, 1, 2):
        raise ValueError(f"{name}: p_steps must be 0 (uniform), 1 (log2) or 2 (log-sqrt2), got {p_steps}")
    if not 2 <= p_bits <= 8:
        raise ValueError(f"{name}: p_bits must be 2..8, got {p_bits}")
    if p_steps == 0 and backend in ("triton", "cuda"):
        raise ValueError(f"{name}: the {backend} kernel takes log softmax quantizers only (p_steps 1 or 2), got 0")
    if not (math.isfinite(sm_scale) and sm_scale > 0):
        raise ValueError(f"{name}: sm_scale must be positive and finite, got {sm_scale}")
    per_head = []
    for t, label in ((s_q, "s_q"), (z_q, "z_q"), (s_k, "s_k"), (z_k, "z_k")):
        t = torch.as_tensor(t)
        if t.numel() != heads or t.dim() > 1:
            raise ValueError(f"{name}: {label} must hold one value per head, shape [{heads}], got {tuple(t.shape)}")
        per_head.append(t.to(device=q.device, dtype=torch.float32).contiguous())
    scalars = []
    for x, label in ((s_v, "s_v"), (z_v, "z_v"), (p_scale, "p_scale")):
        t = torch.as_tensor(x, dtype=torch.float32)
        if t.numel() != 1:
            raise ValueError(f"{name}: {label} must be a scalar (a float or a 1-element tensor), "
                             f"got shape {tuple(t.shape)}")
        scalars.append(float(t))
    s_v, z_v, p_scale = scalars
    return QUANT_ATTENTION(q, k, v, *per_head, s_v, z_v, a_bits, float(sm_scale), p_scale, p_steps, p_bits,
                           backend=backend, **options)


def _lib_quant_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s_q: torch.Tensor, z_q: torch.Tensor,
                         s_k: torch.Tensor, z_k: torch.Tensor, s_v: float, z_v: float, a_bits: int, sm_scale: float,
                         p_scale: float, p_steps: int, p_bits: int) -> torch.Tensor:
    return QUANT_ATTENTION(q, k, v, s_q, z_q, s_k, z_k, s_v, z_v, a_bits, sm_scale, p_scale, p_steps, p_bits).float()


def _fake_quant_attention(q, k, v, s_q, z_q, s_k, z_k, s_v, z_v, a_bits, sm_scale, p_scale, p_steps, p_bits):
    b, h, n, d = q.shape
    return q.new_empty((b, n, h, d), dtype=torch.float32)


# Output: float32 from the twin, q's dtype from the GPU kernels (the deployed module casts
# to its input's dtype either way); the library op returns float32.
QUANT_ATTENTION = declare("quant_attention", torch_quant_attention, _fake_quant_attention, _lib_quant_attention)
