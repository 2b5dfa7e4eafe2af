"""What calibration needs to know, fully resolved, and the two calibration presets.

``CalibSpec`` is the calibration's own view of a ``fastquant.QuantConfig``: every field
decided (the method's defaults applied, ``auto`` resolved), so nothing in ``calib/`` knows
the quantization methods. ``PRESETS`` holds what ``rtn`` and ``repq`` change from the plain
defaults; the reconstruction methods start from one of them (``fastquant.recon.methods``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

SOFTMAX_QUANTIZERS = ("log2", "log_sqrt2", "uniform", "auto")
WEIGHT_ROUNDING = ("nearest", "gptq")
# The method-dependent fields of QuantConfig.
CALIB_FIELDS = ("calib", "softmax", "reparam", "output_aware", "bias_correct", "weight_rounding", "fc2_smooth",
                "zero_point_search", "edge_rounding")
PRESETS = {
    "rtn": dict(calib="minmax", softmax="log2", reparam=False, output_aware=False, bias_correct=False,
                weight_rounding="nearest", fc2_smooth=0.0, zero_point_search=False, edge_rounding="nearest"),
    # fc2_smooth 1.0: measured on dinov2-s14-fmnist (first 2,000 test images) against 0.0:
    # W8A8 89.40 / 88.80, W6A6 86.80 / 86.75, W4A8 83.90 / 83.95, W4A4 66.90 / 49.50,
    # W3A3 23.95 / 18.85 (bench/results/runs/dinov2-s14-fmnist_repq-smooth_*.json).
    # edge_rounding "gptq": the patch embedding and the classifier head with GPTQ also where
    # the blocks' weights are rounded to nearest (the reconstruction methods' start, which
    # learns only the blocks' rounding): on dinov2-s14-fmnist W4A4 the patch embedding's
    # output error falls from 8.3% of its variance to 0.02% (docs/methods.md, item 11).
    "repq": dict(calib="mse", softmax="auto", reparam=True, output_aware=True, bias_correct=True,
                 weight_rounding="gptq", fc2_smooth=1.0, zero_point_search=True, edge_rounding="gptq"),
}


def auto_softmax(a_bits: int) -> str:
    """The softmax quantizer with the least error at ``a_bits`` on DINOv2 attention
    (measured: uniform wins from 7 bits, log-sqrt2 at 4-6 bits, log2 below 4)."""
    if a_bits >= 7:
        return "uniform"
    return "log_sqrt2" if a_bits >= 4 else "log2"


@dataclass(frozen=True)
class CalibSpec:
    """How to swap and calibrate (see ``fastquant.QuantConfig`` for each field)."""

    w_bits: int
    a_bits: int
    calib: str
    softmax: str  # log2 | log_sqrt2 | uniform
    reparam: bool
    output_aware: bool
    bias_correct: bool
    weight_rounding: str
    fc2_smooth: float = 0.0
    zero_point_search: bool = False
    edge_rounding: str = "nearest"  # the convolutions' (patch embedding) and the classifier's weights
    per_token: bool = False
    qk_per_head: bool = True
    patch_embed_a_bits: int = 8
    patch_embed_w_bits: Optional[int] = None
    head_w_bits: Optional[int] = None
    head_a_bits: Optional[int] = None
    percentile: float = 99.99
