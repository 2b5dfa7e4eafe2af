"""Learnable quantization state for reconstruction: AdaRound, LSQ and QDrop.

During reconstruction the quantizers of the reconstructed layers are wrapped, by
swapping the attributes that hold them (a layer's ``weight_quant`` and ``input_quant``, a
matmul's ``a_quant`` / ``b_quant``; ``fastquant.recon.learnable`` does it); the quantizer
classes and quantized modules are not changed. A wrapper holds the original quantizer as
a child, follows its ``mode`` (``off`` passes values through, so the model still runs in
float with its quantizers off) and, when reconstruction ends, writes its result back into
plain quantizer state:

- :class:`AdaRoundWeight` (AdaRound, arXiv 2004.10568) learns, for each weight, whether
  to round down or up on the calibrated per-channel grid (scale and zero point fixed):
  ``W~ = s * (clamp(floor(W/s) + h(V) + z, 0, qmax) - z)`` with the rectified sigmoid
  ``h(V) = clamp(1.2 sigmoid(V) - 0.1, 0, 1)``; V starts where h(V) is the fractional
  part of W/s, so the soft weight starts equal to W. Hard rounding takes ``h = [V >= 0]``.
  Write-back sets ``W = s * (q - z)`` for the chosen integer codes q, which the
  quantizer's round-to-nearest maps back to exactly q.
- :class:`ActQuant` makes an activation quantizer's step a learnable parameter (LSQ,
  arXiv 1902.08153: straight-through rounding, the zero point fixed) and applies QDrop
  (arXiv 2203.05740): in training, each element of the quantized activation is replaced
  by its float value with probability ``drop_p``. Quantizers without a calibrated step
  (``step()`` is None: per-token, logarithmic) get QDrop only. Write-back copies the
  learned step into the quantizer's ``scale`` buffer.

Both are :class:`Learnable` quantizers: what reconstruction switches while a unit trains
(``soft`` rounding, an operand passed through in ``float``, QDrop's probability and random
generator) is set through :meth:`Learnable.configure`, never attribute by attribute.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .base import Quantizer
from .functional import (fake_quant_uniform, inverse_rectified_sigmoid, rectified_sigmoid,  # noqa: F401
                         rounding_regularizer)

MIN_SCALE = 1e-8


def beta_at(it: int, iters: int, warmup: float, beta: tuple[float, float]) -> float | None:
    """The rounding regulariser's exponent at iteration ``it``: None (off) during the warm-up
    (the first ``warmup`` fraction), then linear from ``beta[0]`` down to ``beta[1]``."""
    start = int(warmup * iters)
    if it < start:
        return None
    rel = (it - start) / max(iters - start, 1)
    return beta[1] + (beta[0] - beta[1]) * (1 - rel)


class Learnable(nn.Module):
    """A learnable wrapper around a :class:`~fastquant.quant.base.Quantizer` (``quantizer``).

    ``configure(float_=..., soft=..., drop_p=..., generator=...)`` sets what a training step
    uses; ``reset()`` goes back to the plain hard-rounded, quantized, QDrop-free state;
    ``trained`` marks wrappers whose result is written back."""

    def __init__(self, quantizer: Quantizer):
        super().__init__()
        self.quantizer = quantizer
        self.float_ = False  # pass the operand through in float (a stage of a unit's training)
        self.trained = False

    @property
    def kind(self) -> str:
        return self.quantizer.kind

    @property
    def bits(self) -> int:
        return self.quantizer.bits

    @property
    def qmax(self) -> int:
        return self.quantizer.qmax

    @property
    def quantizing(self) -> bool:
        """Whether forward() quantizes (the quantizer is on and the operand not passed in float)."""
        return self.quantizer.mode == "quant" and not self.float_

    def configure(self, **settings):
        for name, value in settings.items():
            if name not in self._SETTINGS:
                raise TypeError(f"{type(self).__name__}.configure: unknown setting {name!r}")
            setattr(self, self._SETTINGS[name], value)
        return self

    def reset(self):
        raise NotImplementedError


class AdaRoundWeight(Learnable):
    """Learnable rounding of a layer's weight on its calibrated per-channel grid."""

    _SETTINGS = {"float_": "float_", "soft": "soft"}

    def __init__(self, quantizer: Quantizer, weight: torch.Tensor):
        super().__init__(quantizer)
        with torch.no_grad():
            x = weight.detach() / quantizer.scale
            floor = torch.floor(x)
            self.register_buffer("w_floor", floor)  # saved with the state: V is relative to it
            self.alpha = nn.Parameter(inverse_rectified_sigmoid(x - floor))
        self.soft = False
        self.start: Optional[torch.Tensor] = None  # the weight the rounding started from, if not the layer's

    @torch.no_grad()
    def start_from(self, start: torch.Tensor, restart: bool = True):
        """Restart the rounding from ``start`` (a weight of the layer's shape) instead of the
        layer's float weight: the two grid points around it, h = frac(start / s), so that
        the hard rounding begins as ``start``'s round-to-nearest (for GPTQ's compensated
        weights, GPTQ's rounding). The layer's weight stays as it is (float stages use it);
        :meth:`blend` moves toward ``start``. ``restart=False`` only records ``start`` for
        :meth:`blend` (for a resumed run, whose rounding comes from its saved state)."""
        if restart:
            x = start.detach().to(self.w_floor) / self.quantizer.scale
            self.w_floor.copy_(torch.floor(x))
            self.alpha.copy_(inverse_rectified_sigmoid(x - self.w_floor))
        self.start = start.detach().clone()

    def reset(self):
        self.soft, self.float_ = False, False

    def extra_repr(self) -> str:
        return f"shape={tuple(self.alpha.shape)}, soft={self.soft}, trained={self.trained}"

    def h(self) -> torch.Tensor:
        return rectified_sigmoid(self.alpha)

    def hard_codes(self) -> torch.Tensor:
        q = self.quantizer
        return torch.clamp(self.w_floor + (self.alpha >= 0).to(self.w_floor.dtype) + q.zero_point, 0, q.qmax)

    def regularizer(self, beta: float) -> torch.Tensor:
        return rounding_regularizer(self.h(), beta)

    @torch.no_grad()
    def blend(self, weight: torch.Tensor, keep: float):
        """Move the rounding toward the float weight: h <- keep * h + (1 - keep) * frac(W/s)
        (toward the weight of :meth:`start_from` where the rounding started from one).
        With ``keep = 0.5`` a decided rounding (h = 0 or 1) keeps its hard decision but
        sits halfway to the float weight, where the loss can still move it; ``keep = 1``
        keeps V as it is, ``keep = 0`` restarts from the float weight."""
        anchor = weight if self.start is None else self.start
        frac = anchor.detach() / self.quantizer.scale - self.w_floor
        self.alpha.copy_(inverse_rectified_sigmoid(keep * self.h() + (1 - keep) * frac.clamp(0, 1)))

    def grid(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The quantized weight as (codes - zero point, per-channel scale); None when the
        weight passes through in float."""
        q = self.quantizer
        if not self.quantizing:
            return None
        h = self.h() if self.soft else (self.alpha >= 0).to(w.dtype)
        codes = torch.clamp(self.w_floor + h + q.zero_point, 0, q.qmax)
        return codes - q.zero_point, q.scale

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        g = self.grid(w)
        return w if g is None else g[0] * g[1]

    @torch.no_grad()
    def write_back(self, weight: torch.Tensor) -> Quantizer:
        """Set ``weight`` (the layer's, in place) to the hard-rounded weight if trained; return
        the plain quantizer to put back in the wrapper's place."""
        q = self.quantizer
        if self.trained:
            weight.copy_(((self.hard_codes() - q.zero_point) * q.scale).to(weight.dtype))
        return q


class ActQuant(Learnable):
    """An activation quantizer with a learnable step (LSQ) and QDrop."""

    _SETTINGS = {"float_": "float_", "drop_p": "drop_p", "generator": "generator"}

    def __init__(self, quantizer: Quantizer):
        super().__init__(quantizer)
        step = quantizer.step()
        self.scale = nn.Parameter(step.detach().clone()) if step is not None else None
        self.drop_p = 0.0  # QDrop probability while its unit trains
        self.generator: Optional[torch.Generator] = None

    def reset(self):
        self.float_, self.drop_p, self.generator = False, 0.0, None

    def extra_repr(self) -> str:
        return f"lsq={self.scale is not None}, drop_p={self.drop_p}, float={self.float_}, trained={self.trained}"

    def quant(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale is None:
            return self.quantizer(x)
        q = self.quantizer
        return fake_quant_uniform(x, self.scale.clamp_min(MIN_SCALE), q.zero_point, q.qmax)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.quantizing:
            return x
        xq = self.quant(x)
        if self.drop_p > 0:
            xq = torch.lerp(xq, x, keep_mask(x, self.drop_p, self.generator))
        return xq

    def grid(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The output of ``forward`` as (grid, scale) with ``grid * scale == forward(x)``:
        codes minus the zero point, and ``x / scale`` where QDrop keeps the float value.
        None unless the step is one learnable scalar (LSQ, per tensor) and quantizing."""
        if not self.quantizing or self.scale is None or self.scale.numel() != 1:
            return None
        q = self.quantizer
        s = self.scale.clamp_min(MIN_SCALE)
        keep = keep_mask(x, self.drop_p, self.generator) if self.drop_p > 0 else None
        return LsqGrid.apply(x, s, q.zero_point, q.qmax, keep), s

    @torch.no_grad()
    def write_back(self) -> Quantizer:
        """Copy the learned step into the quantizer if trained; return the plain quantizer to
        put back in the wrapper's place."""
        if self.scale is not None and self.trained:
            self.quantizer.scale.copy_(self.scale.clamp_min(MIN_SCALE))
        return self.quantizer


def keep_mask(x: torch.Tensor, p: float, generator: torch.Generator | None,
              dtype: torch.dtype | None = None) -> torch.Tensor:
    """QDrop's mask for ``x``: 1.0 (keep the float value) with probability ``p`` rounded to
    a multiple of 1/256, else 0.0, in ``dtype`` (default: ``x``'s; ``torch.bool`` skips the
    conversion, for the fused kernels). Drawn as random bytes (eight per 64-bit draw),
    several times faster on the CPU than one float draw per element; the same draws
    whatever the dtype."""
    dtype = x.dtype if dtype is None else dtype
    threshold = round(p * 256)
    if threshold <= 0 or threshold >= 256:
        return torch.full(x.shape, threshold > 0, dtype=dtype, device=x.device)
    n = x.numel()
    words = torch.randint(-2 ** 63, 2 ** 63 - 1, ((n + 7) // 8,), generator=generator, device=x.device,
                          dtype=torch.int64)
    mask = (words.view(torch.uint8)[:n] < threshold).view(x.shape)
    return mask if dtype == torch.bool else mask.to(dtype)


class LsqGrid(torch.autograd.Function):
    """``g = clamp(round(x/s) + z, 0, qmax) - z``, and ``x/s`` where ``keep`` is 1, with
    LSQ's straight-through gradients in one pass: for elements inside the clipping range
    or kept, dg/dx = 1/s and dg/ds = -x/s^2; zero for clipped ones. Equal to autograd
    through ``round_ste`` and ``torch.where`` (tests compare them) with fewer
    element-wise passes, which dominate a CPU training step."""

    @staticmethod
    def forward(ctx, x, s, zero_point, qmax: int, keep):
        v = x / s
        r = torch.round(v) + zero_point
        g = torch.clamp(r, 0, qmax) - zero_point
        passed = ((r >= 0) & (r <= qmax)).to(x.dtype)
        if keep is not None:
            g = torch.lerp(g, v, keep)
            passed = torch.maximum(passed, keep)
        ctx.save_for_backward(v, s, passed)
        return g

    @staticmethod
    def backward(ctx, grad):
        v, s, passed = ctx.saved_tensors
        gp = grad * passed
        gx = gp / s if ctx.needs_input_grad[0] else None
        gs = None
        if ctx.needs_input_grad[1]:
            gs = (-(gp * v).sum() / s).reshape(s.shape)
        return gx, gs, None, None, None
