"""Per-token symmetric int8 quantization in Triton.

Contract (shared with the PyTorch reference ``fastquant.ops.quantize_int8.torch_quantize_per_token_int8``
and the CUDA kernel in ``csrc/quant_int8.cu``; the three agree bit for bit on finite input):

    x is read as float32 (fp16 and bf16 convert exactly; fp64 is rounded to float32 first)
    scale[r] = max(amax(|x[r, :]|) / 127, 1e-8)          correctly rounded float32 division
    q[r, c]  = clamp(round_half_to_even(x[r, c] / scale[r]), -127, 127) as int8

-128 is never produced, so the range is symmetric and -q never overflows. The clamp of the
scale keeps an all-zero row finite (it quantizes to zeros with scale 1e-8) instead of 0/0.
Both divisions use ``tl.div_rn``: Triton's ``/`` on fp32 compiles to the approximate
``div.full.f32`` on NVIDIA GPUs, which would disagree with PyTorch in the last bit and so,
at a rounding tie, in the integer. NaN and infinity in the input are outside the contract.
"""
from __future__ import annotations

import triton
import triton.language as tl

from . import KernelSpec, check_device, is_interpreted

# A tile holds at most this many elements; rows longer than the widest tile are walked
# in chunks (two passes over global memory instead of one).
_TILE_ELEMENTS = 4096
_MAX_BLOCK_N = 4096
_MAX_BLOCK_M = 16


@triton.jit
def _round_half_to_even(y):
    """Round to the nearest integer, ties to even, as ``torch.round`` does.

    Built from ``floor`` because libdevice's ``rint`` does not run in Triton's CPU
    interpreter. ``frac = y - floor(y)`` is exact in float32 (Sterbenz) except for y in
    (-0.5, 0), where it may round up to 0.5 or 1.0; there floor(y) = -1 is odd, so every
    outcome rounds up to the right answer, 0. Elsewhere the tie test ``frac == 0.5`` is
    exact. ``lower - 2 * floor(lower / 2)`` is 1 for odd and 0 for even integers, negative
    ones included.
    """
    lower = tl.floor(y)
    frac = y - lower
    lower_is_odd = (lower - 2.0 * tl.floor(lower * 0.5)) == 1.0
    round_up = (frac > 0.5) | ((frac == 0.5) & lower_is_odd)
    return tl.where(round_up, lower + 1.0, lower)


@triton.jit
def _row_scale(amax):
    return tl.maximum(tl.div_rn(amax, tl.full(amax.shape, 127.0, tl.float32)), 1e-8)


@triton.jit
def _quantize_tile(x, scale):
    y = _round_half_to_even(tl.div_rn(x, scale[:, None]))
    return tl.minimum(tl.maximum(y, -127.0), 127.0).to(tl.int8)


@triton.jit
def _quantize_per_token_int8_kernel(
    # Pointers: x is [M, N] with unit column stride, q is [M, N] int8, scale is [M] fp32.
    x_ptr, q_ptr, scale_ptr,
    # Sizes.
    M, N,
    # Row strides in elements.
    stride_xm, stride_qm,
    # BLOCK_M rows per program, BLOCK_N columns per chunk; ONE_TILE when BLOCK_N >= N.
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ONE_TILE: tl.constexpr,
):
    """Quantize BLOCK_M rows of x per program (the contract is in the module docstring).

    Grid: (cdiv(M, BLOCK_M),). When a whole row fits in one tile (ONE_TILE) the tile stays
    in registers between the amax reduction and the quantization, so x is read once;
    otherwise a first loop over BLOCK_N-column chunks finds amax and a second loop reads
    the chunks again to quantize them. Masked lanes load 0, which cannot raise an amax.
    """
    pid = tl.program_id(0)
    # 64-bit row offsets: rows * stride overflows int32 on tensors beyond 2**31 elements.
    rows = (pid * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_ok = rows < M
    cols = tl.arange(0, BLOCK_N)
    x_rows = x_ptr + rows[:, None] * stride_xm
    q_rows = q_ptr + rows[:, None] * stride_qm

    if ONE_TILE:
        mask = row_ok[:, None] & (cols[None, :] < N)
        x = tl.load(x_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        scale = _row_scale(tl.max(tl.abs(x), axis=1))
        tl.store(q_rows + cols[None, :], _quantize_tile(x, scale), mask=mask)
    else:
        amax = tl.zeros([BLOCK_M], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            c = start + cols
            mask = row_ok[:, None] & (c[None, :] < N)
            x = tl.load(x_rows + c[None, :], mask=mask, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
        scale = _row_scale(amax)
        for start in range(0, N, BLOCK_N):
            c = start + cols
            mask = row_ok[:, None] & (c[None, :] < N)
            x = tl.load(x_rows + c[None, :], mask=mask, other=0.0).to(tl.float32)
            tl.store(q_rows + c[None, :], _quantize_tile(x, scale), mask=mask)

    tl.store(scale_ptr + rows, scale, mask=row_ok)


INTERPRETED = is_interpreted(_quantize_per_token_int8_kernel)


def triton_quantize_per_token_int8(x, *, block_n: int | None = None):
    """Per-token symmetric int8 quantization of ``x`` with the Triton kernel.

    ``x``: a floating-point tensor of shape [..., N], N > 0, on a CUDA device (or on the CPU
    when Triton runs in interpreter mode); any strides (a non-contiguous x is copied).
    Returns ``(q, scale)``: q int8 of x's shape, contiguous; scale float32 of shape
    x.shape[:-1]. ``block_n`` overrides the column chunk (a power of two), so tests can
    exercise the chunked path on short rows.
    """
    import torch

    name = "triton_quantize_per_token_int8"
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"{name}: expected shape [..., N] with N > 0, got {tuple(x.shape)}")
    if block_n is not None and (block_n <= 0 or block_n & (block_n - 1)):
        raise ValueError(f"{name}: block_n must be a positive power of two, got {block_n}")
    check_device(x, name, INTERPRETED)

    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    q = torch.empty((m, n), dtype=torch.int8, device=x.device)
    scale = torch.empty((m,), dtype=torch.float32, device=x.device)
    if m > 0:
        block_n = block_n or min(triton.next_power_of_2(n), _MAX_BLOCK_N)
        block_m = max(1, min(_MAX_BLOCK_M, _TILE_ELEMENTS // block_n, triton.next_power_of_2(m)))
        grid = (triton.cdiv(m, block_m),)
        _quantize_per_token_int8_kernel[grid](
            x2, q, scale,
            m, n,
            x2.stride(0), q.stride(0),
            BLOCK_M=block_m, BLOCK_N=block_n, ONE_TILE=block_n >= n,
            num_warps=4,
        )
    return q.view(x.shape), scale.view(x.shape[:-1])


def _spec(dtype: str, block_m: int, block_n: int, one_tile: bool) -> KernelSpec:
    return KernelSpec(
        kernel=_quantize_per_token_int8_kernel,
        signature={
            "x_ptr": f"*{dtype}", "q_ptr": "*i8", "scale_ptr": "*fp32",
            "M": "i32", "N": "i32", "stride_xm": "i32", "stride_qm": "i32",
            "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "ONE_TILE": "constexpr",
        },
        constexprs={"BLOCK_M": block_m, "BLOCK_N": block_n, "ONE_TILE": one_tile},
        label=f"{dtype},{'one_tile' if one_tile else 'chunked'},{block_m}x{block_n}",
    )


# ViT-S rows (384 wide) in one tile for each input type, and a 3072-wide MLP row in chunks.
COMPILE_SPECS = [
    _spec("fp32", 8, 512, True),
    _spec("fp16", 8, 512, True),
    _spec("bf16", 8, 512, True),
    _spec("fp32", 1, 1024, False),
]
