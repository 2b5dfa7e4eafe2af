"""Quantizers behind one interface (``base.Quantizer``), their functional core, and the
learnable wrappers reconstruction trains (AdaRound, LSQ, QDrop), and GPTQ's rounding onto a
calibrated grid (used by calibration and as reconstruction's rounding start).

The lowest layer of fastquant: it imports nothing of fastquant but ``errors``.
"""
from .base import MODES, Quantizer, modes_of, quantizers_in, quantizers_off, set_mode
from .functional import (check_bits, fake_quant_uniform, log_codes, log_levels, quantize_uniform, range_to_qparams,
                         rectified_sigmoid, round_ste)
from .gptq import gptq_round, round_to_grid
from .learnable import MIN_SCALE, ActQuant, AdaRoundWeight, Learnable, LsqGrid, beta_at, keep_mask
from .log import LogQuantizer
from .uniform import CALIB_METHODS, UniformQuantizer

__all__ = [
    "MODES", "Quantizer", "modes_of", "quantizers_in", "quantizers_off", "set_mode", "check_bits",
    "fake_quant_uniform", "log_codes", "log_levels", "quantize_uniform", "range_to_qparams", "rectified_sigmoid",
    "round_ste", "MIN_SCALE", "ActQuant", "AdaRoundWeight", "Learnable", "LsqGrid", "beta_at", "keep_mask",
    "LogQuantizer", "CALIB_METHODS", "UniformQuantizer", "gptq_round", "round_to_grid",
]
