"""Units of reconstruction: named spans of a timm Vision Transformer's blocks.

The residual stream of a ViT after its embedding (patch embedding, position
embedding, ``patch_drop``, ``norm_pre``) passes through ``2 * depth`` *halves*:
half ``2i`` is block i's attention branch with its shortcut,
``x + ls1(attn(norm1(x)))``, and half ``2i + 1`` its MLP branch with its shortcut,
``x + ls2(mlp(norm2(x)))`` (``drop_path`` is the identity in eval mode). A unit
covers the consecutive halves ``[start, end)``. Its name says which:

- ``attn3``, ``mlp3``: one half of block 3 (PFCR's finest units);
- ``block3``: both halves of block 3;
- ``blocks2-3``: blocks 2 to 3;
- ``mlp0..attn1``: any other span, by its first and last half.

A schedule is a list of levels, each a list of units reconstructed in order.
Tokens are run through units with :func:`run_span`, and from any position through
the rest of the model to the logits with :func:`run_rest`. Models are either a
timm ``VisionTransformer`` or a wrapper holding one (``LinearProbe``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from .._compat import import_timm
from ..errors import FastquantError

import_timm()
from timm.models.vision_transformer import Block, VisionTransformer  # noqa: E402

_HALF = re.compile(r"(attn|mlp)(\d+)$")
_BLOCK = re.compile(r"block(\d+)$")
_BLOCKS = re.compile(r"blocks(\d+)-(\d+)$")


@dataclass(frozen=True)
class Unit:
    """Halves ``[start, end)`` of the residual stream (see the module docstring)."""

    name: str
    start: int
    end: int


# -- finding the parts of the model -----------------------------------------------------
def find_vit(model: nn.Module) -> VisionTransformer:
    """The timm ``VisionTransformer`` that is ``model`` or that ``model`` wraps."""
    if isinstance(model, VisionTransformer):
        return model
    backbone = getattr(model, "backbone", None)
    if isinstance(backbone, VisionTransformer):
        return backbone
    found = [m for m in model.modules() if isinstance(m, VisionTransformer)]
    if len(found) != 1:
        raise FastquantError(f"reconstruction needs a timm VisionTransformer; a {type(model).__name__} holds "
                             f"{len(found) or 'none'}")
    return found[0]


def depth_of(model: nn.Module) -> int:
    return len(find_vit(model).blocks)


def splittable(block: nn.Module) -> bool:
    """Whether ``block`` is timm's pre-norm ``Block`` (attention and MLP halves)."""
    return type(block) is Block


def _half_name(pos: int) -> str:
    return f"{'attn' if pos % 2 == 0 else 'mlp'}{pos // 2}"


def unit_name(start: int, end: int) -> str:
    """The canonical name of halves ``[start, end)``."""
    if end - start == 1:
        return _half_name(start)
    if start % 2 == 0 and end % 2 == 0:
        a, b = start // 2, end // 2 - 1
        return f"block{a}" if a == b else f"blocks{a}-{b}"
    return f"{_half_name(start)}..{_half_name(end - 1)}"


def _check_span(model: nn.Module, start: int, end: int, name: str) -> Unit:
    vit = find_vit(model)
    depth = len(vit.blocks)
    if not 0 <= start < end <= 2 * depth:
        raise FastquantError(f"unknown unit {name!r}: the model has {depth} blocks (0 to {depth - 1})")
    for pos in (start, end):
        i = pos // 2
        if pos % 2 and not splittable(vit.blocks[i]):
            raise FastquantError(f"unit {name!r} splits block {i}, a {type(vit.blocks[i]).__name__} that has no "
                                 "separate attention and MLP halves")
    return Unit(unit_name(start, end), start, end)


def _parse_half(text: str) -> int | None:
    m = _HALF.match(text)
    return None if m is None else 2 * int(m.group(2)) + (m.group(1) == "mlp")


def unit_by_name(model: nn.Module, name: str) -> Unit:
    """The unit called ``name`` (see the module docstring); FastquantError if there is none."""
    if not isinstance(name, str):
        raise FastquantError(f"unit names must be strings, got {name!r}")
    half = _parse_half(name)
    if half is not None:
        return _check_span(model, half, half + 1, name)
    if m := _BLOCK.match(name):
        i = int(m.group(1))
        return _check_span(model, 2 * i, 2 * i + 2, name)
    if m := _BLOCKS.match(name):
        a, b = int(m.group(1)), int(m.group(2))
        if a > b:
            raise FastquantError(f"unknown unit {name!r}: blocks A-B needs A <= B")
        return _check_span(model, 2 * a, 2 * b + 2, name)
    if ".." in name:
        first, last = (_parse_half(p) for p in name.split("..", 1))
        if first is not None and last is not None and first <= last:
            return _check_span(model, first, last + 1, name)
    raise FastquantError(f"unknown unit {name!r} (expected attnN, mlpN, blockN, blocksA-B or a span like mlp0..attn1)")


# -- schedules ---------------------------------------------------------------------------
def block_units(model: nn.Module) -> list[Unit]:
    """One unit per transformer block, in order (BRECQ, QDrop, MGRQ)."""
    return [Unit(f"block{i}", 2 * i, 2 * i + 2) for i in range(depth_of(model))]


def pfcr_levels(model: nn.Module, merge: int = 2, stop_at: int | None = None) -> list[list[Unit]]:
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
    levels = [[Unit(_half_name(p), p, p + 1) for p in range(2 * len(vit.blocks))]]
    while len(levels[-1]) > 1 and (stop_at is None or len(levels) <= stop_at):
        prev = levels[-1]
        groups = [prev[i:i + merge] for i in range(0, len(prev), merge)]
        levels.append([Unit(unit_name(g[0].start, g[-1].end), g[0].start, g[-1].end) for g in groups])
    return levels


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
            checked = _check_span(model, u.start, u.end, u.name)
            if checked.name != u.name:
                raise FastquantError(f"unit {u.name!r} covers halves [{u.start}, {u.end}), which is {checked.name!r}")
    return out


# -- running tokens through the model -----------------------------------------------------
def embed(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Tokens entering the first block: what ``forward_features`` does before the blocks."""
    vit = find_vit(model)
    x = vit.patch_embed(images)
    x = vit._pos_embed(x)
    x = vit.patch_drop(x)
    return vit.norm_pre(x)


def half_modules(model: nn.Module, pos: int) -> list[nn.Module]:
    """The modules run by half ``pos`` (a whole block when it cannot be split)."""
    blk = find_vit(model).blocks[pos // 2]
    if not splittable(blk):
        return [blk]
    if pos % 2 == 0:
        return [blk.norm1, blk.attn, blk.ls1, blk.drop_path1]
    return [blk.norm2, blk.mlp, blk.ls2, blk.drop_path2]


def unit_modules(model: nn.Module, unit: Unit) -> list[nn.Module]:
    """The modules whose parameters and quantizers the unit's forward uses."""
    mods = []
    for pos in range(unit.start, unit.end):
        for m in half_modules(model, pos):
            if all(m is not seen for seen in mods):
                mods.append(m)
    return mods


def run_span(model: nn.Module, x: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Run tokens ``x`` through halves ``[start, end)``."""
    blocks = find_vit(model).blocks
    pos = start
    while pos < end:
        blk = blocks[pos // 2]
        if splittable(blk):
            if pos % 2 == 0:
                x = x + blk.drop_path1(blk.ls1(blk.attn(blk.norm1(x))))
            else:
                x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
            pos += 1
        else:
            if pos % 2 or pos + 2 > end:
                raise FastquantError(f"block {pos // 2} ({type(blk).__name__}) cannot be split into halves")
            x = blk(x)
            pos += 2
    return x


def run_unit(model: nn.Module, x: torch.Tensor, unit: Unit) -> torch.Tensor:
    return run_span(model, x, unit.start, unit.end)


def run_head(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Logits from the tokens leaving the last block: final norm, pooling, classifier."""
    from ..models.probe import LinearProbe, probe_features

    vit = find_vit(model)
    x = vit.norm(tokens)
    if model is vit:
        return vit.forward_head(x)
    if isinstance(model, LinearProbe):
        return model.head(probe_features(x, vit.num_prefix_tokens))
    raise FastquantError(f"cannot run the head of a {type(model).__name__} from tokens "
                         "(supported: timm VisionTransformer, fastquant LinearProbe)")


def run_rest(model: nn.Module, tokens: torch.Tensor, after: Unit | int) -> torch.Tensor:
    """Logits from ``tokens`` at position ``after`` (a unit: its end; or a half index):
    the remaining halves, then the final norm and the head."""
    start = after.end if isinstance(after, Unit) else int(after)
    return run_head(model, run_span(model, tokens, start, 2 * depth_of(model)))


def rest_modules(model: nn.Module, after: Unit | int) -> list[nn.Module]:
    """Modules used by :func:`run_rest` from ``after``: later halves, final norm, head."""
    start = after.end if isinstance(after, Unit) else int(after)
    vit = find_vit(model)
    mods = []
    for pos in range(start, 2 * len(vit.blocks)):
        for m in half_modules(model, pos):
            if all(m is not seen for seen in mods):
                mods.append(m)
    inner = {id(m) for m in vit.blocks.modules()} | {id(m) for m in vit.patch_embed.modules()}
    return mods + [m for m in model.modules() if id(m) not in inner and not list(m.children())]
