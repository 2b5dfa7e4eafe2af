"""PFCR, Progressive Fine-to-Coarse Reconstruction (arXiv 2412.14633), as fastquant
reconstructs it from the paper's description (its code is not public); every choice the
paper leaves open is an option below.

- Schedule (:func:`pfcr_levels`): level 0 holds the attention and MLP units of every block
  with their shortcuts (``attn0, mlp0, attn1, ...``); level k + 1 merges each ``merge``
  neighbouring units of level k, up to one unit or to level ``stop_at``. Each level starts
  from the state the previous ones learned.
- ``carry`` (before each unit of a later level): how much of the rounding the earlier levels
  decided is kept, ``h <- carry * h + (1 - carry) * frac(W/s)`` (0.5 keeps each decided
  rounding and lets the loss still change it; 1 keeps it as it is; 0 restarts from float).
- ``pos``: the Progressive Optimisation Strategy: each unit's steps in two stages, the first
  ``pos_split`` of them with one operand kind in float, then the rest with everything
  quantized. ``pos_mode="weights_first"``: the first stage trains the rounding with the
  unit's activations in float (its input still comes from the quantized prefix), the
  regulariser's warm-up and annealing spanning both stages. ``"acts_first"``: the first
  stage trains the activation steps (with QDrop) with the unit's weights in float; the
  rounding is trained in the second stage only, with the warm-up and annealing fitted to it.
- ``anneal``: where the AdaRound regulariser's schedule (warm-up, then beta falling) runs:
  within each unit (``"unit"``), or once across the levels (``"levels"``: a unit of level k
  continues it from k / levels of the way, so the rounding stays soft through the fine
  levels and turns hard only at the last; use with ``carry=1``, which keeps it as left).
- ``level_steps``: each level's steps per unit as fractions of ``iters`` (e.g. ``(1, 0.75,
  0.5)``: the coarse levels shorter; levels past the sequence take its last value; None:
  ``iters`` everywhere). The learning rates stay those of ``iters``.
- ``qdrop_p``: QDrop's probability (0 by default; the paper builds on QDrop at 0.5).

Defaults, set by measurement (docs/methods.md, "Accuracy at W4A4: what was tried";
dinov2-s14-fmnist W4A4, cpu budget, first 2,000 test images): no POS, no QDrop, ``carry=1``
and ``anneal="levels"`` reach 77.25 top-1 (activation steps at ``lr_act`` 2.7e-3, the
scaled default), against 55.25 with the settings the paper describes (POS
``weights_first``, QDrop 0.5, ``carry=0.5``, each unit annealed on its own; ``lr_act``
4e-5), 68.05 with POS but no QDrop and ``carry=1`` (2.7e-3), and 76.65 without POS with
``anneal="unit"``. Where the settings the paper describes lose: POS leaves
an MLP half's output error 2.6x that of the same unit without it (bench/unit_compare.py),
QDrop costs 8-17 points at 300 steps per unit (2.85 with its probability decaying to 0
over each unit's steps: 79.15 against 82.00 with today's calibration), ``carry=0.5``
undoes decided rounding the coarse levels do not win back, and with the rounding hard
after level 0 the coarse levels only retrain activation steps; with ``anneal="levels"`` they still move the rounding and
lower the last blocks' output error (block 11: 0.100 -> 0.081). The paper's settings stay
available: ``pos=True, qdrop_p=0.5, carry=0.5, anneal="unit"``.
"""
from __future__ import annotations

from ...adapters import Unit, find_vit, half_modules, half_name, splittable, unit_name
from ...errors import FastquantError
from ..registry import Option, ReconMethod, Stage, finite, is_int, option, register_method, register_option

POS_MODES = ("weights_first", "acts_first")
ANNEAL = ("unit", "levels")


def _check(ok, message):
    return lambda v: "" if ok(v) else message.format(v=v)


register_option(Option("pos", False, _check(lambda v: isinstance(v, bool), "pos must be True or False, got {v!r}"),
                       "PFCR's progressive optimisation strategy: two stages per unit"))
register_option(Option("pos_split", 0.5,
                       _check(lambda v: finite(v) and 0 < v < 1, "pos_split must be a fraction in (0, 1), got {v!r}"),
                       "the fraction of a unit's steps in POS's first stage"))
register_option(Option("pos_mode", "weights_first",
                       _check(lambda v: v in POS_MODES, f"pos_mode must be one of {', '.join(POS_MODES)}, got {{v!r}}"),
                       "which operand kind POS's first stage keeps in float: the activations or the weights"))
register_option(Option("carry", 1.0, _check(lambda v: finite(v) and 0 <= v <= 1, "carry must be in [0, 1], got {v!r}"),
                       "how much of an earlier level's rounding a later level starts from"))
register_option(Option("anneal", "levels",
                       _check(lambda v: v in ANNEAL, f"anneal must be one of {', '.join(ANNEAL)}, got {{v!r}}"),
                       "where the rounding regulariser anneals: within each unit, or once across the levels"))
register_option(Option("merge", 2, _check(lambda v: is_int(v) and v >= 2, "merge must be an integer of at least 2, "
                                                                           "got {v!r}"),
                       "how many neighbouring units of a level make one unit of the next"))
register_option(Option("level_steps", None,
                       _check(lambda v: v is None or (isinstance(v, (tuple, list)) and len(v) > 0
                                                      and all(finite(f) and 0 < f <= 1 for f in v)),
                              "level_steps must be None or a sequence of fractions in (0, 1] (one per level, "
                              "the last repeated), got {v!r}"),
                       "each level's steps per unit as a fraction of iters (None: iters at every level)"))
register_option(Option("stop_at", None,
                       _check(lambda v: v is None or (is_int(v) and v >= 0),
                              "stop_at must be a non-negative integer or None, got {v!r}"),
                       "the last level (None: until one unit covers every block)"))


# PFCR's options, declared above; the method's defaults are the declared ones.
OPTIONS = ("pos", "pos_split", "pos_mode", "carry", "anneal", "merge", "level_steps", "stop_at")


def pfcr_levels(model, merge: int = 2, stop_at: int | None = None) -> list[list[Unit]]:
    """PFCR's fine-to-coarse schedule.

    Level 0 holds the attention and MLP units of every block, in order
    (``attn0, mlp0, attn1, ...``); level k + 1 merges each ``merge`` neighbouring
    units of level k (the last group may be smaller). With ``merge=2``: halves, then
    blocks, then pairs of blocks, and so on. Levels are built until one unit covers
    every block, or up to level ``stop_at`` (0: level 0 only) if that comes first.
    """
    if isinstance(merge, bool) or not isinstance(merge, int) or merge < 2:
        raise FastquantError(f"the PFCR merge factor must be an integer of at least 2, got {merge!r}")
    if stop_at is not None and (isinstance(stop_at, bool) or not isinstance(stop_at, int) or stop_at < 0):
        raise FastquantError(f"the PFCR stopping level must be a non-negative integer or None, got {stop_at!r}")
    vit = find_vit(model)
    for i, blk in enumerate(vit.blocks):
        if not splittable(blk):
            raise FastquantError(f"PFCR needs blocks with attention and MLP halves; "
                                 f"block {i} is a {type(blk).__name__}")
    levels = [[Unit(half_name(p), p, p + 1) for p in range(2 * len(vit.blocks))]]
    while len(levels[-1]) > 1 and (stop_at is None or len(levels) <= stop_at):
        prev = levels[-1]
        groups = [prev[i:i + merge] for i in range(0, len(prev), merge)]
        levels.append([Unit(unit_name(g[0].start, g[-1].end), g[0].start, g[-1].end) for g in groups])
    return levels


def schedule(model, cfg) -> list[list[Unit]]:
    return pfcr_levels(model, cfg.resolved("merge"), cfg.resolved("stop_at"))


def stages(cfg) -> tuple[list[Stage], int]:
    """POS's two stages (or one without it) and the step the regulariser's schedule starts at."""
    split = int(cfg.resolved("pos_split") * cfg.iters) if cfg.resolved("pos") else 0
    if split == 0:
        return [Stage(0)], 0
    if cfg.resolved("pos_mode") == "acts_first":
        return [Stage(0, float_weights=True), Stage(split)], split
    return [Stage(0, float_acts=True), Stage(split)], 0


def carry_rounding(ctx) -> None:
    """Before a unit of a later level: relax the rounding earlier units decided (``carry``)."""
    carry = ctx.cfg.resolved("carry")
    if carry >= 1:
        return
    for pos in sorted(ctx.trained_halves):
        for layer, w in ctx.state.of(half_modules(ctx.model, pos))[0]:
            w.blend(layer.weight, carry)


def level_iters(cfg, level: int) -> int:
    """The steps of each unit of ``level``: ``iters`` times its ``level_steps`` fraction
    (levels past the sequence take its last fraction), at least 1."""
    fractions = cfg.resolved("level_steps")
    if not fractions:
        return cfg.iters
    return max(1, round(cfg.iters * fractions[min(level, len(fractions) - 1)]))


def _rounding_steps(cfg, level: int) -> int:
    """A unit's rounding steps at ``level``: its steps less POS's first stage where that
    stage keeps the weights in float."""
    iters = level_iters(cfg, level)
    return iters - stages(cfg if iters == cfg.iters else cfg.with_iters(iters))[1]


def round_window(ctx, steps: int) -> tuple[int, int]:
    """``anneal="levels"``: one regulariser schedule over all levels, so that a unit of level
    k continues it where the rounding steps of levels 0..k-1 left it (its warm-up falls in
    the first levels, the rounding turns hard only at the last); ``"unit"``: each unit's
    own schedule."""
    if ctx.cfg.resolved("anneal") == "levels":
        run = ctx.engine.cfg  # the run's settings (ctx.cfg holds this level's steps)
        per_level = [_rounding_steps(run, k) for k in range(ctx.engine.n_levels)]
        return sum(per_level[:ctx.level]), sum(per_level)
    return 0, steps


PFCR = register_method(ReconMethod(
    name="pfcr",
    summary="PFCR's fine-to-coarse levels (attention and MLP units, then blocks, pairs of blocks, ...), "
            "the rounding annealed once across the levels (POS and QDrop available as options)",
    # measured best at the cpu budget (module docstring); the paper's settings:
    # qdrop_p=0.5, pos=True, carry=0.5, anneal="unit"
    defaults={"qdrop_p": 0.0},
    options={name: option(name).default for name in OPTIONS},
    schedule=schedule,
    stages=stages,
    before_unit=carry_rounding,
    round_window=round_window,
    level_iters=level_iters,
    budgets={"cpu": {"stop_at": 2}},  # up to pairs of blocks (ViT-S: 24 + 12 + 6 units)
))
