"""Fused fake-quant attention for reconstruction training in Triton, forward and backward.

Contract: ``fastquant.ops.fq_attention`` (its PyTorch twin ``torch_fq_attention`` is the
tests' oracle; ``fastquant.ops.fq_attention.fq_attention`` checks the arguments and holds the
autograd Function that calls these two launchers). In short, for each batch b and head h:

    x~  = clamp(round(x / s_x) + z_x, 0, qmax) - z_x) * s_x, or x where keep_x    X = Q, K (step per head), V
    S   = (Q~ K~^T) * sm_scale
    P   = softmax(S) over the keys
    P~  = the log quantizer's level of P, straight-through; P where keep_p
    O   = P~ V~                                                            [B, H, N, D]

and the gradients autograd gives through those operations: LSQ for the steps,
straight-through for the values inside the clipping range (or kept by QDrop), the
identity for the log quantizer.

How the kernels compute it (every kernel tiles queries by BLOCK_M and keys by BLOCK_N,
and every product is an fp32 ``tl.dot`` with ``input_precision="ieee"``, that is true
fp32 FMA, not tf32: the log quantizer decides levels on P, so S must be as close to the
reference's fp32 matmul as the interpreter tests can bound):

- Q, K and V tiles are quantized as they are loaded (``tl.div_rn`` and round half to even,
  so ``x / s``, the codes and x~ equal PyTorch's bit for bit; QDrop's keep masks are uint8
  tiles). No quantized copy goes through memory; each kernel re-quantizes what it loads.
- Forward, one program per (query block, b * h): pass 1 over the keys finds each row's
  maximum ``m`` of S and ``l = sum_j exp(S_j - m)`` (rescaled online); pass 2 recomputes S,
  takes ``P = exp(S - m) * (1 / l)``, its log level as ``LogQuantizer.quantize`` finds it
  (the same float operations on P: the level at or above P and the one below, nearest in
  value), the straight-through value ``(P~ - P) + P`` and QDrop's ``P`` where keep_p, and
  accumulates ``O += P~ V~``. It also accumulates ``F = P V~`` (the float probabilities'
  output), which the backward needs for softmax's row term. Stored: O, F [B, H, N, D], m
  and l [B, H, N].
- Backward, softmax's gradient is ``dS = P * (dP - delta)`` with ``dP = dO V~^T`` (the log
  quantizer and QDrop's lerp pass dP through unchanged) and ``delta_i = sum_j dP_ij P_ij =
  dO_i . F_i``: the float P of the forward's softmax, not P~, hence F.
  Kernel 1, one program per (query block, b * h): delta from dO and F (stored for kernel
  2), then over the keys: S and P again (from m and l), dP, dS, ``dQ~ += dS K~``; then the
  LSQ chain of Q. Kernel 2, one program per (key block, b * h), after kernel 1: over the
  queries, S, P and P~ again (same tiles and operations as the forward, so the same codes),
  ``dV~ += P~^T dO``, ``dK~ += dS^T Q~``; then the LSQ chains of K and V.
- The LSQ chain of an operand x (autograd of ``(clamp(round_ste(x/s) + z, 0, qmax) - z) * s``
  and of QDrop's ``lerp(x~, x, keep)``), per element, with g = dx~:
  dx = g where kept or ``0 <= round(x/s) + z <= qmax``, else 0;
  ds += g * (code - z - x/s) inside the range, g * (code - z) clipped (code = 0 or qmax),
  nothing where kept. Each program writes its share of ds; the wrapper sums the shares
  (no atomics: the result is deterministic).

Rows and keys beyond N are loaded as zeros; keys beyond N get probability 0 and P~ 0,
rows beyond N are computed and not stored (their dO is 0, so they add nothing).

Memory kept for the backward: q, k, v (the caller's), F (4 B H N D bytes), m and l
(8 B H N bytes) and the QDrop masks as uint8, B H N (3 D + N) bytes, of which keep_p's
B H N^2 dominates (7.5 MB for ViT-S's 6 heads at batch 32 and 197 tokens). The reference
path's autograd keeps several N x N float32 tensors instead (P, P~, the float keep mask).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from . import KernelSpec, check_device, is_interpreted
from ._attention_common import head_bases, head_qparams
from .quant_int8 import _round_half_to_even

# 2^-0.5 rounded to float32 (torch.exp2(-0.5)): log-sqrt2's odd levels are it times 2^-n.
_RSQRT2 = tl.constexpr(2.0 ** -0.5)
# LogQuantizer floors P / p_scale at 1e-30, so codes stay below 100 * p_steps + 1 and the
# levels 2^-n are normal floats; the cap only keeps the exponent arithmetic in range.
_MAX_OCTAVE = tl.constexpr(126)
# Every tl.dot multiplies fp32 tiles in true fp32 (FMA), not tf32 (10-bit mantissas would
# move S by about 1e-3 relative and flip many log levels against the reference's fp32
# matmul). The kernels take it as a constexpr so that "tf32x3" can be measured on a GPU.
_DOT_PRECISION = "ieee"


@triton.jit
def _fake_quant(x, s, z, QMAX: tl.constexpr):
    """(clamp(round_half_even(x / s) + z, 0, QMAX) - z) * s, as fake_quant_uniform computes it."""
    code = tl.minimum(tl.maximum(_round_half_to_even(tl.div_rn(x, s)) + z, 0.0), QMAX)
    return (code - z) * s


@triton.jit
def _load_rows(base, stride_n, offs_n, N, HEAD_DIM: tl.constexpr):
    """Rows offs_n of a [N, HEAD_DIM] matrix with unit column stride; zeros beyond N."""
    offs_d = tl.arange(0, HEAD_DIM)
    return tl.load(base + offs_n[:, None].to(tl.int64) * stride_n + offs_d[None, :],
                   mask=(offs_n < N)[:, None], other=0.0)


@triton.jit
def _load_keep(base, offs_r, offs_c, N, NCOLS):
    """A QDrop keep tile (True: keep the float value) of a contiguous uint8 [N, NCOLS] mask."""
    ptrs = base + offs_r[:, None].to(tl.int64) * NCOLS + offs_c[None, :]
    return tl.load(ptrs, mask=(offs_r < N)[:, None] & (offs_c < NCOLS)[None, :], other=0) != 0


@triton.jit
def _quant_rows(base, stride_n, keep_base, offs_n, N, s, z,
                QMAX: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_KEEP: tl.constexpr):
    """x~ for rows offs_n of an operand: fake-quantized, the float value where kept."""
    x = _load_rows(base, stride_n, offs_n, N, HEAD_DIM)
    xq = _fake_quant(x, s, z, QMAX)
    if HAS_KEEP:
        xq = tl.where(_load_keep(keep_base, offs_n, tl.arange(0, HEAD_DIM), N, HEAD_DIM), x, xq)
    return xq


@triton.jit
def _log_level(code, p_scale, P_STEPS: tl.constexpr, ZERO_CODE: tl.constexpr):
    """LogQuantizer.dequantize: p_scale 2^(-code / P_STEPS), 0 for the zero code. The power of
    two is built from exponent bits (exact), log-sqrt2's odd codes times float32(2^-0.5)
    (exact scaling, so equal to torch.exp2's correctly rounded 2^(-n - 1/2))."""
    c = code.to(tl.int32)
    n = tl.minimum(c // P_STEPS, _MAX_OCTAVE)
    level = ((127 - n) << 23).to(tl.float32, bitcast=True)
    if P_STEPS == 2:
        level = tl.where((c & 1) == 1, level * _RSQRT2, level)
    return tl.where(c == ZERO_CODE, 0.0, p_scale * level)


@triton.jit
def _log_quant_st(p, p_scale, P_STEPS: tl.constexpr, ZERO_CODE: tl.constexpr):
    """The straight-through output ``(P~ - P) + P`` of LogQuantizer.forward, with P~ found by
    the float operations of LogQuantizer.quantize: the level at or above P and the one below
    it, whichever is nearer in value (the upper one on a tie)."""
    ratio = tl.maximum(tl.div_rn(p, p_scale), 1e-30)
    hi = tl.minimum(tl.maximum(tl.floor(-tl.log2(ratio) * P_STEPS), 0.0), ZERO_CODE)
    lo = tl.minimum(hi + 1.0, ZERO_CODE)
    hi_val = _log_level(hi, p_scale, P_STEPS, ZERO_CODE)
    lo_val = _log_level(lo, p_scale, P_STEPS, ZERO_CODE)
    pq = tl.where(tl.abs(hi_val - p) <= tl.abs(p - lo_val), hi_val, lo_val)
    return (pq - p) + p


@triton.jit
def _exp(x, LIBDEVICE: tl.constexpr):
    """exp(x). On a GPU, libdevice's expf (within 2 ulp): tl.exp is ex2.approx(x log2(e)),
    whose rounding of the product alone costs 2^-24 |x| relative (1e-6 at x = -20), and P's
    accuracy decides how many log levels differ from the reference's. The interpreter runs
    tl.exp (numpy's exp), since libdevice does not run there."""
    if LIBDEVICE:
        return libdevice.exp(x)
    else:
        return tl.exp(x)


@triton.jit
def _scores(q_t, k_t, sm_scale, DOT_PRECISION: tl.constexpr):
    """S = (Q~ K~^T) * sm_scale for a [BLOCK_M, D] and a [BLOCK_N, D] tile, in fp32."""
    return tl.dot(q_t, tl.trans(k_t), input_precision=DOT_PRECISION) * sm_scale


@triton.jit
def _probs(q_t, k_t, m_i, inv_l, key_ok, sm_scale, DOT_PRECISION: tl.constexpr, LIBDEVICE: tl.constexpr):
    """P = exp(S - m) * (1 / l) of a query tile and a key tile, 0 for keys beyond N: the same
    operations in every kernel, so that the backward's P (and P~) are the forward's."""
    s = _scores(q_t, k_t, sm_scale, DOT_PRECISION)
    return tl.where(key_ok[None, :], _exp(s - m_i[:, None], LIBDEVICE) * inv_l[:, None], 0.0)


@triton.jit
def _lsq_backward(g, x, s, z, keep, QMAX: tl.constexpr, HAS_KEEP: tl.constexpr):
    """dx and this tile's share of ds for x~ = lerp(fake_quant(x, s, z), x, keep), given
    g = dx~ (module docstring): ds's per-element factor is d x~ / ds = code - z - x/s inside
    the clipping range, code - z (z or qmax - z, negated or not) outside it."""
    u = tl.div_rn(x, s)
    r = _round_half_to_even(u) + z
    inside = (r >= 0.0) & (r <= QMAX)
    code = tl.minimum(tl.maximum(r, 0.0), QMAX)
    ds = g * (code - z - tl.where(inside, u, 0.0))
    if HAS_KEEP:
        dx = tl.where(keep | inside, g, 0.0)
        ds = tl.where(keep, 0.0, ds)
    else:
        dx = tl.where(inside, g, 0.0)
    return dx, tl.sum(tl.sum(ds, axis=1), axis=0)


@triton.jit
def _fq_attention_fwd_kernel(
    # q, k, v [B, H, N, D] fp32 with unit stride along D; out [B, H, N, D] by strides;
    # f (= P V~) [B, H, N, D] contiguous; m, l [B, H, N] (row max of S, sum of exp(S - m))
    q_ptr, k_ptr, v_ptr, out_ptr, f_ptr, m_ptr, l_ptr,
    # steps and zero points: s_q, z_q, s_k, z_k fp32 [H]; s_v, z_v, p_scale fp32 [1]
    sq_ptr, zq_ptr, sk_ptr, zk_ptr, sv_ptr, zv_ptr, ps_ptr,
    # QDrop keep masks, uint8 contiguous: [B, H, N, D] for q, k, v; [B, H, N, N] for P
    keep_q_ptr, keep_k_ptr, keep_v_ptr, keep_p_ptr,
    # the softmax scale, the sequence length, the number of heads
    sm_scale, N, H,
    # strides in elements, (batch, head, token), of q, k, v and out
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
    # 2^a_bits - 1; log2 (1) or log-sqrt2 (2); the log quantizer's zero code; D; the tiles
    QMAX: tl.constexpr, P_STEPS: tl.constexpr, ZERO_CODE: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    # which operands have a QDrop mask; tl.dot's input precision ("ieee": fp32 FMA); libdevice's
    # exp (GPU) or tl.exp (interpreter)
    KEEP_Q: tl.constexpr, KEEP_K: tl.constexpr, KEEP_V: tl.constexpr, KEEP_P: tl.constexpr,
    DOT_PRECISION: tl.constexpr, LIBDEVICE: tl.constexpr,
):
    """Grid (cdiv(N, BLOCK_M), B * H): O, F, m and l of BLOCK_M query rows of one (b, h), in
    two passes over the keys (module docstring)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b, h, q_base, k_base, v_base = head_bases(pid_bh, H, q_ptr, k_ptr, v_ptr, stride_qb, stride_qh, stride_kb,
                                              stride_kh, stride_vb, stride_vh)
    bh = pid_bh.to(tl.int64)
    keep_q_base = keep_q_ptr + bh * N * HEAD_DIM
    keep_k_base = keep_k_ptr + bh * N * HEAD_DIM
    keep_v_base = keep_v_ptr + bh * N * HEAD_DIM
    keep_p_base = keep_p_ptr + bh * N * N
    s_q, z_q, s_k, z_k, s_v, z_v = head_qparams(sq_ptr, zq_ptr, sk_ptr, zk_ptr, sv_ptr, zv_ptr, h)
    p_scale = tl.load(ps_ptr)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < N
    q_t = _quant_rows(q_base, stride_qn, keep_q_base, offs_m, N, s_q, z_q, QMAX, HEAD_DIM, KEEP_Q)

    # Pass 1: m = max_j S_j and l = sum_j exp(S_j - m), online.
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        k_t = _quant_rows(k_base, stride_kn, keep_k_base, offs_n, N, s_k, z_k, QMAX, HEAD_DIM, KEEP_K)
        s = tl.where((offs_n < N)[None, :], _scores(q_t, k_t, sm_scale, DOT_PRECISION), float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        l_i = l_i * _exp(m_i - m_new, LIBDEVICE) + tl.sum(_exp(s - m_new[:, None], LIBDEVICE), axis=1)
        m_i = m_new

    # Pass 2: P, its straight-through log level (or P where kept), O += P~ V~, F += P V~.
    inv_l = 1.0 / l_i
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    acc_f = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        key_ok = offs_n < N
        k_t = _quant_rows(k_base, stride_kn, keep_k_base, offs_n, N, s_k, z_k, QMAX, HEAD_DIM, KEEP_K)
        v_t = _quant_rows(v_base, stride_vn, keep_v_base, offs_n, N, s_v, z_v, QMAX, HEAD_DIM, KEEP_V)
        p = _probs(q_t, k_t, m_i, inv_l, key_ok, sm_scale, DOT_PRECISION, LIBDEVICE)
        pt = _log_quant_st(p, p_scale, P_STEPS, ZERO_CODE)
        if KEEP_P:
            pt = tl.where(_load_keep(keep_p_base, offs_m, offs_n, N, N), p, pt)
        pt = tl.where(key_ok[None, :], pt, 0.0)
        acc = tl.dot(pt, v_t, acc, input_precision=DOT_PRECISION)
        acc_f = tl.dot(p, v_t, acc_f, input_precision=DOT_PRECISION)

    offs_d = tl.arange(0, HEAD_DIM)
    out_ptrs = (out_ptr + b * stride_ob + h.to(tl.int64) * stride_oh
                + offs_m[:, None].to(tl.int64) * stride_on + offs_d[None, :])
    tl.store(out_ptrs, acc, mask=row_ok[:, None])
    f_ptrs = f_ptr + bh * N * HEAD_DIM + offs_m[:, None].to(tl.int64) * HEAD_DIM + offs_d[None, :]
    tl.store(f_ptrs, acc_f, mask=row_ok[:, None])
    tl.store(m_ptr + bh * N + offs_m, m_i, mask=row_ok)
    tl.store(l_ptr + bh * N + offs_m, l_i, mask=row_ok)


@triton.jit
def _fq_attention_bwd_dq_kernel(
    # inputs as the forward's; do [B, H, N, D] (unit stride along D) by strides; f, m, l as
    # the forward stored them; dq [B, H, N, D] contiguous; delta [B, H, N] (written here,
    # read by the dk/dv kernel); dsq_part [B * H, cdiv(N, BLOCK_M)]: each program's share of ds_q
    q_ptr, k_ptr, v_ptr, do_ptr, f_ptr, m_ptr, l_ptr, dq_ptr, delta_ptr, dsq_part_ptr,
    sq_ptr, zq_ptr, sk_ptr, zk_ptr, sv_ptr, zv_ptr,
    keep_q_ptr, keep_k_ptr, keep_v_ptr,
    sm_scale, N, H,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_don,
    QMAX: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    KEEP_Q: tl.constexpr, KEEP_K: tl.constexpr, KEEP_V: tl.constexpr,
    DOT_PRECISION: tl.constexpr, LIBDEVICE: tl.constexpr,
):
    """Grid (cdiv(N, BLOCK_M), B * H): dq and ds_q's share of BLOCK_M query rows of one (b, h),
    and their delta (module docstring)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b, h, q_base, k_base, v_base = head_bases(pid_bh, H, q_ptr, k_ptr, v_ptr, stride_qb, stride_qh, stride_kb,
                                              stride_kh, stride_vb, stride_vh)
    bh = pid_bh.to(tl.int64)
    do_base = do_ptr + b * stride_dob + h.to(tl.int64) * stride_doh
    keep_q_base = keep_q_ptr + bh * N * HEAD_DIM
    keep_k_base = keep_k_ptr + bh * N * HEAD_DIM
    keep_v_base = keep_v_ptr + bh * N * HEAD_DIM
    s_q, z_q, s_k, z_k, s_v, z_v = head_qparams(sq_ptr, zq_ptr, sk_ptr, zk_ptr, sv_ptr, zv_ptr, h)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < N
    q = _load_rows(q_base, stride_qn, offs_m, N, HEAD_DIM)
    q_t = _fake_quant(q, s_q, z_q, QMAX)
    if KEEP_Q:
        keep_q = _load_keep(keep_q_base, offs_m, offs_d, N, HEAD_DIM)
        q_t = tl.where(keep_q, q, q_t)
    else:
        keep_q = tl.full([BLOCK_M, HEAD_DIM], 0, tl.int1)  # no mask: nothing kept
    do = _load_rows(do_base, stride_don, offs_m, N, HEAD_DIM)
    f = tl.load(f_ptr + bh * N * HEAD_DIM + offs_m[:, None].to(tl.int64) * HEAD_DIM + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    delta = tl.sum(do * f, axis=1)
    tl.store(delta_ptr + bh * N + offs_m, delta, mask=row_ok)
    # rows beyond N: S = 0, m = 0, l = 1 give finite P, and dO = 0 makes their dS 0
    m_i = tl.load(m_ptr + bh * N + offs_m, mask=row_ok, other=0.0)
    inv_l = 1.0 / tl.load(l_ptr + bh * N + offs_m, mask=row_ok, other=1.0)

    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        k_t = _quant_rows(k_base, stride_kn, keep_k_base, offs_n, N, s_k, z_k, QMAX, HEAD_DIM, KEEP_K)
        v_t = _quant_rows(v_base, stride_vn, keep_v_base, offs_n, N, s_v, z_v, QMAX, HEAD_DIM, KEEP_V)
        p = _probs(q_t, k_t, m_i, inv_l, offs_n < N, sm_scale, DOT_PRECISION, LIBDEVICE)
        dp = tl.dot(do, tl.trans(v_t), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        acc = tl.dot(ds, k_t, acc, input_precision=DOT_PRECISION)

    dq, ds_share = _lsq_backward(acc * sm_scale, q, s_q, z_q, keep_q, QMAX, KEEP_Q)
    tl.store(dq_ptr + bh * N * HEAD_DIM + offs_m[:, None].to(tl.int64) * HEAD_DIM + offs_d[None, :], dq,
             mask=row_ok[:, None])
    tl.store(dsq_part_ptr + bh * tl.num_programs(0) + pid_m, ds_share)


@triton.jit
def _fq_attention_bwd_dkdv_kernel(
    # as _fq_attention_bwd_dq_kernel, with delta read; dk, dv [B, H, N, D] contiguous;
    # dsk_part, dsv_part [B * H, cdiv(N, BLOCK_N)]: each program's shares of ds_k and ds_v
    q_ptr, k_ptr, v_ptr, do_ptr, m_ptr, l_ptr, delta_ptr, dk_ptr, dv_ptr, dsk_part_ptr, dsv_part_ptr,
    sq_ptr, zq_ptr, sk_ptr, zk_ptr, sv_ptr, zv_ptr, ps_ptr,
    keep_q_ptr, keep_k_ptr, keep_v_ptr, keep_p_ptr,
    sm_scale, N, H,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_don,
    QMAX: tl.constexpr, P_STEPS: tl.constexpr, ZERO_CODE: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    KEEP_Q: tl.constexpr, KEEP_K: tl.constexpr, KEEP_V: tl.constexpr, KEEP_P: tl.constexpr,
    DOT_PRECISION: tl.constexpr, LIBDEVICE: tl.constexpr,
):
    """Grid (cdiv(N, BLOCK_N), B * H): dk, dv and the shares of ds_k, ds_v of BLOCK_N keys of
    one (b, h), walking the queries in the forward's tiles (module docstring)."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b, h, q_base, k_base, v_base = head_bases(pid_bh, H, q_ptr, k_ptr, v_ptr, stride_qb, stride_qh, stride_kb,
                                              stride_kh, stride_vb, stride_vh)
    bh = pid_bh.to(tl.int64)
    do_base = do_ptr + b * stride_dob + h.to(tl.int64) * stride_doh
    keep_q_base = keep_q_ptr + bh * N * HEAD_DIM
    keep_k_base = keep_k_ptr + bh * N * HEAD_DIM
    keep_v_base = keep_v_ptr + bh * N * HEAD_DIM
    keep_p_base = keep_p_ptr + bh * N * N
    s_q, z_q, s_k, z_k, s_v, z_v = head_qparams(sq_ptr, zq_ptr, sk_ptr, zk_ptr, sv_ptr, zv_ptr, h)
    p_scale = tl.load(ps_ptr)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    key_ok = offs_n < N
    k = _load_rows(k_base, stride_kn, offs_n, N, HEAD_DIM)
    v = _load_rows(v_base, stride_vn, offs_n, N, HEAD_DIM)
    k_t = _fake_quant(k, s_k, z_k, QMAX)
    v_t = _fake_quant(v, s_v, z_v, QMAX)
    if KEEP_K:
        keep_k = _load_keep(keep_k_base, offs_n, offs_d, N, HEAD_DIM)
        k_t = tl.where(keep_k, k, k_t)
    else:
        keep_k = tl.full([BLOCK_N, HEAD_DIM], 0, tl.int1)
    if KEEP_V:
        keep_v = _load_keep(keep_v_base, offs_n, offs_d, N, HEAD_DIM)
        v_t = tl.where(keep_v, v, v_t)
    else:
        keep_v = tl.full([BLOCK_N, HEAD_DIM], 0, tl.int1)

    acc_dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    acc_dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    for start in range(0, N, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        row_ok = offs_m < N
        q_t = _quant_rows(q_base, stride_qn, keep_q_base, offs_m, N, s_q, z_q, QMAX, HEAD_DIM, KEEP_Q)
        do = _load_rows(do_base, stride_don, offs_m, N, HEAD_DIM)
        m_i = tl.load(m_ptr + bh * N + offs_m, mask=row_ok, other=0.0)
        inv_l = 1.0 / tl.load(l_ptr + bh * N + offs_m, mask=row_ok, other=1.0)
        delta = tl.load(delta_ptr + bh * N + offs_m, mask=row_ok, other=0.0)
        p = _probs(q_t, k_t, m_i, inv_l, key_ok, sm_scale, DOT_PRECISION, LIBDEVICE)
        pt = _log_quant_st(p, p_scale, P_STEPS, ZERO_CODE)
        if KEEP_P:
            pt = tl.where(_load_keep(keep_p_base, offs_m, offs_n, N, N), p, pt)
        pt = tl.where(key_ok[None, :], pt, 0.0)
        acc_dv = tl.dot(tl.trans(pt), do, acc_dv, input_precision=DOT_PRECISION)
        dp = tl.dot(do, tl.trans(v_t), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        acc_dk = tl.dot(tl.trans(ds), q_t, acc_dk, input_precision=DOT_PRECISION)

    dk, dsk_share = _lsq_backward(acc_dk * sm_scale, k, s_k, z_k, keep_k, QMAX, KEEP_K)
    dv, dsv_share = _lsq_backward(acc_dv, v, s_v, z_v, keep_v, QMAX, KEEP_V)
    rows = bh * N * HEAD_DIM + offs_n[:, None].to(tl.int64) * HEAD_DIM + offs_d[None, :]
    tl.store(dk_ptr + rows, dk, mask=key_ok[:, None])
    tl.store(dv_ptr + rows, dv, mask=key_ok[:, None])
    tl.store(dsk_part_ptr + bh * tl.num_programs(0) + pid_n, dsk_share)
    tl.store(dsv_part_ptr + bh * tl.num_programs(0) + pid_n, dsv_share)


INTERPRETED = is_interpreted(_fq_attention_fwd_kernel)


def _default_blocks(n: int, d: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps). fp32 FMA dots hold, per thread, whole rows of their
    first operand along the reduced dimension, so register pressure grows with the tiles
    much faster than with tensor cores. Compiled for sm_90 (ptxas -v, Triton 3.6), 32 x 32
    tiles with 8 warps and one stage are the largest that keep D = 64 in registers (forward
    126 registers, dq 224, dk/dv 255 with 32 bytes spilled), where 64 x 64 tiles spill 1 to
    16 KB per thread; D = 128 takes 16-row query tiles (forward 162 registers; dq and dk/dv
    255 with 376 and 172 bytes spilled). Not timed on a GPU.
    In the interpreter every program instance costs milliseconds, so the tiles are as large
    as the sequence allows (fewer, larger numpy operations)."""
    if INTERPRETED:
        t = max(16, min(128, triton.next_power_of_2(n)))
        return t, t, 4
    return (16 if d > 64 else 32), 32, 8


def _launch(name: str, q, blocks):
    """(BLOCK_M, BLOCK_N, num_warps) after checking the device and the ``blocks`` option."""
    if blocks is not None and (len(blocks) != 2 or any(x < 16 or x & (x - 1) for x in blocks)):
        raise ValueError(f"{name}: blocks must be two powers of two, at least 16, got {blocks}")
    check_device(q, name, INTERPRETED)
    block_m, block_n, warps = _default_blocks(q.shape[2], q.shape[3])
    if blocks is not None:
        block_m, block_n = blocks
    return block_m, block_n, warps


def triton_fq_attention_forward(q, k, v, s_q, z_q, s_k, z_k, s_v, z_v, p_scale, keep_q, keep_k, keep_p, keep_v,
                                qmax: int, sm_scale: float, p_steps: int, p_bits: int, *,
                                blocks: tuple[int, int] | None = None):
    """(O, F, m, l) of the contract, in the form ``fastquant.ops.fq_attention`` prepares and
    checks: q, k, v float32 [B, H, N, D] (unit last stride), s_q, z_q, s_k, z_k float32
    [H], s_v, z_v, p_scale float32 [1], QDrop masks contiguous uint8 or None. O is a
    [B, H, N, D] view of a [B, N, H, D] tensor (the attention's transpose(1, 2) is then free);
    F = P V~ [B, H, N, D]; m, l [B, H, N]. ``blocks`` overrides (BLOCK_M, BLOCK_N)."""
    block_m, block_n, warps = _launch("triton_fq_attention_forward", q, blocks)
    bsz, heads, n, d = q.shape
    dev = q.device
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = torch.empty((bsz, n, heads, d), dtype=torch.float32, device=dev).transpose(1, 2)
    f = torch.empty((bsz, heads, n, d), dtype=torch.float32, device=dev)
    m = torch.empty((bsz, heads, n), dtype=torch.float32, device=dev)
    l = torch.empty_like(m)
    dummy = torch.zeros(1, dtype=torch.uint8, device=dev)
    keeps = [dummy if x is None else x for x in (keep_q, keep_k, keep_v, keep_p)]
    grid = (triton.cdiv(n, block_m), bsz * heads)
    _fq_attention_fwd_kernel[grid](
        q, k, v, out, f, m, l, s_q, z_q, s_k, z_k, s_v, z_v, p_scale, *keeps,
        float(sm_scale), n, heads,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        QMAX=qmax, P_STEPS=p_steps, ZERO_CODE=(1 << p_bits) - 1, HEAD_DIM=d,
        BLOCK_M=block_m, BLOCK_N=block_n,
        KEEP_Q=keep_q is not None, KEEP_K=keep_k is not None, KEEP_V=keep_v is not None,
        KEEP_P=keep_p is not None, DOT_PRECISION=_DOT_PRECISION, LIBDEVICE=not INTERPRETED,
        num_warps=warps, num_stages=1)
    return out, f, m, l


def triton_fq_attention_backward(do, q, k, v, f, m, l, s_q, z_q, s_k, z_k, s_v, z_v, p_scale, keep_q, keep_k, keep_p,
                                 keep_v, qmax: int, sm_scale: float, p_steps: int, p_bits: int, *,
                                 blocks: tuple[int, int] | None = None):
    """(dq, dk, dv, ds_q [H], ds_k [H], ds_v [1]) of the contract, from dO and what the
    forward returned (same tiles as the forward: give the same ``blocks``). The steps'
    gradients are the sums of each program's share (no atomics: deterministic)."""
    block_m, block_n, warps = _launch("triton_fq_attention_backward", q, blocks)
    bsz, heads, n, d = q.shape
    dev = q.device
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if do.stride(-1) != 1:
        do = do.contiguous()
    dq, dk, dv = (torch.empty((bsz, heads, n, d), dtype=torch.float32, device=dev) for _ in range(3))
    delta = torch.empty((bsz, heads, n), dtype=torch.float32, device=dev)
    blocks_m, blocks_n = triton.cdiv(n, block_m), triton.cdiv(n, block_n)
    dsq_part = torch.empty((bsz, heads, blocks_m), dtype=torch.float32, device=dev)
    dsk_part = torch.empty((bsz, heads, blocks_n), dtype=torch.float32, device=dev)
    dsv_part = torch.empty_like(dsk_part)
    dummy = torch.zeros(1, dtype=torch.uint8, device=dev)
    kq, kk, kv, kp = (dummy if x is None else x for x in (keep_q, keep_k, keep_v, keep_p))
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2))
    flags = dict(KEEP_Q=keep_q is not None, KEEP_K=keep_k is not None, KEEP_V=keep_v is not None)
    sm_scale = float(sm_scale)
    _fq_attention_bwd_dq_kernel[(blocks_m, bsz * heads)](
        q, k, v, do, f, m, l, dq, delta, dsq_part, s_q, z_q, s_k, z_k, s_v, z_v,
        kq, kk, kv, sm_scale, n, heads, *strides,
        QMAX=qmax, HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n, **flags,
        DOT_PRECISION=_DOT_PRECISION, LIBDEVICE=not INTERPRETED, num_warps=warps, num_stages=1)
    _fq_attention_bwd_dkdv_kernel[(blocks_n, bsz * heads)](
        q, k, v, do, m, l, delta, dk, dv, dsk_part, dsv_part, s_q, z_q, s_k, z_k, s_v, z_v, p_scale,
        kq, kk, kv, kp, sm_scale, n, heads, *strides,
        QMAX=qmax, P_STEPS=p_steps, ZERO_CODE=(1 << p_bits) - 1, HEAD_DIM=d,
        BLOCK_M=block_m, BLOCK_N=block_n, **flags, KEEP_P=keep_p is not None,
        DOT_PRECISION=_DOT_PRECISION, LIBDEVICE=not INTERPRETED, num_warps=warps, num_stages=1)
    return dq, dk, dv, dsq_part.sum((0, 2)), dsk_part.sum((0, 2)), dsv_part.sum().reshape(1)


def _spec(kernel, d: int, qmax: int, p_steps: int, p_bits: int, block_m: int, block_n: int, keep: bool,
          warps: int) -> KernelSpec:
    names = kernel.arg_names
    signature = {}
    for a in names:
        if a.endswith("_ptr"):
            signature[a] = "*u8" if a.startswith("keep_") else "*fp32"
        elif a == "sm_scale":
            signature[a] = "fp32"
        elif a in ("N", "H") or a.startswith("stride_"):
            signature[a] = "i32"
    values = {"QMAX": qmax, "P_STEPS": p_steps, "ZERO_CODE": (1 << p_bits) - 1, "HEAD_DIM": d,
              "BLOCK_M": block_m, "BLOCK_N": block_n, "KEEP_Q": keep, "KEEP_K": keep, "KEEP_V": keep, "KEEP_P": keep,
              "DOT_PRECISION": _DOT_PRECISION, "LIBDEVICE": True}
    constexprs = {a: values[a] for a in names if a not in signature}
    signature.update({a: "constexpr" for a in constexprs})
    return KernelSpec(
        kernel=kernel, signature=signature, constexprs=constexprs,
        label=f"a{qmax.bit_length()},{'log2' if p_steps == 1 else 'sqrt2'},p{p_bits},d{d},{block_m}x{block_n},"
              f"{'qdrop' if keep else 'no-qdrop'}",
        options={"num_warps": warps, "num_stages": 1})


_KERNELS = (_fq_attention_fwd_kernel, _fq_attention_bwd_dq_kernel, _fq_attention_bwd_dkdv_kernel)

# The wrapper's GPU launch configurations (_default_blocks) for every kernel: ViT's D = 64
# with and without QDrop masks, for both log bases and 4- and 8-bit operands; D = 32; and
# D = 128 with 16-row query tiles.
COMPILE_SPECS = [
    _spec(kern, d, qmax, p_steps, p_bits, bm, 32, keep, 8)
    for kern in _KERNELS
    for (d, qmax, p_steps, p_bits, bm, keep) in (
        (64, 15, 2, 4, 32, True),
        (64, 255, 1, 8, 32, False),
        (32, 15, 1, 4, 32, True),
        (128, 255, 2, 6, 16, True),
    )
]
