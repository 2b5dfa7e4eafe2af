"""Fused quantized attention for inference in Triton: softmax(Q~ K~^T * scale), log-quantized,
times V~, with Q, K and V quantized inside the kernel.

Contract: ``fastquant.ops.attention`` (its PyTorch twin ``torch_quant_attention`` is the
tests' oracle). In short, for each batch b and head h, with ``qmax = 2^a_bits - 1``,
``o = 2^(a_bits - 1)`` and ``Z = 2^p_bits - 1`` (the log quantizer's zero code):

    a_x = clamp(round(x / s_x) + z_x, 0, qmax) - o     int8 codes of Q, K (per head), V (per tensor)
    T   = a_q a_k^T + c_k rowsum(a_q) + c_q rowsum(a_k)^T + D c_q c_k     int32, c_x = o - z_x
    P   = softmax(T * ((s_q s_k) * sm_scale)) over the keys
    e   = the log quantizer's code of P (nearest level p_scale 2^(-e/p_steps) in value; Z for 0)
    O   = (p_scale s_v) * sum_j 2^(-e_j/p_steps) (a_v[j] + c_v)     (the zero code adds nothing)

stored as out[b, n, h, :] ([B, N, H, D], the layout the output projection reads).

How the kernel computes it (one program per BLOCK_M query rows of one (b, h)):

- The Q tile is quantized once, to int8 codes, with ``tl.div_rn`` and round half to even,
  so the codes equal PyTorch's bit for bit; K and V tiles are quantized the same way as they
  are loaded (K once per pass, V in pass 2), so no quantized copy goes through memory. ``a_q a_k^T`` is an int8 ``tl.dot`` accumulating in int32 (tensor cores on
  sm_80 and sm_90); the zero-point corrections are a per-row and a per-column integer term.
  T is exact.
- The log quantizer needs the final probability, so the keys are walked twice. Pass 1 finds
  each row's maximum of T (in integers: the softmax scale is positive) and the sum
  ``l = sum_j exp(S_j - S_max)``, rescaled online as the maximum grows. Pass 2 recomputes T
  and needs no exponential: ``w = -p_steps log2(P / p_scale)`` is one fused multiply-add of
  the exact integer ``T - T_max`` (``w = (T_max - T) (p_steps log2(e) scale) + p_steps
  log2(l p_scale)``), and the nearest level in value is ``floor(w)``, plus one when
  ``w - floor(w)`` is past the midpoint of two neighbouring levels, which sits at a fixed
  fraction of the octave: ``p_steps log2(2 / (1 + 2^(-1/p_steps)))``. The zero code is
  taken, as the reference's clamp of its codes does, when ``w >= Z``; ``P / p_scale`` is
  floored at 1e-30 like the reference's (``w`` capped at ``p_steps log2(1e30)``).
  The level ``2^(-e/p_steps)`` is a power of two 2^-n, assembled from exponent bits and
  exact in fp16 down to 2^-24, for the tensor-core product ``P' (a_v + c_v)`` (fp16
  operands, fp32 accumulation); log-sqrt2's odd codes are float32(2^-0.5) 2^-n (as
  ``torch.exp2`` gives them), so their powers of two go to a second accumulator that is
  multiplied by float32(2^-0.5) at the end, rather than rounding 2^-0.5 to fp16's 11 bits.
  V's codes enter as ``q_v - z_v = a_v + c_v`` (integers within +-255, exact in fp16),
  which folds the reference's ``c_v rowsum(P')`` into the same product.
- Keys beyond N are left out of the row maximum and sum in pass 1 and get the zero code in
  pass 2, so they add nothing. Rows beyond N are computed and not stored.

Against the twin the kernel differs only in float rounding (see the contract): P agrees
to about 1e-6 relative, so a code can differ only where P lies that close to the midpoint
of two levels (or to the zero code's threshold); P' is exact for both bases down to
2^-24 (fp16 flushes smaller levels to 0); the P' V sum is fp32.
"""
from __future__ import annotations

import math

import triton
import triton.language as tl

from . import KernelSpec, check_device, is_interpreted
from ._attention_common import head_bases, head_qparams
from .quant_int8 import _round_half_to_even

# Where the midpoint (in value) of neighbouring levels 2^(-c/k) and 2^(-(c+1)/k) lies
# between them, in w = -k log2(x) units: w - floor(w) beyond it rounds to the smaller one.
_MID_LOG2 = tl.constexpr(math.log2(4.0 / 3.0))                          # k = 1
_MID_SQRT2 = tl.constexpr(2.0 * math.log2(2.0 / (1.0 + 2.0 ** -0.5)))  # k = 2
# -log2(1e-30): the reference floors P / p_scale at 1e-30 before its logarithm.
_W_CAP = tl.constexpr(-math.log2(1e-30))
_LOG2E = tl.constexpr(math.log2(math.e))
# 2^-0.5, rounded to float32 where used (0x3F3504F3, which is torch.exp2(-0.5)).
_RSQRT2 = tl.constexpr(2.0 ** -0.5)
# Pass 1's "minus infinity" for the integer row maximum (|T| < 2^24 always).
_T_NEG = tl.constexpr(-(1 << 30))
# Codes beyond this give P' below 2^-25, which fp16 rounds to 0; capping keeps the
# exponent arithmetic inside normal float32.
_CODE_CAP = tl.constexpr(60)


@triton.jit
def _uniform_codes(x, s, z, QMAX: tl.constexpr):
    """clamp(round_half_even(x / s) + z, 0, QMAX) as float32 (integers 0..QMAX)."""
    q = _round_half_to_even(tl.div_rn(x, s)) + z
    return tl.minimum(tl.maximum(q, 0.0), QMAX)


@triton.jit
def _key_tile_t(k_base, stride_kn, start, a_q, row_term, c_q, s_k, z_k, N,
                QMAX: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr):
    """T + row_term (int32 [BLOCK_M, BLOCK_N]) for the keys start .. start + BLOCK_N - 1,
    and which of them exist (< N). The key tile is loaded [BLOCK_N, D] (rows contiguous),
    quantized, and transposed as the dot's operand."""
    offs_n = start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    key_ok = offs_n < N
    k = tl.load(k_base + offs_n[:, None].to(tl.int64) * stride_kn + offs_d[None, :], mask=key_ok[:, None],
                other=0.0).to(tl.float32)
    a_k = (_uniform_codes(k, s_k, z_k, QMAX) - (QMAX + 1) // 2).to(tl.int32)
    col_term = c_q * tl.sum(a_k, axis=1)
    t = tl.dot(a_q, tl.trans(a_k.to(tl.int8)), out_dtype=tl.int32)
    return t + row_term[:, None] + col_term[None, :], key_ok


@triton.jit
def _quant_attention_kernel(
    # q, k, v [B, H, N, D] (unit stride along D), out [B, N, H, D];
    # per head: s_q, z_q, s_k, z_k fp32 [H]; per tensor: s_v, z_v, p_scale fp32 [1].
    q_ptr, k_ptr, v_ptr, out_ptr, sq_ptr, zq_ptr, sk_ptr, zk_ptr, sv_ptr, zv_ptr, ps_ptr,
    # the softmax scale, the sequence length, the number of heads
    sm_scale, N, H,
    # strides in elements: (batch, head, token) of q, k, v; (batch, token, head) of out
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_ob, stride_on, stride_oh,
    # 2^a_bits - 1; log2 (1) or log-sqrt2 (2); 2^p_bits - 1; the head dim D; the tiles
    QMAX: tl.constexpr, P_STEPS: tl.constexpr, ZERO_CODE: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid (cdiv(N, BLOCK_M), B * H): program (i, b * H + h) computes out[b, i*BLOCK_M :
    (i+1)*BLOCK_M, h, :] in two passes over the keys (module docstring)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b, h, q_base, k_base, v_base = head_bases(pid_bh, H, q_ptr, k_ptr, v_ptr, stride_qb, stride_qh, stride_kb,
                                              stride_kh, stride_vb, stride_vh)

    o: tl.constexpr = (QMAX + 1) // 2
    s_q, z_q, s_k, z_k, s_v, z_v = head_qparams(sq_ptr, zq_ptr, sk_ptr, zk_ptr, sv_ptr, zv_ptr, h)
    p_scale = tl.load(ps_ptr)
    c_q = o - z_q.to(tl.int32)
    c_k = o - z_k.to(tl.int32)
    # softmax(S) = 2^((T - T_max) * qk2) / l: the scale rounded as the reference rounds it
    qk2 = ((s_q * s_k) * sm_scale) * _LOG2E

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < N
    q = tl.load(q_base + offs_m[:, None].to(tl.int64) * stride_qn + offs_d[None, :], mask=row_ok[:, None],
                other=0.0).to(tl.float32)
    a_q = (_uniform_codes(q, s_q, z_q, QMAX) - o).to(tl.int32)
    row_term = c_k * tl.sum(a_q, axis=1) + HEAD_DIM * c_q * c_k
    a_q = a_q.to(tl.int8)

    # Pass 1: row maximum of T (integer) and l = sum_j 2^((T_j - T_max) qk2), online.
    t_max = tl.full([BLOCK_M], _T_NEG, tl.int32)
    l_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        t, key_ok = _key_tile_t(k_base, stride_kn, start, a_q, row_term, c_q, s_k, z_k, N,
                                QMAX, HEAD_DIM, BLOCK_N)
        t = tl.where(key_ok[None, :], t, _T_NEG)
        new_max = tl.maximum(t_max, tl.max(t, axis=1))
        p = tl.exp2((t - new_max[:, None]).to(tl.float32) * qk2)
        p = tl.where(key_ok[None, :], p, 0.0)
        l_sum = l_sum * tl.exp2((t_max - new_max).to(tl.float32) * qk2) + tl.sum(p, axis=1)
        t_max = new_max

    # Pass 2: w = -P_STEPS log2(P / p_scale) = (T_max - T) * w_scale + w_bias, its log code,
    # and acc += P' (q_v - z_v). T_max moves into the per-row term so T - T_max is one sum.
    w_scale = -(qk2 * P_STEPS)
    w_bias = tl.log2(l_sum * p_scale) * P_STEPS
    row_term = row_term - t_max
    if P_STEPS == 1:
        mid = _MID_LOG2
    else:
        mid = _MID_SQRT2
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    acc_odd = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)  # log-sqrt2's odd codes
    for start in range(0, N, BLOCK_N):
        t, key_ok = _key_tile_t(k_base, stride_kn, start, a_q, row_term, c_q, s_k, z_k, N,
                                QMAX, HEAD_DIM, BLOCK_N)
        w = tl.minimum(t.to(tl.float32) * w_scale + w_bias[:, None], _W_CAP * P_STEPS)
        hi = tl.floor(w)
        code = hi + tl.where(w - hi > mid, 1.0, 0.0)
        code = tl.minimum(tl.maximum(code, 0.0), ZERO_CODE - 1.0)
        zero = (w >= ZERO_CODE) | (key_ok[None, :] == 0)  # the zero code, or no key
        e = tl.minimum(code, _CODE_CAP).to(tl.int32)
        # P' = 2^(-e / P_STEPS): a power of two 2^-n from exponent bits (exact in fp16 down
        # to 2^-24), times float32(2^-0.5) for log-sqrt2's odd codes, which is applied to a
        # second accumulator after the loop rather than rounded into fp16.
        n_oct = e // P_STEPS
        pow2 = ((127 - n_oct) << 23).to(tl.float32, bitcast=True)  # biased exponent 127 - n

        offs_n = start + tl.arange(0, BLOCK_N)
        v = tl.load(v_base + offs_n[:, None].to(tl.int64) * stride_vn + offs_d[None, :],
                    mask=(offs_n < N)[:, None], other=0.0).to(tl.float32)
        v_int = (_uniform_codes(v, s_v, z_v, QMAX) - z_v).to(tl.float16)  # a_v + c_v
        if P_STEPS == 1:
            acc = tl.dot(tl.where(zero, 0.0, pow2).to(tl.float16), v_int, acc, out_dtype=tl.float32)
        else:
            odd = (e & 1) == 1
            acc = tl.dot(tl.where(zero | odd, 0.0, pow2).to(tl.float16), v_int, acc, out_dtype=tl.float32)
            acc_odd = tl.dot(tl.where(zero | (odd == 0), 0.0, pow2).to(tl.float16), v_int, acc_odd,
                             out_dtype=tl.float32)

    if P_STEPS == 2:
        acc = acc + acc_odd * _RSQRT2
    out = acc * (p_scale * s_v)
    out_ptrs = (out_ptr + b * stride_ob + h.to(tl.int64) * stride_oh
                + offs_m[:, None].to(tl.int64) * stride_on + offs_d[None, :])
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


INTERPRETED = is_interpreted(_quant_attention_kernel)

_FLOAT_DTYPES = ("float16", "bfloat16", "float32")


def triton_quant_attention(q, k, v, s_q, z_q, s_k, z_k, s_v, z_v, a_bits: int, sm_scale: float,
                           p_scale, p_steps: int, p_bits: int, out_dtype=None, *,
                           blocks: tuple[int, int] | None = None):
    """The fused quantized attention of ``fastquant.ops.attention`` (its docstring states the
    contract; ``fastquant.ops.attention.quant_attention`` checks the arguments before they
    reach this launcher).

    ``q``, ``k``, ``v``: [B, H, N, D] tensors of one float dtype (fp16, bf16 or fp32), any
    strides (a last dimension without unit stride is copied), D a power of two from 16 to
    128; on a CUDA device, or on the CPU when Triton runs in interpreter mode. ``s_q``,
    ``z_q``, ``s_k``, ``z_k``: [H] steps and integer zero points of Q and K; ``s_v``,
    ``z_v``, ``p_scale``: floats or 1-element tensors. Returns [B, N, H, D] in ``out_dtype``
    (default q's dtype). ``blocks`` overrides (BLOCK_M, BLOCK_N), powers of two, at least 16.
    """
    import torch

    name = "triton_quant_attention"
    bsz, heads, n, d = q.shape
    out_dtype = out_dtype or q.dtype
    if str(out_dtype).removeprefix("torch.") not in _FLOAT_DTYPES:
        raise ValueError(f"{name}: out_dtype must be float16, bfloat16 or float32, got {out_dtype}")
    if blocks is not None and (len(blocks) != 2 or any(x < 16 or x & (x - 1) for x in blocks)):
        raise ValueError(f"{name}: blocks must be two powers of two, at least 16, got {blocks}")
    check_device(q, name, INTERPRETED)
    dev = q.device
    per_head = [torch.as_tensor(t).to(device=dev, dtype=torch.float32).reshape(heads).contiguous()
                for t in (s_q, z_q, s_k, z_k)]
    scalars = [torch.as_tensor(x, dtype=torch.float32).reshape(1).to(dev) for x in (s_v, z_v, p_scale)]
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = torch.empty((bsz, n, heads, d), dtype=out_dtype, device=dev)
    if out.numel() == 0:
        return out
    # 128 query rows amortize the K and V tiles' quantization over more rows. With 8 warps
    # ptxas keeps D = 64's 128x64 and 64x64 tiles in registers without spilling (sm_80 and
    # sm_90); D = 128 spills least with 64x64.
    block_m, block_n = blocks or ((128 if n > 64 and d <= 64 else 64), 64)
    grid = (triton.cdiv(n, block_m), bsz * heads)
    _quant_attention_kernel[grid](
        q, k, v, out, *per_head, *scalars,
        float(sm_scale), n, heads,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        QMAX=(1 << a_bits) - 1, P_STEPS=p_steps, ZERO_CODE=(1 << p_bits) - 1, HEAD_DIM=d,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=8 if block_m * block_n >= 64 * 64 else 4, num_stages=2)
    return out


def _spec(dtype: str, out: str, a_bits: int, p_steps: int, p_bits: int, head_dim: int,
          block_m: int, block_n: int, warps: int) -> KernelSpec:
    ptrs = {"q_ptr": f"*{dtype}", "k_ptr": f"*{dtype}", "v_ptr": f"*{dtype}", "out_ptr": f"*{out}"}
    ptrs.update({p: "*fp32" for p in ("sq_ptr", "zq_ptr", "sk_ptr", "zk_ptr", "sv_ptr", "zv_ptr", "ps_ptr")})
    ints = ["N", "H", "stride_qb", "stride_qh", "stride_qn", "stride_kb", "stride_kh", "stride_kn",
            "stride_vb", "stride_vh", "stride_vn", "stride_ob", "stride_on", "stride_oh"]
    constexprs = {"QMAX": (1 << a_bits) - 1, "P_STEPS": p_steps, "ZERO_CODE": (1 << p_bits) - 1,
                  "HEAD_DIM": head_dim, "BLOCK_M": block_m, "BLOCK_N": block_n}
    return KernelSpec(
        kernel=_quant_attention_kernel,
        signature={**ptrs, "sm_scale": "fp32", **{i: "i32" for i in ints}, **{c: "constexpr" for c in constexprs}},
        constexprs=constexprs,
        label=f"{dtype}->{out},a{a_bits},{'log2' if p_steps == 1 else 'sqrt2'},p{p_bits},d{head_dim},"
              f"{block_m}x{block_n}",
        options={"num_warps": warps, "num_stages": 2},
    )


# The wrapper's launch configurations at ViT shapes (D = 64; 197 or 257 tokens: 128-row
# query tiles) for each input type and both log bases, the short-sequence tile (N <= 64),
# and the other head dims (D = 128 takes 64-row tiles).
COMPILE_SPECS = [
    _spec("fp16", "fp16", 8, 1, 4, 64, 128, 64, 8),
    _spec("fp16", "fp16", 6, 2, 6, 64, 128, 64, 8),
    _spec("fp32", "fp32", 8, 2, 8, 64, 128, 64, 8),
    _spec("bf16", "bf16", 4, 1, 4, 64, 128, 64, 8),
    _spec("fp16", "fp16", 4, 2, 4, 64, 64, 64, 8),
    _spec("fp16", "fp16", 8, 1, 8, 32, 128, 64, 8),
    _spec("fp16", "fp16", 8, 2, 4, 128, 64, 64, 8),
]
