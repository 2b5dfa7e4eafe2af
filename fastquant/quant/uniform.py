"""Uniform asymmetric quantizer (2-8 bits): codes 0 .. 2^bits - 1 with a zero point.

Granularity is given by the shape of the scale, right-aligned against the input:
``()`` per tensor, ``(C,)`` per channel of the last dim, ``(O, 1)`` per output
channel of a Linear weight, ``(1, H, 1, 1)`` per head of a [B, H, N, D] tensor.
Dimensions where the scale has size 1 are reduced over. ``per_token=True`` instead
computes min/max per row (last dim) at run time and has no calibrated state.
Calibration (``minmax``, ``percentile``, ``mse``) is the explicit phase of
``fastquant.quant.base``.
"""
from __future__ import annotations

import math

import torch

from ..errors import FastquantError
from .base import Quantizer, check_activations
from .functional import fake_quant_uniform, quantize_uniform, range_to_qparams

CALIB_METHODS = ("minmax", "percentile", "mse")
# Ratios of the observed range tried by the MSE search (both ends scaled alike).
MSE_RATIOS = torch.linspace(0.30, 1.0, 57)
# With ``keep_min``, the MSE search also tries at each step the zero points that keep the
# observed minimum (nearly) in range. Scaling both ends alike fixes the zero point at round(-min /
# step) of the unscaled range: for a post-GELU input (minimum -0.17, maximum 2-10) that is 0,
# so every negative value is clipped to 0, an error of one sign that adds up over the
# consumer's sum (measured on DINOv2 ViT-S/14, W4A4: block 9's output error 0.156 with the
# zero point 0, 0.0027 with 1).
# Samples kept per quantizer for percentile/MSE calibration.
MAX_SAMPLES = 1 << 21


class UniformQuantizer(Quantizer):
    """Uniform asymmetric quantizer with ``bits`` bits (codes 0 .. 2**bits - 1)."""

    kind = "uniform"

    def __init__(self, bits: int, scale_shape: tuple[int, ...] = (), method: str = "minmax", per_token: bool = False,
                 percentile: float = 99.99, keep_min: bool = False):
        super().__init__(bits)
        if method not in CALIB_METHODS:
            raise FastquantError(f"unknown calibration method {method!r} (choose from {', '.join(CALIB_METHODS)})")
        self.method = method
        self.per_token = per_token
        self.percentile = percentile
        self.keep_min = keep_min  # the MSE search also tries zero points that keep the minimum (above)
        self.register_buffer("scale", torch.ones(scale_shape))
        self.register_buffer("zero_point", torch.zeros(scale_shape))
        # Optional tensor broadcastable to the input: how much the squared error of each
        # element costs downstream, set during calibration (fastquant.calib.observe).
        self.error_weight = None
        self._reset_stats()

    def step(self):
        """The calibrated step (None per token, where steps are computed at run time)."""
        return None if self.per_token else self.scale

    def extra_repr(self) -> str:
        gran = "per-token" if self.per_token else f"scale {tuple(self.scale.shape)}"
        keep = ", keep_min" if self.keep_min else ""
        return f"bits={self.bits}, {gran}, method={self.method}{keep}, mode={self.mode}"

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
        check_activations(x)
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
            candidates = [zp]
            if self.keep_min:  # the zero points nearest to and just above -min / step
                steps = -torch.clamp(mn, max=0.0) / scale
                candidates += [torch.clamp(f(steps), 0, self.qmax) for f in (torch.round, torch.ceil)]
            for zp in candidates:
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
