"""Reconstruction methods as registered records: a method is a configuration of the engine.

A :class:`ReconMethod` says, as data and small functions, everything that makes a method:

- ``defaults``: its values of the engine's settings (``ReconConfig`` fields left at None:
  QDrop's probability, the weights of the loss terms, the activation steps' learning rate);
- ``options``: settings of its own, declared with :func:`register_option` (name, default,
  check), set like the others (``ReconConfig(method="pfcr", carry=0.5)``,
  ``--recon-set carry=0.5``);
- ``schedule(model, cfg)``: the levels of units it reconstructs, in order;
- ``stages(cfg)``: how each unit's steps are split into stages (which operands pass in float
  during each) and the step at which the rounding regulariser's schedule starts;
- ``before_unit(ctx)``: what it does to the learned state before a unit trains (PFCR relaxes
  the rounding of halves an earlier level decided);
- ``budgets``: its settings for the CLI's budgets (``--budget cpu``/``full``);
- ``calibration``: the calibration it starts from (a ``fastquant.calib.PRESETS`` entry with
  overrides).

The engine (``fastquant.recon.engine``) runs any record and has no per-method branch; one
registry (:func:`method_names`) feeds ``fastquant.QuantConfig``'s and the CLI's choices, and
bench/recon.py. A method from outside fastquant is one :func:`register_method` call.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

from ..errors import FastquantError
from .schedules import block_units

# The engine settings (ReconConfig fields left at None) a method's record may set, and their
# values when it does not.
METHOD_FIELDS = ("qdrop_p", "qdrop_schedule", "w_global", "w_local", "global_form", "fisher_pool", "lr_act")
# lr_act None: scaled with the steps (ReconConfig.resolved, auto_lr_act)
BASE_DEFAULTS = {"qdrop_p": 0.0, "qdrop_schedule": "constant", "w_global": 0.0, "w_local": 0.0, "global_form": "kl",
                 "fisher_pool": "none", "lr_act": None}


@dataclass(frozen=True)
class Option:
    """A setting a method declares: its name, default, a check that returns an error message
    for a bad value ('' when good), and what it does."""

    name: str
    default: Any
    check: Callable[[Any], str]
    doc: str = ""


@dataclass(frozen=True)
class Stage:
    """A span of a unit's steps, from step ``start``: the unit's weights (``float_weights``)
    or activations (``float_acts``, no QDrop then) may pass through in float."""

    start: int
    float_weights: bool = False
    float_acts: bool = False


def one_stage(cfg) -> tuple[list[Stage], int]:
    """Every step with everything quantized; the regulariser's schedule from step 0."""
    return [Stage(0)], 0


def block_schedule(model, cfg) -> list:
    """One level: one unit per transformer block, in order (BRECQ, QDrop, MGRQ)."""
    return [block_units(model)]


@dataclass(frozen=True)
class ReconMethod:
    name: str
    summary: str
    defaults: Mapping[str, Any] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)  # option name -> this method's default
    schedule: Callable = block_schedule
    stages: Callable = one_stage
    before_unit: Optional[Callable] = None
    # (ctx, rounding steps of the unit) -> (offset, total): the unit's rounding steps are
    # steps offset.. of a regulariser schedule (warm-up, then beta falling) of ``total``
    # steps; None: each unit anneals its own rounding, (0, steps).
    round_window: Optional[Callable] = None
    # (cfg, level) -> the steps of each unit of that level; None: ``cfg.iters`` everywhere.
    level_iters: Optional[Callable] = None
    # Settings of its own for each CLI budget (``fastquant quantize --budget``), applied
    # after the budget's steps and images, e.g. PFCR's last level on the cpu budget.
    budgets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    calibration: Mapping[str, Any] = field(
        default_factory=lambda: {"preset": "repq", "weight_rounding": "nearest", "bias_correct": False,
                                 "fc2_smooth": 0.0})
    # Reconstruction learns the weight rounding itself (AdaRound) from the float weights, so the
    # default start is RepQ's activation calibration with round-to-nearest weights, no bias
    # correction and no fc2 smoothing (which added nothing after reconstruction: brecq W4A4
    # 76.20 with it, 76.30 without).


_METHODS: dict[str, ReconMethod] = {}
_OPTIONS: dict[str, Option] = {}


def register_option(option: Option) -> Option:
    """Declare a method option (a name may be declared once)."""
    if option.name in _OPTIONS and _OPTIONS[option.name] != option:
        raise FastquantError(f"reconstruction option {option.name!r} is already declared")
    _OPTIONS[option.name] = option
    return option


def register_method(method: ReconMethod) -> ReconMethod:
    """Add ``method`` to the registry (a name may be registered once). Its ``defaults`` must
    name engine settings that a method may set, its ``options`` declared options."""
    if not isinstance(method, ReconMethod):
        raise FastquantError(f"register_method needs a ReconMethod, got {type(method).__name__}")
    if not method.name or not isinstance(method.name, str):
        raise FastquantError(f"a reconstruction method needs a name, got {method.name!r}")
    if method.name in _METHODS:
        raise FastquantError(f"reconstruction method {method.name!r} is already registered")
    bad = sorted(set(method.defaults) - set(METHOD_FIELDS))
    if bad:
        raise FastquantError(f"method {method.name}: {', '.join(bad)} are not settings a method sets "
                             f"(those are {', '.join(METHOD_FIELDS)})")
    undeclared = sorted(set(method.options) - set(_OPTIONS))
    if undeclared:
        raise FastquantError(f"method {method.name}: options {', '.join(undeclared)} are not declared "
                             "(register_option first)")
    for name, value in method.options.items():
        message = _OPTIONS[name].check(value)
        if message:
            raise FastquantError(f"method {method.name}: default {message}")
    _METHODS[method.name] = method
    return method


def get_method(name: str) -> ReconMethod:
    if name not in _METHODS:
        raise FastquantError(f"unknown reconstruction method {name!r} (choose from {', '.join(_METHODS)})")
    return _METHODS[name]


def method_names() -> tuple[str, ...]:
    """The registered reconstruction methods' names, in registration order."""
    return tuple(_METHODS)


def option(name: str) -> Option:
    if name not in _OPTIONS:
        raise KeyError(name)
    return _OPTIONS[name]


def options() -> dict[str, Option]:
    return dict(_OPTIONS)


# -- checks the options and settings share -----------------------------------------------------
def finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
