"""Everything fastquant knows about the structure of timm's Vision Transformers.

Finding the parts of a model (the ``VisionTransformer`` inside a wrapper, its classifier,
its patch-embedding convolutions, the LayerNorms whose outputs feed Linear layers), and
running tokens through spans of its blocks.

The residual stream of a ViT after its embedding (patch embedding, position embedding,
``patch_drop``, ``norm_pre``) passes through ``2 * depth`` *halves*: half ``2i`` is block
i's attention branch with its shortcut, ``x + ls1(attn(norm1(x)))``, and half ``2i + 1`` its
MLP branch with its shortcut, ``x + ls2(mlp(norm2(x)))`` (``drop_path`` is the identity in
eval mode). A :class:`Unit` covers the consecutive halves ``[start, end)``. Its name says
which:

- ``attn3``, ``mlp3``: one half of block 3;
- ``block3``: both halves of block 3;
- ``blocks2-3``: blocks 2 to 3;
- ``mlp0..attn1``: any other span, by its first and last half.

Tokens are run through halves with :func:`run_span`, and from any position through the
rest of the model to the logits with :func:`run_rest`.

A model is either a timm ``VisionTransformer`` or a wrapper holding one. A wrapper takes
part through two methods (the protocol; ``fastquant.models.LinearProbe`` has both):

- ``forward_head(tokens)``: logits from the final norm's output (timm's own name and
  meaning for a ``VisionTransformer``);
- ``reparam_groups()`` (optional): ``[(layernorm, linear, channel_map)]``, Linear layers
  whose input is built from a LayerNorm's output by a per-channel map that tensor identity
  cannot reveal (``channel_map[j]``: the LayerNorm channel behind input channel j).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .._compat import import_timm
from ..errors import FastquantError

import_timm()
from timm.layers import PatchEmbed  # noqa: E402
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


def half_name(pos: int) -> str:
    """``attnN`` or ``mlpN``: the name of half ``pos``."""
    return f"{'attn' if pos % 2 == 0 else 'mlp'}{pos // 2}"


def unit_name(start: int, end: int) -> str:
    """The canonical name of halves ``[start, end)``."""
    if end - start == 1:
        return half_name(start)
    if start % 2 == 0 and end % 2 == 0:
        a, b = start // 2, end // 2 - 1
        return f"block{a}" if a == b else f"blocks{a}-{b}"
    return f"{half_name(start)}..{half_name(end - 1)}"


def span_unit(model: nn.Module, start: int, end: int, name: str) -> Unit:
    """The unit of halves [start, end) of ``model`` (FastquantError naming ``name`` when the
    span does not exist or splits a block that has no halves)."""
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
        return span_unit(model, half, half + 1, name)
    if m := _BLOCK.match(name):
        i = int(m.group(1))
        return span_unit(model, 2 * i, 2 * i + 2, name)
    if m := _BLOCKS.match(name):
        a, b = int(m.group(1)), int(m.group(2))
        if a > b:
            raise FastquantError(f"unknown unit {name!r}: blocks A-B needs A <= B")
        return span_unit(model, 2 * a, 2 * b + 2, name)
    if ".." in name:
        first, last = (_parse_half(p) for p in name.split("..", 1))
        if first is not None and last is not None and first <= last:
            return span_unit(model, first, last + 1, name)
    raise FastquantError(f"unknown unit {name!r} (expected attnN, mlpN, blockN, blocksA-B or a span like mlp0..attn1)")


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
    """Logits from the tokens leaving the last block: final norm, then the model's
    ``forward_head`` (pooling, classifier)."""
    vit = find_vit(model)
    x = vit.norm(tokens)
    head = getattr(model, "forward_head", None)
    if model is not vit and not callable(head):
        raise FastquantError(f"cannot run the head of a {type(model).__name__} from tokens: it wraps a timm "
                             "VisionTransformer but has no forward_head(tokens) method")
    return head(x)


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


# -- the parts of the model that play special roles ----------------------------------------
def classifier_of(model: nn.Module) -> Optional[nn.Linear]:
    """The model's final classifier Linear, if it has one (``get_classifier()``, else ``head``)."""
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else getattr(model, "head", None)
    return head if isinstance(head, nn.Linear) else None


def patch_embed_convs(model: nn.Module) -> set:
    """The Conv2d layers of the model's patch embeddings."""
    convs = set()
    for m in model.modules():
        if isinstance(m, PatchEmbed):
            convs.update(c for c in m.modules() if type(c) is nn.Conv2d)
    return convs


@torch.no_grad()
def layernorm_consumers(model: nn.Module, x: torch.Tensor) -> dict:
    """{LayerNorm: [(Linear, channel_map)]}: the Linear layers fed by each LayerNorm's output.

    Found by running ``x`` with hooks and matching tensors by identity, so no module names
    are assumed (channel_map None: the identity), plus the groups the model declares with
    ``reparam_groups()`` (see the module docstring). Only these pairs can be
    reparameterised exactly.
    """
    produced, groups, hooks = {}, {}, []

    def ln_hook(mod, inp, out):
        produced[id(out)] = (mod, out)  # keep ``out`` alive so its id stays unique

    def lin_hook(mod, inp):
        hit = produced.get(id(inp[0]))
        if hit is not None and mod not in groups.setdefault(hit[0], []):
            groups[hit[0]].append(mod)

    for m in model.modules():
        if isinstance(m, nn.LayerNorm):  # timm's LayerNorm subclasses nn.LayerNorm
            hooks.append(m.register_forward_hook(ln_hook))
        elif type(m) is nn.Linear:
            hooks.append(m.register_forward_pre_hook(lin_hook))
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    found = {ln: [(lin, None) for lin in lins] for ln, lins in groups.items() if lins}
    declared = getattr(model, "reparam_groups", None)
    for ln, lin, cmap in (declared() if callable(declared) else []):
        found.setdefault(ln, []).append((lin, cmap))
    return found


def expected_input(model: nn.Module) -> tuple[Optional[int], Optional[tuple[int, int]]]:
    """(channels, (height, width)) the model takes, as far as its first convolution (a ViT's
    patch embedding) says: the size only when the patch embedding insists on one (timm's
    ``strict_img_size`` without ``dynamic_img_size``); (None, None) without a convolution."""
    for m in model.modules():
        if isinstance(m, PatchEmbed) and isinstance(getattr(m, "proj", None), nn.Conv2d):
            size = tuple(m.img_size) if getattr(m, "strict_img_size", False) and m.img_size is not None \
                and not getattr(m, "dynamic_img_size", False) else None
            return m.proj.in_channels, size
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return (conv.in_channels if conv is not None else None), None


def has_attention(model: nn.Module) -> bool:
    """Whether the model holds an attention module fastquant quantizes (timm's ``Attention``
    or Swin's ``WindowAttention``, plain or already quantized)."""
    from timm.layers.attention import Attention
    from timm.models.swin_transformer import WindowAttention

    return any(isinstance(m, (Attention, WindowAttention)) for m in model.modules())


def mlp_output_linears(model: nn.Module) -> set:
    """The second Linear of every MLP (timm's ``Mlp`` and its variants: ``fc1``, then
    ``fc2``): the layers whose input (after GELU, or a gated product) no LayerNorm feeds, so
    per-channel input ranges can only be moved into their own weight columns."""
    return {m.fc2 for m in model.modules()
            if isinstance(getattr(m, "fc1", None), nn.Linear) and isinstance(getattr(m, "fc2", None), nn.Linear)}
