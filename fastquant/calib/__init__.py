"""Calibration methods: swap modules for quantized ones and calibrate them (``rtn``,
``repq``: range search, LayerNorm reparameterisation, GPTQ rounding, bias correction).

    ln_groups = prepare(model, spec, example)   # swap, in place
    calibrate(model, batches, spec, ln_groups)  # observe, reparameterise, round, correct

``spec`` is a :class:`CalibSpec`, everything decided; ``fastquant.QuantConfig`` makes one.
"""
from .calibrate import calibrate, edge_layers, weight_quantizers
from ..quant.gptq import gptq_round, round_to_grid
from ..nn.observe import InputStats, linear_input_stats
from .observe import error_weight_hooks
from .reparam import reparameterize
from .spec import CALIB_FIELDS, PRESETS, SOFTMAX_QUANTIZERS, WEIGHT_ROUNDING, CalibSpec, auto_softmax
from .swap import Plan, plan_for, prepare, swap_modules

__all__ = ["calibrate", "edge_layers", "weight_quantizers", "gptq_round", "round_to_grid", "InputStats", "error_weight_hooks",
           "linear_input_stats", "reparameterize", "CALIB_FIELDS", "PRESETS", "SOFTMAX_QUANTIZERS", "WEIGHT_ROUNDING",
           "CalibSpec", "auto_softmax", "Plan", "plan_for", "prepare", "swap_modules"]
