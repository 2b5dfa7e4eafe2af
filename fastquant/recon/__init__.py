"""Reconstruction: learn weight rounding and activation steps unit by unit.

A method is a configuration of one engine (:func:`reconstruct`):

- ``brecq``: block units, AdaRound + LSQ, no QDrop;
- ``qdrop``: block units with QDrop (p = 0.5);
- ``pfcr``: PFCR's fine-to-coarse levels (attention and MLP units, then blocks, pairs of
  blocks, ...), each level starting from the previous one's state, with the progressive
  optimisation strategy (``pos``);
- ``mgrq``: block units with QDrop plus MGRQ's global (logit KL) and local (per-layer
  distribution) terms.

Neither PFCR's nor MGRQ's code is public: these are fastquant's reconstructions of the
papers' descriptions, every open choice a documented field of :class:`ReconConfig`.
"""
from .config import METHOD_DEFAULTS, RECON_METHODS, ReconConfig
from .engine import ReconRecord, UnitRecord, float_copy, hard_codes, reconstruct, run_method, schedule_for
from .learnable import ActQuant, AdaRoundWeight, LearnableState
from .plot import plot_losses
from .units import (Unit, block_units, embed, find_vit, pfcr_levels, run_head, run_rest, run_span, run_unit,
                    schedule_from_names, unit_by_name)

__all__ = [
    "RECON_METHODS", "METHOD_DEFAULTS", "ReconConfig", "ReconRecord", "UnitRecord", "reconstruct", "run_method",
    "schedule_for", "float_copy", "hard_codes", "ActQuant", "AdaRoundWeight", "LearnableState", "plot_losses", "Unit",
    "block_units", "pfcr_levels", "schedule_from_names", "unit_by_name", "find_vit", "embed", "run_span",
    "run_unit", "run_rest", "run_head",
]
