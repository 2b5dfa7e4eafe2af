"""Logarithmic quantizer (log2 or log-sqrt2) for values in [0, scale]: softmax probabilities."""
from __future__ import annotations

import torch

from ..errors import FastquantError
from .base import Quantizer, check_activations
from .functional import log_codes, log_levels


class LogQuantizer(Quantizer):
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

    kind = "log"

    def __init__(self, bits: int, base: str = "2"):
        super().__init__(bits)
        if base not in ("2", "sqrt2"):
            raise FastquantError(f"log quantizer base must be '2' or 'sqrt2', got {base!r}")
        self.base = base
        self.register_buffer("scale", torch.ones(()))
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
        check_activations(x)
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
        return log_codes(x, self.scale, self.steps_per_octave, self.zero_code).to(torch.uint8)

    def dequantize(self, q: torch.Tensor) -> torch.Tensor:
        return log_levels(q, self.scale, self.steps_per_octave, self.zero_code)

    def levels(self) -> torch.Tensor:
        """The value of every code, 0 .. zero code (float32, on the scale's device)."""
        return self.dequantize(torch.arange(self.zero_code + 1, device=self.scale.device)).float().contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "quant":
            xq = self.dequantize(self.quantize(x.detach())).to(x.dtype)
            return (xq - x).detach() + x  # straight-through gradient
        if self.mode == "observe":
            self.observe(x)
        return x
