"""Learnable quantization state for reconstruction: AdaRound, LSQ and QDrop.

During reconstruction the quantizers of the reconstructed blocks are wrapped, by
swapping the attributes that hold them (``QuantLinear.weight_quant``,
``QuantLinear.input_quant``, ``QuantMatMul.a_quant`` / ``b_quant``); the quantizer
classes and quantized modules are not changed. A wrapper holds the original
quantizer as a child, follows its ``mode`` (``off`` passes values through, so the
model still runs in float with ``set_mode(..., "off")``) and, when reconstruction
ends, writes its result back into plain quantizer state:

- :class:`AdaRoundWeight` (AdaRound, arXiv 2004.10568) learns, for each weight, whether
  to round down or up on the calibrated per-channel grid (scale and zero point fixed):
  ``W~ = s * (clamp(floor(W/s) + h(V) + z, 0, qmax) - z)`` with the rectified sigmoid
  ``h(V) = clamp(1.2 sigmoid(V) - 0.1, 0, 1)``; V starts where h(V) is the fractional
  part of W/s, so the soft weight starts equal to W. Hard rounding takes ``h = [V >= 0]``.
  Write-back sets ``W = s * (q - z)`` for the chosen integer codes q, which the
  quantizer's round-to-nearest maps back to exactly q.
- :class:`ActQuant` makes an activation quantizer's step size a learnable parameter (LSQ,
  arXiv 1902.08153: straight-through rounding, the zero point fixed) and applies QDrop
  (arXiv 2203.05740): in training, each element of the quantized activation is replaced
  by its float value with probability ``drop_p``. Quantizers without a calibrated step
  (per-token, logarithmic) get QDrop only. Write-back copies the learned step into the
  quantizer's ``scale`` buffer.

The wrappers are plain modules with parameters; :class:`LearnableState` installs them,
finds those of a unit, and writes everything back.
"""
from __future__ import annotations

import torch
from torch import nn

from ..modules import QuantConv2d, QuantLinear
from ..quantizers import LogQuantizer, UniformQuantizer, fake_quant_uniform

ZETA, GAMMA = 1.1, -0.1  # rectified sigmoid stretch: h = sigmoid(V) * (ZETA - GAMMA) + GAMMA, clamped to [0, 1]
MIN_SCALE = 1e-8


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)


def inverse_rectified_sigmoid(h: torch.Tensor) -> torch.Tensor:
    """V with ``rectified_sigmoid(V) == h`` for h in [0, 1] (finite at both ends)."""
    return -torch.log((ZETA - GAMMA) / (h - GAMMA) - 1)


def rounding_regularizer(h: torch.Tensor, beta: float) -> torch.Tensor:
    """AdaRound's ``sum(1 - |2h - 1|^beta)``: zero when every h is 0 or 1."""
    return (1 - (2 * h - 1).abs().pow(beta)).sum()


def beta_at(it: int, iters: int, warmup: float, beta: tuple[float, float]) -> float | None:
    """The regulariser's exponent at iteration ``it``: None (off) during the warm-up
    (the first ``warmup`` fraction), then linear from ``beta[0]`` down to ``beta[1]``."""
    start = int(warmup * iters)
    if it < start:
        return None
    rel = (it - start) / max(iters - start, 1)
    return beta[1] + (beta[0] - beta[1]) * (1 - rel)


class AdaRoundWeight(nn.Module):
    """Learnable rounding of a QuantLinear's weight on its calibrated per-channel grid."""

    def __init__(self, quantizer: UniformQuantizer, weight: torch.Tensor):
        super().__init__()
        self.quantizer = quantizer
        with torch.no_grad():
            x = weight.detach() / quantizer.scale
            floor = torch.floor(x)
            self.register_buffer("w_floor", floor)  # saved with the state: V is relative to it
            self.alpha = nn.Parameter(inverse_rectified_sigmoid(x - floor))
        self.soft = False
        self.float_weight = False  # pass the float weight through (POS's acts-first stage)
        self.trained = False  # only trained rounding is written back

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
    def carry(self, weight: torch.Tensor, keep: float):
        """Start a new level from this rounding: h <- keep * h + (1 - keep) * frac(W/s).
        With ``keep = 0.5`` a decided rounding (h = 0 or 1) keeps its hard decision but
        sits halfway to the float weight, where the loss can still move it; ``keep = 1``
        keeps V as it is, ``keep = 0`` restarts from the float weight."""
        frac = weight.detach() / self.quantizer.scale - self.w_floor
        self.alpha.copy_(inverse_rectified_sigmoid(keep * self.h() + (1 - keep) * frac.clamp(0, 1)))

    def grid(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The quantized weight as (codes - zero point, per-channel scale); None when the
        weight passes through in float."""
        q = self.quantizer
        if q.mode != "quant" or self.float_weight:
            return None
        h = self.h() if self.soft else (self.alpha >= 0).to(w.dtype)
        codes = torch.clamp(self.w_floor + h + q.zero_point, 0, q.qmax)
        return codes - q.zero_point, q.scale

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        g = self.grid(w)
        return w if g is None else g[0] * g[1]

    @torch.no_grad()
    def write_back(self, layer: QuantLinear):
        """Set ``layer.weight`` to the hard-rounded weight (if trained) and restore the quantizer."""
        q = self.quantizer
        if self.trained:
            layer.weight.copy_(((self.hard_codes() - q.zero_point) * q.scale).to(layer.weight.dtype))
        layer.weight_quant = q


class ActQuant(nn.Module):
    """An activation quantizer with a learnable step (LSQ) and QDrop."""

    def __init__(self, quantizer: nn.Module):
        super().__init__()
        self.quantizer = quantizer
        learnable = isinstance(quantizer, UniformQuantizer) and not quantizer.per_token
        self.scale = nn.Parameter(quantizer.scale.detach().clone()) if learnable else None
        self.drop_p = 0.0  # QDrop probability, set by the engine while this unit trains
        self.generator: torch.Generator | None = None
        self.float_act = False  # pass values through (POS's first stage)
        self.trained = False

    def extra_repr(self) -> str:
        return f"lsq={self.scale is not None}, drop_p={self.drop_p}, float_act={self.float_act}, trained={self.trained}"

    def quant(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale is None:
            return self.quantizer(x)
        q = self.quantizer
        return fake_quant_uniform(x, self.scale.clamp_min(MIN_SCALE), q.zero_point, q.qmax)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantizer.mode != "quant" or self.float_act:
            return x
        xq = self.quant(x)
        if self.drop_p > 0:
            xq = torch.lerp(xq, x, keep_mask(x, self.drop_p, self.generator))
        return xq

    def grid(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The output of ``forward`` as (grid, scale) with ``grid * scale == forward(x)``:
        codes minus the zero point, and ``x / scale`` where QDrop keeps the float value.
        None unless the step is one learnable scalar (LSQ, per tensor) and quantizing."""
        if self.quantizer.mode != "quant" or self.float_act or self.scale is None or self.scale.numel() != 1:
            return None
        q = self.quantizer
        s = self.scale.clamp_min(MIN_SCALE)
        keep = keep_mask(x, self.drop_p, self.generator) if self.drop_p > 0 else None
        return LsqGrid.apply(x, s, q.zero_point, q.qmax, keep), s

    @torch.no_grad()
    def write_back(self) -> nn.Module:
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


def _is_act_quantizer(m: nn.Module) -> bool:
    return isinstance(m, LogQuantizer) or isinstance(m, UniformQuantizer)


class LearnableState:
    """Installs the wrappers in ``modules`` (and their descendants), finds them per unit,
    and writes them back.

    Every QuantLinear's uniform weight quantizer gets an :class:`AdaRoundWeight`; every
    other quantizer that is a direct child of a module (activation inputs of
    QuantLinear, both operands of QuantMatMul) gets an :class:`ActQuant`.
    """

    def __init__(self, modules: list[nn.Module]):
        self.weights: dict[QuantLinear, AdaRoundWeight] = {}
        self.acts: list[tuple[nn.Module, str, ActQuant]] = []
        seen = set()
        parents = [m for root in modules for m in root.modules()]  # before any swap
        for parent in parents:
            if id(parent) in seen:
                continue
            seen.add(id(parent))
            self._install(parent)

    def _install(self, parent: nn.Module):
        if isinstance(parent, (AdaRoundWeight, ActQuant)):  # already installed
            return
        for name, child in list(parent.named_children()):
            if isinstance(parent, QuantLinear) and child is parent.weight_quant:
                if isinstance(child, UniformQuantizer) and not child.per_token:
                    wrapper = AdaRoundWeight(child, parent.weight)
                    parent.weight_quant = wrapper
                    self.weights[parent] = wrapper
            elif isinstance(parent, QuantConv2d) and child is parent.weight_quant:
                continue
            elif _is_act_quantizer(child):
                wrapper = ActQuant(child)
                setattr(parent, name, wrapper)
                self.acts.append((parent, name, wrapper))

    def of(self, modules: list[nn.Module]) -> tuple[list[tuple[QuantLinear, AdaRoundWeight]], list[ActQuant]]:
        """The wrappers inside ``modules``: (layer, AdaRound) pairs and activation wrappers."""
        inside = {id(m) for root in modules for m in root.modules()}
        weights = [(layer, w) for layer, w in self.weights.items() if id(w) in inside]
        acts = [a for _, _, a in self.acts if id(a) in inside]
        return weights, acts

    @property
    def num_rounding(self) -> int:
        return sum(w.alpha.numel() for w in self.weights.values())

    def mark_trained(self, modules: list[nn.Module]):
        weights, acts = self.of(modules)
        for _, w in weights:
            w.trained = True
        for a in acts:
            a.trained = True

    def write_back(self):
        """Hard rounding into the weights, learned steps into the quantizers (for wrappers
        that were trained; the others leave their layer as it was); uninstall."""
        for layer, w in self.weights.items():
            w.write_back(layer)
        for parent, name, a in self.acts:
            setattr(parent, name, a.write_back())
        self.weights, self.acts = {}, []

