"""Pieces the attention kernels share (kernels/attention.py for inference and
kernels/fq_attention.py for reconstruction): where a program's (batch, head) operands start
and the head's quantizer steps and zero points. Not a kernel module (no COMPILE_SPECS):
these inline into the kernels that call them."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def head_bases(pid_bh, H, q_ptr, k_ptr, v_ptr, stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh):
    """(b as int64, h, and q, k, v's pointers at [b, h, 0, 0]) of program ``pid_bh = b H + h``."""
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    h64 = h.to(tl.int64)
    return (b, h, q_ptr + b * stride_qb + h64 * stride_qh, k_ptr + b * stride_kb + h64 * stride_kh,
            v_ptr + b * stride_vb + h64 * stride_vh)


@triton.jit
def head_qparams(sq_ptr, zq_ptr, sk_ptr, zk_ptr, sv_ptr, zv_ptr, h):
    """(s_q, z_q, s_k, z_k) of head ``h`` (per-head vectors) and (s_v, z_v) (per tensor)."""
    return (tl.load(sq_ptr + h), tl.load(zq_ptr + h), tl.load(sk_ptr + h), tl.load(zk_ptr + h), tl.load(sv_ptr),
            tl.load(zv_ptr))
