"""Swapping: float modules replaced by quantized ones, by type, with fresh quantizers.

Modules are swapped by type (``nn.Linear``, ``nn.Conv2d``, timm ``Attention`` and Swin
``WindowAttention``); timm code is never patched. Weights are quantized per output channel,
activations per tensor (or per token), Q and K per head, softmax probabilities with a
logarithmic quantizer. The patch embedding and the classifier get their own bits; inputs of
Linear layers fed by a LayerNorm get per-channel steps, to be folded into the LayerNorm
(``reparam``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..adapters import classifier_of, layernorm_consumers, mlp_output_linears, patch_embed_convs
from ..nn import Attention, QuantAttention, QuantConv2d, QuantLinear, QuantMatMul, QuantWindowAttention, WindowAttention
from ..quant import LogQuantizer, UniformQuantizer
from .spec import CalibSpec


# -- quantizer factory -----------------------------------------------------------------
def _act(cfg: CalibSpec, bits: int, shape=()) -> UniformQuantizer:
    return UniformQuantizer(bits, shape, method=cfg.calib, per_token=cfg.per_token and shape == (),
                            percentile=cfg.percentile, keep_min=cfg.zero_point_search)


def _weight(cfg: CalibSpec, bits: int, weight: torch.Tensor) -> UniformQuantizer:
    shape = (weight.shape[0],) + (1,) * (weight.dim() - 1)
    return UniformQuantizer(bits, shape, method=cfg.calib, percentile=cfg.percentile)


def _softmax(cfg: CalibSpec) -> nn.Module:
    kind = cfg.softmax
    if kind == "uniform":
        return UniformQuantizer(cfg.a_bits, (), method="minmax")
    return LogQuantizer(cfg.a_bits, "2" if kind == "log2" else "sqrt2")


@dataclass
class Plan:
    """Which modules play special roles, found before swapping."""

    head: nn.Module | None = None
    patch_convs: set = field(default_factory=set)
    ln_groups: dict = field(default_factory=dict)  # LayerNorm -> [(Linear, channel_map or None)] fed by its output
    mlp_outputs: set = field(default_factory=set)  # every MLP's second Linear (fc2): smoothing targets


def plan_for(model: nn.Module, example: torch.Tensor | None = None) -> Plan:
    """The plan of ``model``; with an ``example`` batch, also the LayerNorm groups to
    reparameterise (found by running it)."""
    groups = layernorm_consumers(model, example) if example is not None else {}
    return Plan(head=classifier_of(model), patch_convs=patch_embed_convs(model), ln_groups=groups,
                mlp_outputs=mlp_output_linears(model))


def swap_modules(model: nn.Module, cfg: CalibSpec, plan: Plan) -> nn.Module:
    """Replace float modules by quantized ones, in place, by type."""
    reparam_inputs = {lin for group in plan.ln_groups.values() for lin, _ in group}
    head_w = cfg.head_w_bits or cfg.w_bits
    head_a = cfg.head_a_bits or cfg.a_bits
    pe_w = cfg.patch_embed_w_bits or cfg.w_bits

    def convert(child: nn.Module) -> nn.Module | None:
        t = type(child)
        if t is nn.Linear:
            is_head = child is plan.head
            wq = _weight(cfg, head_w if is_head else cfg.w_bits, child.weight)
            a_bits = head_a if is_head else cfg.a_bits
            shape = (child.in_features,) if child in reparam_inputs else ()
            layer = QuantLinear(child, wq, _act(cfg, a_bits, shape))
            if cfg.fc2_smooth > 0 and child in plan.mlp_outputs and not is_head:
                layer.input_div = torch.ones(child.in_features, device=child.weight.device)  # set by calibration
            return layer
        if t is nn.Conv2d:
            is_pe = child in plan.patch_convs
            wq = _weight(cfg, pe_w if is_pe else cfg.w_bits, child.weight)
            return QuantConv2d(child, wq, _act(cfg, cfg.patch_embed_a_bits if is_pe else cfg.a_bits))
        if t in (Attention, WindowAttention):
            heads = child.num_heads
            qk_shape = (1, heads, 1, 1) if cfg.qk_per_head else ()
            qk = QuantMatMul(_act(cfg, cfg.a_bits, qk_shape), _act(cfg, cfg.a_bits, qk_shape))
            pv = QuantMatMul(_softmax(cfg), _act(cfg, cfg.a_bits))
            cls = QuantAttention if t is Attention else QuantWindowAttention
            return cls.from_float(child, qk, pv)
        return None

    def walk(parent: nn.Module):
        for name, child in list(parent.named_children()):
            walk(child)
            new = convert(child)
            if new is not None:
                setattr(parent, name, new)

    walk(model)
    return model


def prepare(model: nn.Module, cfg: CalibSpec, example: torch.Tensor) -> dict:
    """Swap modules for quantized ones, in place (no calibration yet). Returns the
    LayerNorm -> [(QuantLinear, channel_map)] groups to reparameterise (empty unless
    ``cfg.reparam``)."""
    plan = plan_for(model, example if cfg.reparam else None)
    swap_modules(model, cfg, plan)
    # A QuantLinear shares its weight tensor with the Linear it replaced.
    by_weight = {id(m.weight): m for m in model.modules() if isinstance(m, QuantLinear)}
    return {ln: [(by_weight[id(lin.weight)], cmap) for lin, cmap in group] for ln, group in plan.ln_groups.items()}
