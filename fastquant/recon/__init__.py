"""Reconstruction: learn weight rounding and activation steps unit by unit.

A method is a registered record (``registry.ReconMethod``: defaults, options, schedule,
stages, a hook before each unit, the calibration it starts from), one file each in
``methods/``; one engine (:func:`reconstruct`) runs them all:

- ``brecq``: block units, AdaRound + LSQ, no QDrop;
- ``qdrop``: block units with QDrop (p = 0.5);
- ``pfcr``: PFCR's fine-to-coarse levels (attention and MLP units, then blocks, pairs of
  blocks, ...), each level starting from the previous one's state, with the progressive
  optimisation strategy (``pos``);
- ``mgrq``: block units with QDrop plus MGRQ's global (logit KL) and local (per-layer
  distribution) loss terms.

Neither PFCR's nor MGRQ's code is public: these are fastquant's reconstructions of the
papers' descriptions, every open choice a documented setting. ``register_method`` adds one
of your own.
"""
from . import methods  # noqa: F401  (register the methods fastquant ships)
from ..adapters import Unit, embed, find_vit, run_head, run_rest, run_span, run_unit, unit_by_name
from ..quant import ActQuant, AdaRoundWeight
from .config import ReconConfig, auto_lr_round
from .engine import ReconRecord, UnitContext, UnitRecord, float_copy, hard_codes, reconstruct, run_method, schedule_for
from .head import quantized_head, train_head_step
from .learnable import LearnableState
from .losses import TERMS, StepBatch, Term, TermSpec, register_term
from .methods.pfcr import pfcr_levels
from .plot import plot_losses
from .registry import Option, ReconMethod, Stage, get_method, method_names, register_method, register_option
from .schedules import block_units, normalize_schedule, schedule_from_names

__all__ = [
    "ReconConfig", "auto_lr_round", "ReconRecord", "UnitContext", "UnitRecord", "float_copy", "hard_codes",
    "reconstruct", "run_method", "schedule_for", "quantized_head", "train_head_step", "LearnableState", "ActQuant", "AdaRoundWeight", "TERMS", "StepBatch",
    "Term", "TermSpec", "register_term", "pfcr_levels", "plot_losses", "Option", "ReconMethod", "Stage", "get_method",
    "method_names", "register_method", "register_option", "block_units", "normalize_schedule", "schedule_from_names",
    "Unit", "embed", "find_vit", "run_head", "run_rest", "run_span", "run_unit", "unit_by_name",
]
