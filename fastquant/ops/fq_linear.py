"""The reconstruction hot loop's fake-quant linear layer, forward and backward, as one op.

Contract (the Triton kernels in ``kernels/fq_linear.py`` compute the same; the PyTorch
twin :func:`torch_fq_linear` is their tests' oracle). Inputs: ``x`` [M, K] float32 (the
caller flattens leading dims); the activation quantizer's per-tensor step ``s_x`` (one
element, > 0: LSQ's learnable step, already clamped), zero point ``z_x`` (one
integer-valued element) and ``qmax_x = 2^a_bits - 1``; an optional QDrop mask ``keep``
of x's shape (bool, uint8 or float, 0 or 1); AdaRound's rounding variables ``alpha`` and
``w_floor = floor(W / s_w)`` [N, K], the weight quantizer's per-channel step ``s_w`` [N]
(or [N, 1]) and zero point ``z_w`` ([N], [N, 1] or one element), ``qmax_w``; an optional
``bias`` [N]; ``soft`` (AdaRound's soft rounding, else hard). In float32:

    v     = x / s_x                                         (IEEE division)
    r     = round_half_to_even(v) + z_x
    g_x   = clamp(r, 0, qmax_x) - z_x,  and v where keep    (LsqGrid)
    pass  = 0 <= r <= qmax_x,  or keep
    h     = clamp(sigmoid(alpha) * 1.2 - 0.1, 0, 1)  soft,  [alpha >= 0]  hard
    c     = (w_floor + h) + z_w
    g_w   = clamp(c, 0, qmax_w) - z_w                        (AdaRoundWeight.grid)
    y     = (g_x @ g_w^T) * (s_x * s_w) + bias               (grid_linear)

which is ``QuantLinear._grid_forward`` of a layer whose quantizers are wrapped by
``ActQuant`` (per-tensor LSQ step, QDrop) and ``AdaRoundWeight``, with the product in
float32. Gradients are autograd's through that composition (LSQ's straight-through
rounding; clamps pass the gradient at their bounds, as ``torch.clamp`` does). With
``dys = dy * s_w`` and ``G = dys @ g_w`` [M, K]:

    dL/dg_x = s_x G,  dg_x/dx = pass / s_x         =>  dx     = G * pass
    y depends on s_x directly (sum(g_x * G)) and through g_x (dg_x/ds_x = -v / s_x
    where pass)                                    =>  ds_x   = sum(G * (g_x - pass * v))
    dL/dg_w = s_x dys^T @ g_x, dh/dalpha = 1.2 sig (1 - sig) inside both clamps
                                                   =>  dalpha = s_x s_w (dy^T @ g_x) * 1.2 sig (1 - sig)
                                                                * [0 <= h_pre <= 1] * [0 <= c <= qmax_w]
                                                       db     = sum_m dy

``ds_x`` sums ``round(v) - v`` inside the range, the clipped code outside it, and 0 for
kept elements, in one term per element (autograd sums two large terms that cancel). Hard
rounding gives alpha no gradient (None, as autograd through ``alpha >= 0`` does);
``s_w``, ``z_x``, ``z_w``, ``w_floor`` and ``keep`` get none.

:func:`torch_fq_linear` (autograd through plain ops) is the oracle. The ops
``fq_linear_fwd`` and ``fq_linear_bwd`` (``fastquant.ops.op``; torch.library fakes for
torch.compile) have the backends ``torch`` (``torch_fq_linear_forward`` /
``torch_fq_linear_backward``: the same formulas written out) and ``triton`` (CUDA);
:class:`FqLinearFunction` ties them together for autograd and :func:`fq_linear` is the
public function.

The Triton kernels take the products on fp16 tensor cores with fp32 accumulation: exact
for hard-rounded codes (integers up to 2^11 are fp16 values; every partial sum is exact
while ``K qmax_x qmax_w < 2^24``, e.g. 4 bits at any ViT width), while soft-rounded
weight codes and QDrop's float elements ``x / s_x`` are rounded to fp16 (relative 2^-11;
kept elements beyond fp16's range, 65504 steps, are outside the contract). The backward
products scale ``dy`` by a power of two per tensor before rounding it to fp16, so
gradients far below fp16's normal range keep 11 significant bits (exactly undone in the
epilogue); the bounds are derived in tests/test_kernels_fq_linear.py.

:func:`fused_recon_linear` is the seam ``QuantLinear`` calls on CUDA tensors during
reconstruction: it runs a layer through the fused op when its quantizers are the recon
wrappers (``ActQuant`` with a per-tensor learnable step, ``AdaRoundWeight``), a fused
backend is registered for CUDA and ``fastquant.settings.fused_recon()`` is on
(``FASTQUANT_FUSED_RECON=0`` turns it off, for comparisons), and returns None otherwise
(the caller's reference path).
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import settings
from ..quant.functional import GAMMA, ZETA
from ..quant.learnable import MIN_SCALE, ActQuant, AdaRoundWeight, keep_mask
from .grid import grid_linear
from .op import declare

__all__ = ["FQ_LINEAR_FWD", "FQ_LINEAR_BWD", "FqLinearFunction", "fq_linear", "fq_grids", "fused_recon_linear",
           "recon_operands", "torch_fq_linear", "torch_fq_linear_backward", "torch_fq_linear_forward"]


# -- the PyTorch twin ------------------------------------------------------------------------
def _round_ste(v: torch.Tensor) -> torch.Tensor:
    return (torch.round(v) - v).detach() + v  # round(v) exactly; the gradient passes straight through


def _keep_bool(keep: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if keep is None or keep.dtype == torch.bool:
        return keep
    return keep != 0


def _weight_h(alpha: torch.Tensor, soft: bool) -> torch.Tensor:
    if soft:
        return torch.clamp(torch.sigmoid(alpha) * (ZETA - GAMMA) + GAMMA, 0, 1)
    return (alpha >= 0).to(alpha.dtype)


def fq_grids(x, s_x, z_x, qmax_x: int, keep, alpha, w_floor, z_w, qmax_w: int, soft: bool):
    """``(g_x, v, passed, g_w)`` of the contract, in float32 PyTorch ops (no autograd
    needed): the grids every backend multiplies. ``passed`` is bool."""
    v = x / s_x
    r = torch.round(v) + z_x
    g_x = torch.clamp(r, 0, qmax_x) - z_x
    passed = (r >= 0) & (r <= qmax_x)
    keep = _keep_bool(keep)
    if keep is not None:
        g_x = torch.where(keep, v, g_x)
        passed = passed | keep
    z_w = z_w.reshape(-1, 1) if z_w.numel() > 1 else z_w.reshape(())
    g_w = torch.clamp(w_floor + _weight_h(alpha, soft) + z_w, 0, qmax_w) - z_w
    return g_x, v, passed, g_w


def torch_fq_linear(x, s_x, z_x, qmax_x: int, keep, alpha, w_floor, s_w, z_w, qmax_w: int, bias, soft: bool):
    """The contract as plain PyTorch ops, differentiated by autograd: the oracle.

    The same composition as ``ActQuant.grid`` (``LsqGrid``), ``AdaRoundWeight.grid`` and
    ``grid_linear(..., dtype=torch.float32)``; gradients flow to x, s_x, alpha (soft
    rounding only) and bias, as far as they require them."""
    v = x / s_x
    g_x = torch.clamp(_round_ste(v) + z_x, 0, qmax_x) - z_x
    keep = _keep_bool(keep)
    if keep is not None:
        g_x = torch.where(keep, v, g_x)
    z_w = z_w.reshape(-1, 1) if z_w.numel() > 1 else z_w.reshape(())
    g_w = torch.clamp(w_floor + _weight_h(alpha, soft) + z_w, 0, qmax_w) - z_w
    return grid_linear(g_x, s_x, g_w, s_w, bias, torch.float32)


def _weight_grad_factor(alpha, w_floor, z_w, qmax_w: int) -> torch.Tensor:
    """dg_w/dalpha of soft rounding: 1.2 sig (1 - sig) where neither clamp is active."""
    sig = torch.sigmoid(alpha)
    h_pre = sig * (ZETA - GAMMA) + GAMMA
    z_w = z_w.reshape(-1, 1) if z_w.numel() > 1 else z_w.reshape(())
    c = w_floor + torch.clamp(h_pre, 0, 1) + z_w
    ok = (h_pre >= 0) & (h_pre <= 1) & (c >= 0) & (c <= qmax_w)
    return torch.where(ok, (ZETA - GAMMA) * sig * (1 - sig), torch.zeros_like(sig))


def torch_fq_linear_forward(x, s_x, z_x, qmax_x: int, keep, alpha, w_floor, s_w, z_w, qmax_w: int, bias,
                            soft: bool) -> torch.Tensor:
    """y of the contract (no autograd): the ops' CPU implementation."""
    g_x, _, _, g_w = fq_grids(x, s_x, z_x, qmax_x, keep, alpha, w_floor, z_w, qmax_w, soft)
    y = (g_x @ g_w.t()) * (s_x * s_w.reshape(-1))
    return y if bias is None else y + bias


def torch_fq_linear_backward(dy, x, s_x, z_x, qmax_x: int, keep, alpha, w_floor, s_w, z_w, qmax_w: int, soft: bool,
                             need_dx: bool, need_ds: bool, need_dalpha: bool, need_db: bool):
    """``(dx, ds_x, dalpha, db)`` of the contract, each None unless asked for (dalpha
    only with soft rounding): the ops' CPU implementation."""
    g_x, v, passed, g_w = fq_grids(x, s_x, z_x, qmax_x, keep, alpha, w_floor, z_w, qmax_w, soft)
    s_w = s_w.reshape(-1)
    dx = ds = dalpha = db = None
    if need_dx or need_ds:
        G = (dy * s_w) @ g_w
        if need_dx:
            dx = torch.where(passed, G, torch.zeros_like(G))
        if need_ds:
            ds = (G * torch.where(passed, g_x - v, g_x)).sum().reshape(s_x.shape)
    if need_dalpha and soft:
        dalpha = ((s_x.reshape(()) * s_w)[:, None] * (dy.t() @ g_x)) * _weight_grad_factor(alpha, w_floor, z_w, qmax_w)
    if need_db:
        db = dy.sum(0)
    return dx, ds, dalpha, db


# -- the ops ----------------------------------------------------------------------------------
def _lib_fwd(x: torch.Tensor, s_x: torch.Tensor, z_x: torch.Tensor, qmax_x: int, keep: Optional[torch.Tensor],
             alpha: torch.Tensor, w_floor: torch.Tensor, s_w: torch.Tensor, z_w: torch.Tensor, qmax_w: int,
             bias: Optional[torch.Tensor], soft: bool) -> torch.Tensor:
    return FQ_LINEAR_FWD(x, s_x, z_x, qmax_x, keep, alpha, w_floor, s_w, z_w, qmax_w, bias, soft)


def _fake_fwd(x, s_x, z_x, qmax_x, keep, alpha, w_floor, s_w, z_w, qmax_w, bias, soft):
    return x.new_empty((x.shape[0], alpha.shape[0]))


FQ_LINEAR_FWD = declare("fq_linear_fwd", torch_fq_linear_forward, _fake_fwd, _lib_fwd)


def _empty_for_none(grads, x):
    return tuple(x.new_empty(0) if g is None else g for g in grads)


def _lib_bwd(dy: torch.Tensor, x: torch.Tensor, s_x: torch.Tensor, z_x: torch.Tensor, qmax_x: int,
             keep: Optional[torch.Tensor], alpha: torch.Tensor, w_floor: torch.Tensor, s_w: torch.Tensor,
             z_w: torch.Tensor, qmax_w: int, soft: bool, need_dx: bool, need_ds: bool, need_dalpha: bool,
             need_db: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, ds_x, dalpha, db); a gradient not asked for is an empty tensor."""
    grads = FQ_LINEAR_BWD(dy, x, s_x, z_x, qmax_x, keep, alpha, w_floor, s_w, z_w, qmax_w, soft,
                          need_dx, need_ds, need_dalpha, need_db)
    return _empty_for_none(grads, x)


def _fake_bwd(dy, x, s_x, z_x, qmax_x, keep, alpha, w_floor, s_w, z_w, qmax_w, soft, need_dx, need_ds, need_dalpha,
              need_db):
    empty = x.new_empty(0)
    return (x.new_empty(x.shape) if need_dx else empty,
            s_x.new_empty(s_x.shape) if need_ds else empty,
            alpha.new_empty(alpha.shape) if need_dalpha and soft else empty,
            x.new_empty((alpha.shape[0],)) if need_db else empty)


FQ_LINEAR_BWD = declare("fq_linear_bwd", torch_fq_linear_backward, _fake_bwd, _lib_bwd)


class FqLinearFunction(torch.autograd.Function):
    """Autograd of the contract: forward and backward through one backend (None: the
    tensors' preferred one). Saves only the inputs (x, keep and the rounding state); the
    grids are recomputed in the backward."""

    @staticmethod
    def forward(ctx, x, s_x, z_x, qmax_x, keep, alpha, w_floor, s_w, z_w, qmax_w, bias, soft, backend):
        y = FQ_LINEAR_FWD(x, s_x, z_x, qmax_x, keep, alpha, w_floor, s_w, z_w, qmax_w, bias, soft, backend=backend)
        ctx.save_for_backward(x, s_x, z_x, keep, alpha, w_floor, s_w, z_w)
        ctx.meta = (qmax_x, qmax_w, soft, backend)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, s_x, z_x, keep, alpha, w_floor, s_w, z_w = ctx.saved_tensors
        qmax_x, qmax_w, soft, backend = ctx.meta
        need = ctx.needs_input_grad
        need_dx, need_ds, need_dalpha, need_db = need[0], need[1], need[5] and soft, need[10]
        if not (need_dx or need_ds or need_dalpha or need_db):
            return (None,) * 13
        dx, ds, dalpha, db = FQ_LINEAR_BWD(dy.contiguous(), x, s_x, z_x, qmax_x, keep, alpha, w_floor, s_w, z_w,
                                           qmax_w, soft, need_dx, need_ds, need_dalpha, need_db, backend=backend)
        return dx, ds, None, None, None, dalpha, None, None, None, None, db, None, None


def _check(x, s_x, z_x, qmax_x, keep, alpha, w_floor, s_w, z_w, qmax_w, bias):
    name = "fq_linear"
    if x.dim() != 2 or x.dtype != torch.float32:
        raise ValueError(f"{name}: x must be a 2-D float32 tensor [M, K], got {x.dtype} of shape {tuple(x.shape)}")
    m, k = x.shape
    if alpha.shape != w_floor.shape or alpha.dim() != 2 or alpha.shape[1] != k:
        raise ValueError(f"{name}: alpha and w_floor must be [N, K] with K = {k}, got {tuple(alpha.shape)} and "
                         f"{tuple(w_floor.shape)}")
    n = alpha.shape[0]
    if s_x.numel() != 1 or z_x.numel() != 1:
        raise ValueError(f"{name}: s_x and z_x must have one element each (a per-tensor step), got "
                         f"{tuple(s_x.shape)} and {tuple(z_x.shape)}")
    if s_w.numel() != n or z_w.numel() not in (1, n):
        raise ValueError(f"{name}: s_w must have N = {n} elements and z_w N or one, got {tuple(s_w.shape)} and "
                         f"{tuple(z_w.shape)}")
    if keep is not None and keep.shape != x.shape:
        raise ValueError(f"{name}: keep must have x's shape {tuple(x.shape)}, got {tuple(keep.shape)}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"{name}: bias must be [N] = [{n}], got {tuple(bias.shape)}")
    for q, what in ((qmax_x, "qmax_x"), (qmax_w, "qmax_w")):
        if q not in tuple((1 << b) - 1 for b in range(2, 9)):
            raise ValueError(f"{name}: {what} must be 2^bits - 1 with 2..8 bits, got {q}")


def fq_linear(x, s_x, z_x, qmax_x: int, keep, alpha, w_floor, s_w, z_w, qmax_w: int, bias=None, soft: bool = True,
              *, backend: Optional[str] = None) -> torch.Tensor:
    """y [M, N] of the module docstring's contract, differentiable in x, s_x, alpha (soft
    rounding) and bias. ``backend``: None (the tensors' preferred backend: ``triton`` for
    CUDA tensors when Triton is there, else ``torch``) or a backend name."""
    _check(x, s_x, z_x, qmax_x, keep, alpha, w_floor, s_w, z_w, qmax_w, bias)
    return FqLinearFunction.apply(x, s_x, z_x, qmax_x, keep, alpha, w_floor, s_w, z_w, qmax_w, bias, soft, backend)


# -- the seam in QuantLinear -------------------------------------------------------------------
def recon_operands(layer, x: torch.Tensor) -> Optional[tuple]:
    """The arguments of :func:`fq_linear` for ``layer(x)`` (x flattened to [M, K]), or None
    unless the layer's quantizers are reconstruction's wrappers in the supported kinds (an
    ``ActQuant`` with one learnable step on a uniform grid, an ``AdaRoundWeight``; both
    quantizing, 2-8 bits). Draws the QDrop mask from the wrapper's generator, as
    ``ActQuant.grid`` does."""
    act, wq = layer.input_quant, layer.weight_quant
    if not (isinstance(act, ActQuant) and isinstance(wq, AdaRoundWeight)):
        return None
    if not (act.quantizing and wq.quantizing and act.kind == "uniform" and act.scale is not None
            and act.scale.numel() == 1):
        return None
    qa, qw = act.quantizer, wq.quantizer
    x2 = x.reshape(-1, x.shape[-1])
    keep = keep_mask(x2, act.drop_p, act.generator, dtype=torch.bool) if act.drop_p > 0 else None
    return (x2, act.scale.clamp_min(MIN_SCALE), qa.zero_point, qa.qmax, keep, wq.alpha, wq.w_floor, qw.scale,
            qw.zero_point, qw.qmax, layer.bias, wq.soft)


def fused_recon_linear(layer, x: torch.Tensor) -> Optional[torch.Tensor]:
    """``layer(x)`` through the fused op when it applies (float32 CUDA tensors, a fused
    backend registered for CUDA, ``fastquant.settings.fused_recon()`` on,
    :func:`recon_operands` not None), else None."""
    if not (settings.fused_recon() and x.is_cuda and x.dtype == torch.float32):
        return None
    if FQ_LINEAR_FWD.resolve("cuda") == "torch":
        return None
    args = recon_operands(layer, x)
    if args is None:
        return None
    y = fq_linear(*args)
    return y.reshape(*x.shape[:-1], y.shape[-1])
