"""Quantizers: uniform asymmetric (2-8 bits) and logarithmic (log2, log-sqrt2).

All state lives in buffers, so ``state_dict()``, ``.to()`` and saving see it.
Calibration is an explicit phase:

    q.start_observing()   # forward() passes x through unchanged and records statistics
    ...run calibration data...
    q.finish_observing()  # computes scale and zero point; forward() now fake-quantizes

Granularity is given by the shape of the scale, right-aligned against the input:
``()`` per tensor, ``(C,)`` per channel of the last dim, ``(O, 1)`` per output
channel of a Linear weight, ``(1, H, 1, 1)`` per head of a [B, H, N, D] tensor.
Dimensions where the scale has size 1 are reduced over. ``per_token=True`` instead
computes min/max per row (last dim) at run time and has no calibrated state.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .errors import FastquantError

CALIB_METHODS = ("minmax", "percentile", "mse")
# Ratios of the observed range tried by the MSE search (both ends scaled alike).
MSE_RATIOS = torch.linspace(0.30, 1.0, 57)
# Samples kept per quantizer for percentile/MSE calibration.
MAX_SAMPLES = 1 << 21


def check_bits(bits: int, what: str = "bits") -> int:
    if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 8:
        raise FastquantError(f"{what} must be an integer from 2 to 8, got {bits!r}")
    return bits


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest (half to even); the gradient passes straight through.
    Without autograd it is plain rounding (the same values: ``round(x) - x`` is exact)."""
    if not (x.requires_grad and torch.is_grad_enabled()):
        return torch.round(x)
    return (torch.round(x) - x).detach() + x


def fake_quant_uniform(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmax: int) -> torch.Tensor:
    """Asymmetric fake quantization onto the grid {0..qmax}: (clamp(round(x/s)+z) - z) * s."""
    q = torch.clamp(round_ste(x / scale) + zero_point, 0, qmax)
    return (q - zero_point) * scale


def quantize_uniform(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmax: int) -> torch.Tensor:
    """Integer codes in {0..qmax} (as uint8), the same grid as fake_quant_uniform."""
    return torch.clamp(torch.round(x / scale) + zero_point, 0, qmax).to(torch.uint8)


def range_to_qparams(lo: torch.Tensor, hi: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point covering [lo, hi] (widened to include 0)."""
    lo = torch.minimum(lo, torch.zeros_like(lo))
    hi = torch.maximum(hi, torch.zeros_like(hi))
    scale = ((hi - lo) / qmax).clamp_min(1e-8)
    zero_point = torch.clamp(torch.round(-lo / scale), 0, qmax)
    return scale, zero_point


class UniformQuantizer(nn.Module):
    """Uniform asymmetric quantizer with ``bits`` bits (codes 0 .. 2**bits - 1)."""

    def __init__(self, bits: int, scale_shape: tuple[int, ...] = (), method: str = "minmax", per_token: bool = False,
                 percentile: float = 99.99):
        super().__init__()
        self.bits = check_bits(bits)
        if method not in CALIB_METHODS:
            raise FastquantError(f"unknown calibration method {method!r} (choose from {', '.join(CALIB_METHODS)})")
        self.method = method
        self.per_token = per_token
        self.percentile = percentile
        self.register_buffer("scale", torch.ones(scale_shape))
        self.register_buffer("zero_point", torch.zeros(scale_shape))
        self.mode = "off"  # off | observe | quant
        # Optional tensor broadcastable to the input: how much the squared error of each
        # element costs downstream, set during calibration (fastquant.ptq._error_weight_hooks).
        self.error_weight = None
        self._reset_stats()

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1

    def extra_repr(self) -> str:
        gran = "per-token" if self.per_token else f"scale {tuple(self.scale.shape)}"
        return f"bits={self.bits}, {gran}, method={self.method}, mode={self.mode}"

    # -- calibration -------------------------------------------------------------------
    def _reset_stats(self):
        self._min = None
        self._max = None
        self._samples = []
        self._sample_weights = []
        self._n_samples = 0
        self._col_weight = None

    def _kept_dims(self, x: torch.Tensor) -> list[int]:
        shape = tuple(self.scale.shape)
        if len(shape) > x.dim():
            raise FastquantError(f"quantizer scale {shape} does not fit an input of shape {tuple(x.shape)}")
        offset = x.dim() - len(shape)
        kept = [offset + i for i, s in enumerate(shape) if s != 1]
        for d in kept:
            if x.shape[d] != shape[d - offset]:
                raise FastquantError(f"quantizer scale {shape} does not fit an input of shape {tuple(x.shape)}")
        return kept

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """x as [K, n]: one row per scale entry, all values it covers."""
        kept = self._kept_dims(x)
        x = x.detach().float()
        if not kept:
            return x.reshape(1, -1)
        x = x.movedim(kept, list(range(len(kept))))
        k = math.prod(x.shape[: len(kept)])
        return x.reshape(k, -1)

    def start_observing(self):
        self.mode = "observe"
        self._reset_stats()

    def observe(self, x: torch.Tensor):
        if not torch.isfinite(x).all():
            raise FastquantError("calibration data produced NaN or Inf activations")
        rows = self._rows(x)
        mn, mx = rows.amin(1), rows.amax(1)
        self._min = mn if self._min is None else torch.minimum(self._min, mn)
        self._max = mx if self._max is None else torch.maximum(self._max, mx)
        if self.method != "minmax" and self._n_samples < MAX_SAMPLES:
            weights = None
            if self.error_weight is not None and self.method == "mse":
                weights = self._rows(self.error_weight.detach().float().expand_as(x))
            per_row = max(1, (MAX_SAMPLES // 8) // rows.shape[0])
            if rows.shape[1] > per_row:
                g = torch.Generator(device="cpu").manual_seed(self._n_samples + rows.shape[1])
                idx = torch.randperm(rows.shape[1], generator=g)[:per_row].to(rows.device)
                rows = rows[:, idx]
                weights = None if weights is None else weights[:, idx]
            self._samples.append(rows)
            if weights is not None:
                self._sample_weights.append(weights)
            self._n_samples += rows.numel()

    def finish_observing(self):
        if self.per_token:
            self.mode = "quant"
            return
        if self._min is None:
            raise FastquantError("a quantizer saw no calibration data (is the calibration set empty?)")
        shape = self.scale.shape
        if self.method == "minmax":
            lo, hi = self._min, self._max
            scale, zp = range_to_qparams(lo, hi, self.qmax)
        else:
            samples = torch.cat(self._samples, dim=1)
            weight = self._col_weight
            if self._sample_weights and len(self._sample_weights) == len(self._samples):
                weight = torch.cat(self._sample_weights, dim=1)
            scale, zp = self.search(samples, self._min, self._max, weight)
        self.scale.copy_(scale.reshape(shape))
        self.zero_point.copy_(zp.reshape(shape))
        self._reset_stats()
        self.mode = "quant"

    def search(self, rows: torch.Tensor, mn: torch.Tensor, mx: torch.Tensor, col_weight: torch.Tensor | None = None):
        """Per-row scale/zero point by percentile clipping or by least squared error.

        ``col_weight`` ([n] or [K, n]) weights the squared error of each sample (for a
        Linear weight, the input's mean square per input channel; for an activation,
        the consumer's sensitivity to it), so the search minimises the expected output
        error rather than the operand's own error."""
        if self.method == "percentile":
            p = self.percentile / 100.0
            srt = rows.sort(dim=1).values
            n = srt.shape[1]
            lo = srt[:, int((1 - p) * (n - 1))]
            hi = srt[:, int(round(p * (n - 1)))]
            return range_to_qparams(lo, hi, self.qmax)
        best_err, best = None, None
        for r in MSE_RATIOS.tolist():
            scale, zp = range_to_qparams(mn * r, mx * r, self.qmax)
            err = (fake_quant_uniform(rows, scale[:, None], zp[:, None], self.qmax) - rows).pow(2)
            err = (err if col_weight is None else err * col_weight).mean(1)
            if best_err is None:
                best_err, best = err, (scale, zp)
            else:
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best = (torch.where(better, scale, best[0]), torch.where(better, zp, best[1]))
        return best

    def calibrate_tensor(self, x: torch.Tensor, col_weight: torch.Tensor | None = None):
        """Calibrate directly from a tensor (weights): observe it all once and finish.
        ``col_weight`` (one value per column of the [rows, n] view) weights the MSE search."""
        self.start_observing()
        rows = self._rows(x)
        self._min, self._max = rows.amin(1), rows.amax(1)
        self._samples = [rows]
        self._col_weight = None if col_weight is None else col_weight.to(rows)
        self.finish_observing()

    def set_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor):
        self.scale.copy_(scale.reshape(self.scale.shape))
        self.zero_point.copy_(zero_point.reshape(self.zero_point.shape))
        self.mode = "quant"

    # -- forward ------------------------------------------------------------------------
    def qparams(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.per_token:
            xd = x.detach()
            return range_to_qparams(xd.amin(-1, keepdim=True), xd.amax(-1, keepdim=True), self.qmax)
        return self.scale, self.zero_point

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "quant":
            scale, zp = self.qparams(x)
            return fake_quant_uniform(x, scale, zp, self.qmax)
        if self.mode == "observe" and not self.per_token:
            self.observe(x)
        return x

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        scale, zp = self.qparams(x)
        return quantize_uniform(x, scale, zp, self.qmax)

    def dequantize(self, q: torch.Tensor) -> torch.Tensor:
        return (q.float() - self.zero_point) * self.scale


class LogQuantizer(nn.Module):
    """Logarithmic quantizer for values in [0, scale] (softmax probabilities).

    ``base="2"``: levels scale * 2**-q; ``base="sqrt2"``: levels scale * 2**(-q/2)
    (RepQ-ViT's log-sqrt2, arXiv 2212.08254), for codes q = 0 .. 2**bits - 2; the last
    code 2**bits - 1 stands for exact zero. Values are rounded to the nearest level in
    value, the zero code counting as a level of value 0 just below the smallest one: of
    the level at or above x (found in the log domain) and the next one down, the nearer
    wins. For log2 that makes values below the smallest level go to it or to zero,
    whichever is nearer. For log-sqrt2 the search in the log domain stops at half a
    level step below the smallest level: values from half the smallest level up to
    1/sqrt(2) of it become zero although the smallest level is nearer (at 4 bits,
    probabilities between 0.0039 and 0.0055 of the scale). Every kernel (CPU, CUDA,
    Triton) and twin reproduces this exactly. ``scale`` is calibrated as the largest value
    seen (at most 1 for probabilities).
    """

    def __init__(self, bits: int, base: str = "2"):
        super().__init__()
        self.bits = check_bits(bits)
        if base not in ("2", "sqrt2"):
            raise FastquantError(f"log quantizer base must be '2' or 'sqrt2', got {base!r}")
        self.base = base
        self.register_buffer("scale", torch.ones(()))
        self.mode = "off"
        self._max = None

    @property
    def steps_per_octave(self) -> int:
        return 1 if self.base == "2" else 2

    @property
    def zero_code(self) -> int:
        return (1 << self.bits) - 1

    def extra_repr(self) -> str:
        return f"bits={self.bits}, base={self.base}, mode={self.mode}"

    def start_observing(self):
        self.mode = "observe"
        self._max = None

    def observe(self, x: torch.Tensor):
        if not torch.isfinite(x).all():
            raise FastquantError("calibration data produced NaN or Inf activations")
        mx = x.detach().amax().float()
        self._max = mx if self._max is None else torch.maximum(self._max, mx)

    def finish_observing(self):
        if self._max is None:
            raise FastquantError("a quantizer saw no calibration data (is the calibration set empty?)")
        self.scale.copy_(self._max.clamp_min(1e-8))
        self._max = None
        self.mode = "quant"

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Codes of the nearest level in value (not in the log domain), or the zero code."""
        k = self.steps_per_octave
        x = x.float()
        hi_code = torch.floor(-torch.log2((x / self.scale).clamp_min(1e-30)) * k).clamp(0, self.zero_code)
        hi_val = self.dequantize(hi_code)  # the level at or above x (0 if x is below them all)
        lo_code = (hi_code + 1).clamp_max(self.zero_code)
        lo_val = self.dequantize(lo_code)
        code = torch.where((hi_val - x).abs() <= (x - lo_val).abs(), hi_code, lo_code)
        return code.to(torch.uint8)

    def dequantize(self, q: torch.Tensor) -> torch.Tensor:
        qf = q.float()
        val = self.scale * torch.exp2(-qf / self.steps_per_octave)
        return torch.where(qf == self.zero_code, torch.zeros_like(val), val)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "quant":
            xq = self.dequantize(self.quantize(x.detach())).to(x.dtype)
            return (xq - x).detach() + x  # straight-through gradient
        if self.mode == "observe":
            self.observe(x)
        return x
