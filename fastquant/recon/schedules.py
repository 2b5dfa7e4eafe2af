"""Schedules: the levels of units a reconstruction goes through, each a list of units.

Units are spans of a ViT's residual stream (``fastquant.adapters.vit``). A method's record
builds its schedule (``block_units``: one level of blocks; PFCR's fine-to-coarse levels
live in its own file); a caller may also give one by unit names.
"""
from __future__ import annotations

from torch import nn

from ..adapters import Unit, depth_of, span_unit, unit_by_name
from ..errors import FastquantError


def block_units(model: nn.Module) -> list[Unit]:
    """One unit per transformer block, in order (BRECQ, QDrop, MGRQ)."""
    return [Unit(f"block{i}", 2 * i, 2 * i + 2) for i in range(depth_of(model))]


def schedule_from_names(model: nn.Module, levels) -> list[list[Unit]]:
    """A schedule from unit names: ``[["attn0", "mlp0", ...], ["block0", ...]]``."""
    if isinstance(levels, str) or not levels or any(isinstance(lv, str) or not lv for lv in levels):
        raise FastquantError("a schedule is a non-empty list of levels, each a non-empty list of unit names")
    return [[unit_by_name(model, name) for name in level] for level in levels]


def normalize_schedule(model: nn.Module, levels) -> list[list[Unit]]:
    """Accept a list of units (one level), a list of levels, or names; check every span."""
    if isinstance(levels, (list, tuple)) and levels and all(isinstance(u, Unit) for u in levels):
        levels = [list(levels)]
    if not isinstance(levels, (list, tuple)) or not levels:
        raise FastquantError("a schedule is a non-empty list of levels, each a non-empty list of units")
    out = []
    for level in levels:
        if not isinstance(level, (list, tuple)) or not level:
            raise FastquantError("a schedule is a non-empty list of levels, each a non-empty list of units")
        out.append([u if isinstance(u, Unit) else unit_by_name(model, u) for u in level])
    for level in out:
        for u in level:
            checked = span_unit(model, u.start, u.end, u.name)
            if checked.name != u.name:
                raise FastquantError(f"unit {u.name!r} covers halves [{u.start}, {u.end}), which is {checked.name!r}")
    return out
