"""The reconstruction hot loop's fake-quant linear layer in Triton: forward and backward.

Contract: ``fastquant.ops.fq_linear`` (its docstring gives the formulas and the
gradients; ``torch_fq_linear`` is the PyTorch twin). Three GEMM kernels, each building
its quantized operands from the float inputs in the prologue, so neither grid is ever
written to memory and the backward saves nothing beyond the inputs:

- ``_fq_linear_fwd_kernel``: y [M, N] = (g_x @ g_w^T) * (s_x s_w) + bias. Each K step
  quantizes an x tile (true division, round half to even, clip; QDrop's kept elements
  as ``x / s_x``) and builds the matching weight tile from ``w_floor + h(alpha)``; both
  go to the tensor cores as fp16 with fp32 accumulation.
- ``_fq_linear_dx_kernel``: G [M, K] = (dy * s_w) @ g_w, reduced over N, the weight
  tiles rebuilt as in the forward; the epilogue recomputes the x tile's grid and stores
  dx = G * pass and this tile's share of ds_x = sum(G * (g_x - pass * v)) (one partial
  sum per program, added up by the wrapper: deterministic).
- ``_fq_linear_dw_kernel``: dy^T @ g_x [N, K], reduced over M (optionally split into
  ``S`` row ranges, partial results added by the wrapper, so that narrow layers still
  fill the GPU); the x tiles are quantized in the prologue; the epilogue multiplies by
  s_x s_w and AdaRound's dh/dalpha (recomputed from alpha, zero where a clamp is
  active). The programs of the first K tile also sum dy over M: db.

fp16 operands are exact for the integer codes (|g| <= 255); soft-rounded weight codes
and kept ``x / s_x`` are rounded to fp16. The backward's ``dy`` would mostly underflow
fp16 (an MSE gradient is ~1e-7), so the wrapper scales it by a power of two per tensor,
``2^(14 - ceil(log2(bound)))`` with ``bound`` the largest |dy s_w| (dx) or |dy| (dw),
computed on the device without a host sync; the epilogue multiplies by the inverse, which
is exact. Elements down to 2^-28 of the largest then keep fp16's 11 significant bits.

Divisions that decide a code use ``tl.div_rn`` (Triton's ``/`` is approximate on NVIDIA
GPUs), and rounding is ``_round_half_to_even`` (libdevice's rint does not run in the
interpreter), so the codes equal PyTorch's bit for bit. The sigmoid uses ``tl.exp`` and
an approximate division: soft codes differ from PyTorch's by a few float32 ulps before
their fp16 rounding.
"""
from __future__ import annotations

import functools

import triton
import triton.language as tl

from . import KernelSpec, check_device, is_interpreted
from .quant_int8 import _round_half_to_even

_FP16_TARGET_EXP = 14.0  # scaled |dy| stays at most 2^14 (fp16 max 65504 ~ 2^16)


@triton.jit
def _tile_coords(pid, num_a, num_b, GROUP: tl.constexpr):
    """Program ``pid`` -> (tile along a, tile along b), walking GROUP tiles of a per tile of
    b so that programs running together share their b operand in L2."""
    per_group = GROUP * num_b
    first = (pid // per_group) * GROUP
    size = tl.minimum(num_a - first, GROUP)
    return first + (pid % per_group) % size, (pid % per_group) // size


@triton.jit
def _act_grid(x, keep, s, z, QMAX: tl.constexpr, HAS_KEEP: tl.constexpr):
    """(g_x, v, pass) of an x tile (LsqGrid): v = x / s, g = clamp(round(v) + z, 0, QMAX) - z,
    v where kept; pass: the code was not clipped, or kept."""
    v = tl.div_rn(x, s)
    r = _round_half_to_even(v) + z
    g = tl.minimum(tl.maximum(r, 0.0), QMAX) - z
    passed = (r >= 0.0) & (r <= QMAX)
    if HAS_KEEP:
        kept = keep != 0
        g = tl.where(kept, v, g)
        passed = passed | kept
    return g, v, passed


@triton.jit
def _sigmoid(a):
    return 1.0 / (1.0 + tl.exp(-a))


@triton.jit
def _weight_grid(alpha, w_floor, z, QMAX: tl.constexpr, SOFT: tl.constexpr):
    """AdaRound's g_w = clamp((w_floor + h) + z, 0, QMAX) - z, h the rectified sigmoid of
    alpha (SOFT) or [alpha >= 0]."""
    if SOFT:
        h = tl.minimum(tl.maximum(_sigmoid(alpha) * 1.2 - 0.1, 0.0), 1.0)
    else:
        h = tl.where(alpha >= 0.0, 1.0, 0.0)
    return tl.minimum(tl.maximum((w_floor + h) + z, 0.0), QMAX) - z


@triton.jit
def _weight_grad_factor(alpha, w_floor, z, QMAX: tl.constexpr):
    """dg_w/dalpha of soft rounding: 1.2 sig (1 - sig), 0 where h or the code is clamped
    (the clamps pass the gradient at their bounds, as torch.clamp does)."""
    sig = _sigmoid(alpha)
    h_pre = sig * 1.2 - 0.1
    c = (w_floor + tl.minimum(tl.maximum(h_pre, 0.0), 1.0)) + z
    ok = (h_pre >= 0.0) & (h_pre <= 1.0) & (c >= 0.0) & (c <= QMAX)
    return tl.where(ok, 1.2 * sig * (1.0 - sig), 0.0)


@triton.jit
def _fq_linear_fwd_kernel(
    # x [M, K] fp32 and keep [M, K] uint8 (read when HAS_KEEP), unit column strides;
    # alpha and w_floor [N, K] fp32 (same strides); s_x, z_x: one fp32 each; s_w, z_w,
    # bias [N] fp32; y [M, N] fp32.
    x_ptr, keep_ptr, alpha_ptr, wfloor_ptr, sx_ptr, zx_ptr, sw_ptr, zw_ptr, bias_ptr, y_ptr,
    M, N, K, stride_xm, stride_keepm, stride_wn, stride_ym,
    QMAX_X: tl.constexpr, QMAX_W: tl.constexpr, HAS_KEEP: tl.constexpr, SOFT: tl.constexpr,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """One BLOCK_M x BLOCK_N tile of y per program. Lanes outside the matrices (tails of
    M, N, K) get zero codes, so they add nothing to the sums."""
    pid = tl.program_id(0)
    pid_m, pid_n = _tile_coords(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    s_x = tl.load(sx_ptr)
    z_x = tl.load(zx_ptr)
    z_w = tl.load(zw_ptr + rn, mask=n_ok, other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        k_ok = k < K
        x_mask = m_ok[:, None] & k_ok[None, :]
        x = tl.load(x_ptr + rm[:, None] * stride_xm + k[None, :], mask=x_mask, other=0.0)
        keep = 0
        if HAS_KEEP:
            keep = tl.load(keep_ptr + rm[:, None] * stride_keepm + k[None, :], mask=x_mask, other=0)
        g_x, _, _ = _act_grid(x, keep, s_x, z_x, QMAX_X, HAS_KEEP)
        g_x = tl.where(x_mask, g_x, 0.0).to(tl.float16)
        w_mask = n_ok[:, None] & k_ok[None, :]
        w_off = rn[:, None].to(tl.int64) * stride_wn + k[None, :]
        alpha = tl.load(alpha_ptr + w_off, mask=w_mask, other=0.0)
        w_floor = tl.load(wfloor_ptr + w_off, mask=w_mask, other=0.0)
        g_w = tl.where(w_mask, _weight_grid(alpha, w_floor, z_w[:, None], QMAX_W, SOFT), 0.0).to(tl.float16)
        acc = tl.dot(g_x, tl.trans(g_w), acc, out_dtype=tl.float32)
    s_w = tl.load(sw_ptr + rn, mask=n_ok, other=0.0)
    y = acc * (s_x * s_w)[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + rn, mask=n_ok, other=0.0)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], y, mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _fq_linear_dx_kernel(
    # dy [M, N] fp32; x, keep, alpha, w_floor, s_x, z_x, s_w, z_w as in the forward;
    # gs: the power-of-two scale of dy * s_w and its inverse (two fp32); dx [M, K] fp32 (written when
    # STORE_DX); ds_part: one fp32 per program.
    dy_ptr, x_ptr, keep_ptr, alpha_ptr, wfloor_ptr, sx_ptr, zx_ptr, sw_ptr, zw_ptr, gs_ptr, dx_ptr, dspart_ptr,
    M, N, K, stride_dym, stride_xm, stride_keepm, stride_wn, stride_dxm,
    QMAX_X: tl.constexpr, QMAX_W: tl.constexpr, HAS_KEEP: tl.constexpr, SOFT: tl.constexpr,
    STORE_DX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """One BLOCK_M x BLOCK_K tile of G = (dy s_w) @ g_w per program, reduced over N in
    BLOCK_N steps; then dx and the tile's partial ds_x (module docstring)."""
    pid = tl.program_id(0)
    pid_m, pid_k = _tile_coords(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP_M)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rn = tl.arange(0, BLOCK_N)
    m_ok = rm < M
    k_ok = rk < K
    gs = tl.load(gs_ptr)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        n = n0 + rn
        n_ok = n < N
        dy = tl.load(dy_ptr + rm[:, None] * stride_dym + n[None, :], mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        s_w = tl.load(sw_ptr + n, mask=n_ok, other=0.0)
        a = ((dy * s_w[None, :]) * gs).to(tl.float16)
        w_mask = n_ok[:, None] & k_ok[None, :]
        w_off = n[:, None].to(tl.int64) * stride_wn + rk[None, :]
        alpha = tl.load(alpha_ptr + w_off, mask=w_mask, other=0.0)
        w_floor = tl.load(wfloor_ptr + w_off, mask=w_mask, other=0.0)
        z_w = tl.load(zw_ptr + n, mask=n_ok, other=0.0)
        g_w = tl.where(w_mask, _weight_grid(alpha, w_floor, z_w[:, None], QMAX_W, SOFT), 0.0).to(tl.float16)
        acc = tl.dot(a, g_w, acc, out_dtype=tl.float32)
    g = acc * tl.load(gs_ptr + 1)  # exact: 1 / gs, a power of two
    x_mask = m_ok[:, None] & k_ok[None, :]
    x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=x_mask, other=0.0)
    keep = 0
    if HAS_KEEP:
        keep = tl.load(keep_ptr + rm[:, None] * stride_keepm + rk[None, :], mask=x_mask, other=0)
    g_x, v, passed = _act_grid(x, keep, tl.load(sx_ptr), tl.load(zx_ptr), QMAX_X, HAS_KEEP)
    if STORE_DX:
        tl.store(dx_ptr + rm[:, None] * stride_dxm + rk[None, :], tl.where(passed, g, 0.0), mask=x_mask)
    d = tl.where(x_mask, g * tl.where(passed, g_x - v, g_x), 0.0)
    tl.store(dspart_ptr + pid, tl.sum(tl.sum(d, axis=1), axis=0))


@triton.jit
def _fq_linear_dw_kernel(
    # dy [M, N], x, keep, alpha, w_floor, s_x, z_x, s_w, z_w as in the dx kernel; gs: the
    # power-of-two scale of dy and its inverse (two fp32); dalpha [S, N, K] and db [S, N] fp32, one slice
    # per split of the rows (program_id(1)), each ``rows_per_split`` rows (a multiple of
    # BLOCK_M).
    dy_ptr, x_ptr, keep_ptr, alpha_ptr, wfloor_ptr, sx_ptr, zx_ptr, sw_ptr, zw_ptr, gs_ptr, dalpha_ptr, db_ptr,
    M, N, K, rows_per_split, stride_dym, stride_xm, stride_keepm, stride_wn,
    QMAX_X: tl.constexpr, QMAX_W: tl.constexpr, HAS_KEEP: tl.constexpr, STORE_DB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_N: tl.constexpr,
):
    """One BLOCK_N x BLOCK_K tile of dalpha per program (soft rounding), reduced over its
    split's rows in BLOCK_M steps; programs of the first K tile also sum dy: db."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    pid_n, pid_k = _tile_coords(pid, tl.cdiv(N, BLOCK_N), tl.cdiv(K, BLOCK_K), GROUP_N)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rm = tl.arange(0, BLOCK_M)
    n_ok = rn < N
    k_ok = rk < K
    s_x = tl.load(sx_ptr)
    z_x = tl.load(zx_ptr)
    gs = tl.load(gs_ptr)
    m_start = split * rows_per_split
    m_end = tl.minimum(M, m_start + rows_per_split)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        m = (m0 + rm).to(tl.int64)
        m_ok = m < m_end
        dy = tl.load(dy_ptr + m[:, None] * stride_dym + rn[None, :], mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        if STORE_DB:
            if pid_k == 0:
                db += tl.sum(dy, axis=0)
        x_mask = m_ok[:, None] & k_ok[None, :]
        x = tl.load(x_ptr + m[:, None] * stride_xm + rk[None, :], mask=x_mask, other=0.0)
        keep = 0
        if HAS_KEEP:
            keep = tl.load(keep_ptr + m[:, None] * stride_keepm + rk[None, :], mask=x_mask, other=0)
        g_x, _, _ = _act_grid(x, keep, s_x, z_x, QMAX_X, HAS_KEEP)
        g_x = tl.where(x_mask, g_x, 0.0).to(tl.float16)
        acc = tl.dot(tl.trans((dy * gs).to(tl.float16)), g_x, acc, out_dtype=tl.float32)
    w_mask = n_ok[:, None] & k_ok[None, :]
    w_off = rn[:, None].to(tl.int64) * stride_wn + rk[None, :]
    alpha = tl.load(alpha_ptr + w_off, mask=w_mask, other=0.0)
    w_floor = tl.load(wfloor_ptr + w_off, mask=w_mask, other=0.0)
    z_w = tl.load(zw_ptr + rn, mask=n_ok, other=0.0)
    s_w = tl.load(sw_ptr + rn, mask=n_ok, other=0.0)
    dgw = acc * (tl.load(gs_ptr + 1) * s_x) * s_w[:, None]  # exact 1 / gs, then the scales
    dalpha = dgw * _weight_grad_factor(alpha, w_floor, z_w[:, None], QMAX_W)
    out = split.to(tl.int64) * N * K
    tl.store(dalpha_ptr + out + rn[:, None].to(tl.int64) * K + rk[None, :], dalpha, mask=w_mask)
    if STORE_DB:
        if pid_k == 0:
            tl.store(db_ptr + split * N + rn, db, mask=n_ok)


# -- wrappers ---------------------------------------------------------------------------------
INTERPRETED = is_interpreted(_fq_linear_fwd_kernel)


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps) per kernel on a GPU. The dx kernel's output tile is
# BLOCK_M x BLOCK_K (N is its reduction), the dw kernel's BLOCK_N x BLOCK_K (M is). The
# prologues hold several fp32 tiles in registers besides the accumulator: with 128 x 128
# output tiles the dx and dw epilogues spilled over 1 KB per thread (ptxas -v, sm_80 and
# sm_90), with 128 x 64 ones 28 and 40 bytes; the forward spills 16 (sm_90) to 144 (sm_80).
_GPU_BLOCKS = {"fwd": (128, 128, 32, 8), "dx": (128, 32, 64, 8), "dw": (32, 128, 64, 8)}
_NUM_STAGES = 3


def _launch_opts(kind: str, blocks):
    if blocks is not None:
        return (*blocks, 4)
    return _GPU_BLOCKS[kind]


@functools.cache
def _sm_count(index: int) -> int:
    import torch

    return torch.cuda.get_device_properties(index).multi_processor_count


def _prepare(x, s_x, z_x, qmax_x, keep, alpha, w_floor, s_w, z_w, qmax_w, name: str):
    """Checked, contiguous float32 operands: (x, s_x [1], z_x [1], keep uint8 or None,
    alpha, w_floor, s_w [N], z_w [N])."""
    import torch

    if x.dim() != 2 or x.dtype != torch.float32:
        raise ValueError(f"{name}: x must be a 2-D float32 tensor [M, K], got {x.dtype} of shape {tuple(x.shape)}")
    check_device(x, name, INTERPRETED)
    k = x.shape[1]
    if alpha.dim() != 2 or alpha.shape != w_floor.shape or alpha.shape[1] != k:
        raise ValueError(f"{name}: alpha and w_floor must be [N, K] with K = {k}, got {tuple(alpha.shape)} and "
                         f"{tuple(w_floor.shape)}")
    n = alpha.shape[0]
    if s_x.numel() != 1 or z_x.numel() != 1 or s_w.numel() != n or z_w.numel() not in (1, n):
        raise ValueError(f"{name}: expected one s_x and z_x, N = {n} s_w and N or one z_w, got "
                         f"{s_x.numel()}, {z_x.numel()}, {s_w.numel()}, {z_w.numel()}")
    for q, what in ((qmax_x, "qmax_x"), (qmax_w, "qmax_w")):
        if q not in tuple((1 << b) - 1 for b in range(2, 9)):
            raise ValueError(f"{name}: {what} must be 2^bits - 1 with 2..8 bits, got {q}")
    if keep is not None:
        if keep.shape != x.shape:
            raise ValueError(f"{name}: keep must have x's shape {tuple(x.shape)}, got {tuple(keep.shape)}")
        keep = keep.view(torch.uint8) if keep.dtype in (torch.bool, torch.uint8) else (keep != 0).view(torch.uint8)
        keep = keep.contiguous()

    def f32(t):
        return t.to(torch.float32).contiguous()

    z_w = f32(z_w.reshape(-1).expand(n))
    return (x.contiguous(), f32(s_x.reshape(1)), f32(z_x.reshape(1)), keep, f32(alpha), f32(w_floor),
            f32(s_w.reshape(-1)), z_w)


def triton_fq_linear_forward(x, s_x, z_x, qmax_x: int, keep, alpha, w_floor, s_w, z_w, qmax_w: int, bias=None,
                             soft: bool = True, *, blocks: tuple[int, int, int] | None = None):
    """y [M, N] float32 of the contract (``fastquant.ops.fq_linear``). ``blocks``
    overrides (BLOCK_M, BLOCK_N, BLOCK_K) (powers of two, at least 16)."""
    import torch

    x, s_x, z_x, keep, alpha, w_floor, s_w, z_w = _prepare(x, s_x, z_x, qmax_x, keep, alpha, w_floor, s_w, z_w,
                                                           qmax_w, "triton_fq_linear_forward")
    m, k = x.shape
    n = alpha.shape[0]
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"triton_fq_linear_forward: bias must be [N] = [{n}], got {tuple(bias.shape)}")
    y = torch.empty((m, n), dtype=torch.float32, device=x.device)
    if m == 0 or n == 0:
        return y
    if k == 0:
        return y.zero_() + (0 if bias is None else bias.float())
    bias_t = bias.to(torch.float32).contiguous() if bias is not None else s_w
    keep_t = keep if keep is not None else x
    bm, bn, bk, warps = _launch_opts("fwd", blocks)
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    _fq_linear_fwd_kernel[grid](
        x, keep_t, alpha, w_floor, s_x, z_x, s_w, z_w, bias_t, y,
        m, n, k, x.stride(0), keep_t.stride(0), alpha.stride(0), y.stride(0),
        QMAX_X=qmax_x, QMAX_W=qmax_w, HAS_KEEP=keep is not None, SOFT=bool(soft), HAS_BIAS=bias is not None,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=warps, num_stages=_NUM_STAGES)
    return y


def _grad_scales(dy, s_w):
    """Powers of two that bring the largest |dy s_w| (dx kernel) and |dy| (dw kernel) to at
    most 2^14, with their inverses: fp32 [4] = (dx scale, its inverse, dw scale, its
    inverse), computed on dy's device (no host sync)."""
    import torch

    amax = dy.abs().amax()
    bound = torch.stack((amax * s_w.abs().amax(), amax)).clamp_min(2.0 ** -100)
    e = _FP16_TARGET_EXP - torch.ceil(torch.log2(bound))
    return torch.stack((torch.exp2(e[0]), torch.exp2(-e[0]), torch.exp2(e[1]), torch.exp2(-e[1])))


def triton_fq_linear_backward(dy, x, s_x, z_x, qmax_x: int, keep, alpha, w_floor, s_w, z_w, qmax_w: int,
                              soft: bool, need_dx: bool = True, need_ds: bool = True, need_dalpha: bool = True,
                              need_db: bool = False, *, blocks: tuple[int, int, int] | None = None,
                              splits: int | None = None):
    """``(dx, ds_x, dalpha, db)`` of the contract, None for those not asked for (dalpha:
    soft rounding only); ds_x has s_x's shape. ``blocks`` as in the forward; ``splits``:
    row ranges of the dw kernel (None: enough to give every SM two programs, at most 8)."""
    import torch

    name = "triton_fq_linear_backward"
    shape_sx = s_x.shape
    x, s_x, z_x, keep, alpha, w_floor, s_w, z_w = _prepare(x, s_x, z_x, qmax_x, keep, alpha, w_floor, s_w, z_w,
                                                           qmax_w, name)
    m, k = x.shape
    n = alpha.shape[0]
    if dy.shape != (m, n):
        raise ValueError(f"{name}: dy must be [M, N] = [{m}, {n}], got {tuple(dy.shape)}")
    dy = dy.to(torch.float32).contiguous()
    need_dalpha = bool(need_dalpha and soft)
    dx = ds = dalpha = db = None
    if m == 0 or n == 0 or k == 0:
        zero = functools.partial(torch.zeros, device=x.device, dtype=torch.float32)
        return (zero(m, k) if need_dx else None, zero(shape_sx) if need_ds else None,
                zero(n, k) if need_dalpha else None, zero(n) if need_db else None)
    keep_t = keep if keep is not None else x
    gs = _grad_scales(dy, s_w)
    if need_dx or need_ds:
        bm, bn, bk, warps = _launch_opts("dx", blocks)
        grid = (triton.cdiv(m, bm) * triton.cdiv(k, bk),)
        dx_t = torch.empty((m, k), dtype=torch.float32, device=x.device) if need_dx else x
        ds_part = torch.empty(grid[0], dtype=torch.float32, device=x.device)
        _fq_linear_dx_kernel[grid](
            dy, x, keep_t, alpha, w_floor, s_x, z_x, s_w, z_w, gs[0:2], dx_t, ds_part,
            m, n, k, dy.stride(0), x.stride(0), keep_t.stride(0), alpha.stride(0), dx_t.stride(0),
            QMAX_X=qmax_x, QMAX_W=qmax_w, HAS_KEEP=keep is not None, SOFT=bool(soft), STORE_DX=need_dx,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=warps, num_stages=_NUM_STAGES)
        dx = dx_t if need_dx else None
        ds = ds_part.sum().reshape(shape_sx) if need_ds else None
    if need_dalpha:
        bm, bn, bk, warps = _launch_opts("dw", blocks)
        tiles = triton.cdiv(n, bn) * triton.cdiv(k, bk)
        if splits is None:
            sms = 0 if x.device.type != "cuda" else _sm_count(x.device.index or 0)
            splits = max(1, min(8, triton.cdiv(2 * sms, tiles), triton.cdiv(m, 4 * bm)))
        rows = triton.cdiv(triton.cdiv(m, splits), bm) * bm
        splits = triton.cdiv(m, rows)
        part = torch.empty((splits, n, k), dtype=torch.float32, device=x.device)
        db_part = torch.empty((splits, n), dtype=torch.float32, device=x.device) if need_db else part
        _fq_linear_dw_kernel[(tiles, splits)](
            dy, x, keep_t, alpha, w_floor, s_x, z_x, s_w, z_w, gs[2:4], part, db_part,
            m, n, k, rows, dy.stride(0), x.stride(0), keep_t.stride(0), alpha.stride(0),
            QMAX_X=qmax_x, QMAX_W=qmax_w, HAS_KEEP=keep is not None, STORE_DB=need_db,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_N=8, num_warps=warps, num_stages=_NUM_STAGES)
        dalpha = part[0] if splits == 1 else part.sum(0)
        if need_db:
            db = db_part[0] if splits == 1 else db_part.sum(0)
    if need_db and db is None:
        db = dy.sum(0)
    return dx, ds, dalpha, db


# -- compile specs ----------------------------------------------------------------------------
_COMMON = {"x_ptr": "*fp32", "keep_ptr": "*u8", "alpha_ptr": "*fp32", "wfloor_ptr": "*fp32", "sx_ptr": "*fp32",
           "zx_ptr": "*fp32", "sw_ptr": "*fp32", "zw_ptr": "*fp32"}


def _fwd_spec(a_bits, w_bits, keep, soft, bias) -> KernelSpec:
    bm, bn, bk, warps = _GPU_BLOCKS["fwd"]
    return KernelSpec(
        kernel=_fq_linear_fwd_kernel,
        signature={**_COMMON, "bias_ptr": "*fp32", "y_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32",
                   "stride_xm": "i32", "stride_keepm": "i32", "stride_wn": "i32", "stride_ym": "i32",
                   "QMAX_X": "constexpr", "QMAX_W": "constexpr", "HAS_KEEP": "constexpr", "SOFT": "constexpr",
                   "HAS_BIAS": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr",
                   "GROUP_M": "constexpr"},
        constexprs={"QMAX_X": (1 << a_bits) - 1, "QMAX_W": (1 << w_bits) - 1, "HAS_KEEP": keep, "SOFT": soft,
                    "HAS_BIAS": bias, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
        label=f"a{a_bits}w{w_bits},{'keep' if keep else 'no_keep'},{'soft' if soft else 'hard'},"
              f"{'bias' if bias else 'no_bias'},{bm}x{bn}x{bk}",
        options={"num_warps": warps, "num_stages": _NUM_STAGES})


def _dx_spec(a_bits, w_bits, keep, soft, store_dx) -> KernelSpec:
    bm, bn, bk, warps = _GPU_BLOCKS["dx"]
    return KernelSpec(
        kernel=_fq_linear_dx_kernel,
        signature={"dy_ptr": "*fp32", **_COMMON, "gs_ptr": "*fp32", "dx_ptr": "*fp32", "dspart_ptr": "*fp32",
                   "M": "i32", "N": "i32", "K": "i32", "stride_dym": "i32", "stride_xm": "i32",
                   "stride_keepm": "i32", "stride_wn": "i32", "stride_dxm": "i32",
                   "QMAX_X": "constexpr", "QMAX_W": "constexpr", "HAS_KEEP": "constexpr", "SOFT": "constexpr",
                   "STORE_DX": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr",
                   "GROUP_M": "constexpr"},
        constexprs={"QMAX_X": (1 << a_bits) - 1, "QMAX_W": (1 << w_bits) - 1, "HAS_KEEP": keep, "SOFT": soft,
                    "STORE_DX": store_dx, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
        label=f"a{a_bits}w{w_bits},{'keep' if keep else 'no_keep'},{'soft' if soft else 'hard'},"
              f"{'dx' if store_dx else 'ds_only'},{bm}x{bn}x{bk}",
        options={"num_warps": warps, "num_stages": _NUM_STAGES})


def _dw_spec(a_bits, w_bits, keep, store_db) -> KernelSpec:
    bm, bn, bk, warps = _GPU_BLOCKS["dw"]
    return KernelSpec(
        kernel=_fq_linear_dw_kernel,
        signature={"dy_ptr": "*fp32", **_COMMON, "gs_ptr": "*fp32", "dalpha_ptr": "*fp32", "db_ptr": "*fp32",
                   "M": "i32", "N": "i32", "K": "i32", "rows_per_split": "i32", "stride_dym": "i32",
                   "stride_xm": "i32", "stride_keepm": "i32", "stride_wn": "i32",
                   "QMAX_X": "constexpr", "QMAX_W": "constexpr", "HAS_KEEP": "constexpr", "STORE_DB": "constexpr",
                   "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr", "GROUP_N": "constexpr"},
        constexprs={"QMAX_X": (1 << a_bits) - 1, "QMAX_W": (1 << w_bits) - 1, "HAS_KEEP": keep,
                    "STORE_DB": store_db, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_N": 8},
        label=f"a{a_bits}w{w_bits},{'keep' if keep else 'no_keep'},{'db' if store_db else 'no_db'},{bm}x{bn}x{bk}",
        options={"num_warps": warps, "num_stages": _NUM_STAGES})


# The launches of a reconstruction step at W4A4 with QDrop and soft rounding (the hot
# loop), and the corners: 8-bit codes, hard rounding, no QDrop, no bias, ds_x only.
COMPILE_SPECS = [
    _fwd_spec(4, 4, True, True, True),
    _fwd_spec(8, 3, False, False, False),
    _dx_spec(4, 4, True, True, True),
    _dx_spec(8, 3, False, False, False),
    _dw_spec(4, 4, True, False),
    _dw_spec(8, 3, False, True),
]
