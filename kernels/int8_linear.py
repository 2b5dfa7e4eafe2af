"""Deployed int8 linear layers in Triton: asymmetric activation quantization, and the
int8 x int8 -> int32 GEMM with its dequantization epilogue.

Contract (``fastquant.ops.int8_linear``, whose PyTorch twins are the tests' oracle; the
deployed layer ``fastquant.nn.Int8Linear`` composes these two kernels on the ``triton``
backend):

quantize (``_quantize_asym_kernel``), x [M, K] read as float32, ``bits`` <= 8,
``qmax = 2^bits - 1``, ``o = 2^(bits-1)``:

    per token:  lo = min(min_k x, 0), hi = max(max_k x, 0)
                s = max((hi - lo) / qmax, 1e-8),  z = clamp(round(-lo / s), 0, qmax)
    per tensor: s, z given (a calibrated step and zero point)
    a[m, k]   = clamp(round(x / s) + z, 0, qmax) - o            int8
    A[m]      = sum_k a[m, k]                                    int32 (exact)
    s_x[m]    = s,   c_x[m] = o - z                              float32

with true division (``tl.div_rn``) and round half to even, so the codes equal PyTorch's
bit for bit.

GEMM (``_int8_gemm_kernel``), weight codes ``b = q_w - o_w`` as int8 [K, N] (or, for
4-bit weights, packed two per byte: uint8 [ceil(K/2), N], rows 2j and 2j + 1 as codes + 8
in the low and high nibble of row j, ``fastquant.ops.int8_linear.pack_weight_int4``) and per
output channel ``s_w``, ``c_w = o_w - z_w``, ``B' = sum_k b + K c_w``, optional bias:

    acc = a @ b (int32, exact)
    y   = (((acc + A c_w) + c_x B') * (s_x s_w)) + bias          float32 math

stored as the output's dtype (fp16, bf16 or fp32). The epilogue's float operations may be
contracted into fused multiply-adds by the compiler, so y equals the reference within
float32 rounding, not bit for bit; the tests bound the difference.
"""
from __future__ import annotations

import triton
import triton.language as tl

from . import KernelSpec, check_device, is_interpreted
from .quant_int8 import _round_half_to_even


@triton.jit
def _quantize_asym_kernel(
    # x [M, K] (unit column stride), a [M, K] int8, rowsum [M] int32, s_x and c_x [M] fp32;
    # scale_ptr / zero_ptr: the calibrated step and zero point (read when not PER_TOKEN).
    x_ptr, a_ptr, rowsum_ptr, sx_ptr, cx_ptr, scale_ptr, zero_ptr,
    M, K, stride_xm, stride_am,
    QMAX: tl.constexpr, PER_TOKEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """BLOCK_M rows per program, walked in BLOCK_K-column chunks (a per-token row is read
    twice: once for its range, once to quantize). Masked lanes load 0, which neither
    widens a range (it always includes 0) nor adds to a row sum (they are not stored)."""
    pid = tl.program_id(0)
    rows = (pid * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_ok = rows < M
    cols = tl.arange(0, BLOCK_K)
    qmax = tl.full([BLOCK_M], QMAX, tl.float32)
    if PER_TOKEN:
        # Elementwise running extremes, reduced once after the loop (a reduction inside
        # the loop also trips Triton 3.6's thread-locality pass on float32 input).
        lo2 = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
        hi2 = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
        for start in range(0, K, BLOCK_K):
            c = start + cols
            mask = row_ok[:, None] & (c[None, :] < K)
            x = tl.load(x_ptr + rows[:, None] * stride_xm + c[None, :], mask=mask, other=0.0).to(tl.float32)
            lo2 = tl.minimum(lo2, x)
            hi2 = tl.maximum(hi2, x)
        lo = tl.min(lo2, axis=1)
        hi = tl.max(hi2, axis=1)
        s = tl.maximum(tl.div_rn(hi - lo, qmax), 1e-8)
        z = tl.minimum(tl.maximum(_round_half_to_even(tl.div_rn(-lo, s)), 0.0), QMAX)
    else:
        s = tl.zeros([BLOCK_M], dtype=tl.float32) + tl.load(scale_ptr)
        z = tl.zeros([BLOCK_M], dtype=tl.float32) + tl.load(zero_ptr)
    o = (QMAX + 1) // 2
    total = tl.zeros([BLOCK_M], dtype=tl.int32)
    for start in range(0, K, BLOCK_K):
        c = start + cols
        mask = row_ok[:, None] & (c[None, :] < K)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + c[None, :], mask=mask, other=0.0).to(tl.float32)
        q = _round_half_to_even(tl.div_rn(x, s[:, None])) + z[:, None]
        a = (tl.minimum(tl.maximum(q, 0.0), QMAX) - o).to(tl.int32)
        total += tl.sum(tl.where(mask, a, 0), axis=1)
        tl.store(a_ptr + rows[:, None] * stride_am + c[None, :], a.to(tl.int8), mask=mask)
    tl.store(rowsum_ptr + rows, total, mask=row_ok)
    tl.store(sx_ptr + rows, s, mask=row_ok)
    tl.store(cx_ptr + rows, o - z, mask=row_ok)


@triton.jit
def _int8_gemm_kernel(
    # a [M, K] int8 (unit column stride), b [K, N] int8 (unit column stride), out [M, N];
    # per row: rowsum int32, s_x and c_x fp32; per column: s_w, c_w, b_sum, bias fp32.
    a_ptr, b_ptr, out_ptr, rowsum_ptr, sx_ptr, cx_ptr, sw_ptr, cw_ptr, bsum_ptr, bias_ptr,
    M, N, K, stride_am, stride_bk, stride_om,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, W4: tl.constexpr,
):
    """One BLOCK_M x BLOCK_N output tile per program; programs are ordered in groups of
    GROUP_M row tiles so neighbours share their B tiles in L2. The K loop accumulates int32
    on the tensor cores (``tl.dot`` of int8 operands); the epilogue is the module docstring's.

    W4: b is packed 4-bit codes, uint8 [ceil(K/2), N], row j holding k = 2j in the low and
    k = 2j + 1 in the high nibble (codes 0..15, offset 8 subtracted in the kernel); the
    even and odd columns of a are loaded separately and each multiplies its half of the
    unpacked tile, so nothing is interleaved in registers."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m

    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    a_ptrs = a_ptr + rm[:, None] * stride_am + rk[None, :]
    b_ptrs = b_ptr + rk[:, None].to(tl.int64) * stride_bk + rn[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    if W4:
        rh = tl.arange(0, BLOCK_K // 2)
        a_even = a_ptr + rm[:, None] * stride_am + 2 * rh[None, :]
        b_ptrs = b_ptr + rh[:, None].to(tl.int64) * stride_bk + rn[None, :]
        for start in range(0, K, BLOCK_K):
            k_even = (start + 2 * rh) < K
            k_odd = (start + 2 * rh + 1) < K
            a0 = tl.load(a_even, mask=m_ok[:, None] & k_even[None, :], other=0)
            a1 = tl.load(a_even + 1, mask=m_ok[:, None] & k_odd[None, :], other=0)
            p = tl.load(b_ptrs, mask=k_even[:, None] & n_ok[None, :], other=0x88).to(tl.int32)
            acc = tl.dot(a0, ((p & 0xF) - 8).to(tl.int8), acc, out_dtype=tl.int32)
            acc = tl.dot(a1, ((p >> 4) - 8).to(tl.int8), acc, out_dtype=tl.int32)
            a_even += BLOCK_K
            b_ptrs += (BLOCK_K // 2) * stride_bk
    else:
        for start in range(0, K, BLOCK_K):
            k_ok = (start + rk) < K
            a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0)
            b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0)
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K * stride_bk

    row_sum = tl.load(rowsum_ptr + rm, mask=m_ok, other=0).to(tl.float32)
    s_x = tl.load(sx_ptr + rm, mask=m_ok, other=0.0)
    c_x = tl.load(cx_ptr + rm, mask=m_ok, other=0.0)
    s_w = tl.load(sw_ptr + rn, mask=n_ok, other=0.0)
    c_w = tl.load(cw_ptr + rn, mask=n_ok, other=0.0)
    b_sum = tl.load(bsum_ptr + rn, mask=n_ok, other=0.0)
    y = acc.to(tl.float32) + row_sum[:, None] * c_w[None, :]
    y = y + c_x[:, None] * b_sum[None, :]
    y = y * (s_x[:, None] * s_w[None, :])
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + rn, mask=n_ok, other=0.0)[None, :]
    out_ptrs = out_ptr + rm[:, None] * stride_om + rn[None, :]
    tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


INTERPRETED = is_interpreted(_int8_gemm_kernel)


def triton_quantize_asym(x, bits: int, scale=None, zero_point=None, *, block_k: int | None = None):
    """``(a, rowsum, s_x, c_x)`` for x [M, K] (see the module docstring): per token when
    ``scale`` is None, else with the calibrated 0-dim ``scale`` and ``zero_point``."""
    import torch

    name = "triton_quantize_asym"
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"{name}: expected a 2-D floating-point tensor, got {x.dtype} of shape {tuple(x.shape)}")
    if not 2 <= bits <= 8:
        raise ValueError(f"{name}: bits must be 2..8, got {bits}")
    if (scale is None) != (zero_point is None):
        raise ValueError(f"{name}: give both scale and zero_point, or neither (per-token)")
    check_device(x, name, INTERPRETED)
    if x.stride(-1) != 1:
        x = x.contiguous()
    m, k = x.shape
    dev = x.device
    a = torch.empty((m, k), dtype=torch.int8, device=dev)
    rowsum = torch.empty((m,), dtype=torch.int32, device=dev)
    s_x = torch.empty((m,), dtype=torch.float32, device=dev)
    c_x = torch.empty((m,), dtype=torch.float32, device=dev)
    per_token = scale is None
    if per_token:
        scale = zero_point = s_x  # not read
    else:
        scale = scale.reshape(1).to(device=dev, dtype=torch.float32)
        zero_point = zero_point.reshape(1).to(device=dev, dtype=torch.float32)
    if m > 0 and k > 0:
        block_k = block_k or min(triton.next_power_of_2(k), 1024)
        block_m = max(1, min(16, 4096 // block_k, triton.next_power_of_2(m)))
        _quantize_asym_kernel[(triton.cdiv(m, block_m),)](
            x, a, rowsum, s_x, c_x, scale, zero_point, m, k, x.stride(0), a.stride(0),
            QMAX=(1 << bits) - 1, PER_TOKEN=per_token, BLOCK_M=block_m, BLOCK_K=block_k, num_warps=4)
    return a, rowsum, s_x, c_x


def triton_int8_gemm(a, b, rowsum, s_x, c_x, s_w, c_w, b_sum, bias=None, out_dtype=None,
                     *, blocks: tuple[int, int, int] | None = None):
    """``y`` [M, N] of the module docstring's GEMM and epilogue. ``b``: int8 [K, N] weight
    codes minus their offset, or uint8 [ceil(K/2), N] packed 4-bit codes (the module docstring's layout).
    ``blocks`` overrides (BLOCK_M, BLOCK_N, BLOCK_K) (each a power of two, at least 16; on
    GPUs BLOCK_K at least 32, 64 for packed weights)."""
    import torch

    name = "triton_int8_gemm"
    w4 = b.dtype == torch.uint8
    rows_b = (a.shape[1] + 1) // 2 if w4 else a.shape[1]
    if (a.dtype != torch.int8 or b.dtype not in (torch.int8, torch.uint8) or a.dim() != 2 or b.dim() != 2
            or b.shape[0] != rows_b):
        raise ValueError(f"{name}: expected int8 a [M, K] and int8 b [K, N] (or packed 4-bit uint8 b "
                         f"[ceil(K/2), N]), got {a.dtype} {tuple(a.shape)} and {b.dtype} {tuple(b.shape)}")
    check_device(a, name, INTERPRETED)
    m, k = a.shape
    n = b.shape[1]
    if a.stride(-1) != 1:
        a = a.contiguous()
    if b.stride(-1) != 1:
        b = b.contiguous()
    out_dtype = out_dtype or torch.float16
    out = torch.empty((m, n), dtype=out_dtype, device=a.device)
    if m == 0 or n == 0:
        return out
    if k == 0:
        raise ValueError(f"{name}: K must be positive")
    vecs = [v.contiguous().to(torch.float32) for v in (s_x, c_x, s_w, c_w, b_sum)]
    has_bias = bias is not None
    bias_t = bias.contiguous().to(torch.float32) if has_bias else vecs[2]
    bm, bn, bk = blocks or (128 if m > 64 else 64, 128, 64)
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    _int8_gemm_kernel[grid](
        a, b, out, rowsum.contiguous(), vecs[0], vecs[1], vecs[2], vecs[3], vecs[4], bias_t,
        m, n, k, a.stride(0), b.stride(0), out.stride(0),
        HAS_BIAS=has_bias, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, W4=w4,
        num_warps=8 if bm * bn >= 128 * 128 else 4, num_stages=4)
    return out


def _quantize_spec(dtype: str, per_token: bool, bits: int, block_m: int, block_k: int) -> KernelSpec:
    return KernelSpec(
        kernel=_quantize_asym_kernel,
        signature={
            "x_ptr": f"*{dtype}", "a_ptr": "*i8", "rowsum_ptr": "*i32", "sx_ptr": "*fp32", "cx_ptr": "*fp32",
            "scale_ptr": "*fp32", "zero_ptr": "*fp32", "M": "i32", "K": "i32", "stride_xm": "i32",
            "stride_am": "i32", "QMAX": "constexpr", "PER_TOKEN": "constexpr", "BLOCK_M": "constexpr",
            "BLOCK_K": "constexpr",
        },
        constexprs={"QMAX": (1 << bits) - 1, "PER_TOKEN": per_token, "BLOCK_M": block_m, "BLOCK_K": block_k},
        label=f"{dtype},{'per_token' if per_token else 'per_tensor'},a{bits},{block_m}x{block_k}",
    )


def _gemm_spec(out: str, has_bias: bool, bm: int, bn: int, bk: int, warps: int, w4: bool = False) -> KernelSpec:
    return KernelSpec(
        kernel=_int8_gemm_kernel,
        signature={
            "a_ptr": "*i8", "b_ptr": "*u8" if w4 else "*i8", "out_ptr": f"*{out}", "rowsum_ptr": "*i32", "sx_ptr": "*fp32",
            "cx_ptr": "*fp32", "sw_ptr": "*fp32", "cw_ptr": "*fp32", "bsum_ptr": "*fp32", "bias_ptr": "*fp32",
            "M": "i32", "N": "i32", "K": "i32", "stride_am": "i32", "stride_bk": "i32", "stride_om": "i32",
            "HAS_BIAS": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr",
            "GROUP_M": "constexpr", "W4": "constexpr",
        },
        constexprs={"HAS_BIAS": has_bias, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "W4": w4},
        label=f"{out},{'bias' if has_bias else 'no_bias'},{'w4,' if w4 else ''}{bm}x{bn}x{bk}",
        options={"num_warps": warps, "num_stages": 4},
    )


# The launch configurations the wrappers use: ViT-S/B rows (384, 768 wide) and MLP rows
# (1536, 3072) for the quantizer; both tile shapes of the GEMM, for every output type.
COMPILE_SPECS = [
    _quantize_spec("fp16", True, 8, 4, 1024),
    _quantize_spec("fp32", True, 8, 8, 512),
    _quantize_spec("bf16", False, 8, 8, 512),
    _quantize_spec("fp16", False, 4, 16, 256),
    _gemm_spec("fp16", True, 128, 128, 64, 8),
    _gemm_spec("bf16", False, 128, 128, 64, 8),
    _gemm_spec("fp32", True, 64, 128, 64, 4),
    _gemm_spec("fp16", True, 128, 128, 64, 8, w4=True),
    _gemm_spec("fp32", False, 64, 128, 64, 4, w4=True),
]
