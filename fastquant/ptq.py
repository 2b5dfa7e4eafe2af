"""Turning a float timm model into a fake-quantized one: swap, calibrate, reparameterise.

    qmodel = fastquant.quantize(model, calib_images, fastquant.QuantConfig(w_bits=4, a_bits=4, method="repq"))

Modules are swapped by type (``nn.Linear``, ``nn.Conv2d``, timm ``Attention`` and
Swin ``WindowAttention``); timm code is never patched. Calibration is explicit:
activation quantizers observe the float model on the calibration images, then
weights are calibrated from the (possibly reparameterised) weights.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Iterable, Union

import torch
from torch import nn
from tqdm import tqdm

from .config import QuantConfig
from .errors import FastquantError
from .modules import Attention, QuantAttention, QuantConv2d, QuantLinear, QuantMatMul, QuantWindowAttention, WindowAttention
from .quantizers import LogQuantizer, UniformQuantizer, range_to_qparams

CalibData = Union[torch.Tensor, Iterable]


# -- quantizer factory -----------------------------------------------------------------
def _act(cfg: QuantConfig, bits: int, shape=()) -> UniformQuantizer:
    return UniformQuantizer(bits, shape, method=cfg.resolved("calib"), per_token=cfg.per_token and shape == (),
                            percentile=cfg.percentile)


def _weight(cfg: QuantConfig, bits: int, weight: torch.Tensor) -> UniformQuantizer:
    shape = (weight.shape[0],) + (1,) * (weight.dim() - 1)
    return UniformQuantizer(bits, shape, method=cfg.resolved("calib"), percentile=cfg.percentile)


def _softmax(cfg: QuantConfig) -> nn.Module:
    kind = cfg.resolved("softmax")
    if kind == "uniform":
        return UniformQuantizer(cfg.a_bits, (), method="minmax")
    return LogQuantizer(cfg.a_bits, "2" if kind == "log2" else "sqrt2")


@dataclass
class _Plan:
    """Which modules play special roles, found before swapping."""

    head: nn.Module | None
    patch_convs: set
    ln_groups: dict  # LayerNorm -> [(Linear, channel_map or None)] fed by its output


def _find_patch_convs(model: nn.Module) -> set:
    from timm.layers import PatchEmbed

    convs = set()
    for m in model.modules():
        if isinstance(m, PatchEmbed):
            convs.update(c for c in m.modules() if type(c) is nn.Conv2d)
    return convs


@torch.no_grad()
def find_layernorm_consumers(model: nn.Module, x: torch.Tensor) -> dict:
    """LayerNorms whose output tensor is passed, as is, to Linear layers.

    Found by running ``x`` with hooks and matching tensors by identity, so no module
    names are assumed. Only these pairs can be reparameterised exactly.
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
    return {ln: [(lin, None) for lin in lins] for ln, lins in groups.items() if lins}


def swap_modules(model: nn.Module, cfg: QuantConfig, plan: _Plan) -> nn.Module:
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
            return QuantLinear(child, wq, _act(cfg, a_bits, shape))
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


def _iter_batches(data: CalibData, batch_size: int):
    """Calibration batches as float tensors; accepts a tensor, or batches / (x, y) tuples."""
    if isinstance(data, torch.Tensor):
        if data.numel() == 0 or len(data) == 0:
            raise FastquantError("calibration set is empty")
        for i in range(0, len(data), batch_size):
            yield data[i:i + batch_size]
        return
    seen = False
    for item in data:
        x = item[0] if isinstance(item, (tuple, list)) else item
        if not isinstance(x, torch.Tensor):
            raise FastquantError(f"calibration batches must be tensors, got {type(x).__name__}")
        seen = True
        yield x
    if not seen:
        raise FastquantError("calibration set is empty")


def _checked(x: torch.Tensor) -> torch.Tensor:
    if not torch.is_floating_point(x):
        raise FastquantError(f"calibration images must be floating point, got {x.dtype}")
    if not torch.isfinite(x).all():
        raise FastquantError("calibration data contains NaN or Inf")
    return x


def quantizers_of(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, (UniformQuantizer, LogQuantizer))]


def weight_quantizers(model: nn.Module):
    return {m.weight_quant for m in model.modules() if isinstance(m, (QuantLinear, QuantConv2d))}


@torch.no_grad()
def reparameterize(ln: nn.LayerNorm, consumers: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold per-channel input quantization of ``consumers`` into ``ln`` (RepQ-ViT).

    With per-channel scale s and zero point z calibrated on the LayerNorm output X,
    per-tensor s~ = mean(s), z~ = round(mean(z)), r1 = s / s~, r2 = z - z~:
    the LayerNorm then emits X~ = (X + s r2) / r1, whose per-tensor quantization uses
    exactly the integer grid of the per-channel one, and each consumer absorbs r1 and
    r2: W~ = W diag(r1), b~ = b - W (s r2). With quantization off, outputs are unchanged.

    ``consumers`` holds (QuantLinear, channel_map) pairs; channel_map (None: identity)
    gives the LayerNorm channel behind each input channel, for inputs built from the
    LayerNorm output by per-channel linear maps (a probe's [class token, mean token]).
    The per-channel ranges of input channels sharing a LayerNorm channel are merged.
    Returns (s r2, r1) in float64, per LayerNorm channel.
    """
    lin0, cmap0 = consumers[0]
    q0 = lin0.input_quant
    s = q0.scale.double().reshape(-1)
    z = q0.zero_point.double().reshape(-1)
    if cmap0 is not None:
        lo, hi = -z * s, (q0.qmax - z) * s
        n = ln.normalized_shape[-1]
        lo = torch.full((n,), float("inf"), dtype=lo.dtype, device=lo.device).scatter_reduce(0, cmap0, lo, "amin")
        hi = torch.full((n,), -float("inf"), dtype=hi.dtype, device=hi.device).scatter_reduce(0, cmap0, hi, "amax")
        s, z = range_to_qparams(lo, hi, q0.qmax)
    s_t, z_t = s.mean(), torch.round(z.mean())
    r1, r2 = s / s_t, z - z_t
    shift = s * r2
    if ln.weight is None:
        ln.weight = nn.Parameter(torch.ones(ln.normalized_shape, device=s.device))
        ln.bias = nn.Parameter(torch.zeros(ln.normalized_shape, device=s.device))
    ln.weight.copy_((ln.weight.double() / r1).to(ln.weight.dtype))
    ln.bias.copy_(((ln.bias.double() + shift) / r1).to(ln.bias.dtype))
    for lin, cmap in consumers:
        c_shift, c_r1 = (shift, r1) if cmap is None else (shift[cmap], r1[cmap])
        w = lin.weight.double()
        if lin.bias is None:
            lin.bias = nn.Parameter(torch.zeros(lin.out_features, dtype=lin.weight.dtype, device=lin.weight.device))
        lin.bias.copy_((lin.bias.double() - w @ c_shift).to(lin.bias.dtype))
        lin.weight.copy_((w * c_r1[None, :]).to(lin.weight.dtype))
        old = lin.input_quant
        new = UniformQuantizer(old.bits, (), method=old.method, percentile=old.percentile).to(s.device)
        new.set_qparams(s_t.float(), z_t.float())
        new.mode = old.mode
        lin.input_quant = new
    return shift, r1


def set_mode(quantizers, mode: str):
    for q in quantizers:
        q.mode = mode


@torch.no_grad()
def calibrate(model: nn.Module, batches: list, cfg: QuantConfig, ln_groups: dict, progress: bool = True) -> int:
    """Calibrate a swapped model: activation quantizers observe the float model on
    ``batches``, LayerNorm-fed inputs are reparameterised (``ln_groups``, LayerNorm ->
    its QuantLinear consumers), then weights are calibrated. Returns the image count."""
    wqs = weight_quantizers(model)
    acts = [q for q in quantizers_of(model) if q not in wqs]
    set_mode(wqs, "off")
    for q in acts:
        q.start_observing()
    moments = {}  # QuantLinear -> [sum x, sum x^2, rows] per input channel, for the weight search

    def moment_hook(mod, inp):
        x = inp[0].detach().double().reshape(-1, mod.in_features)
        acc = moments.setdefault(mod, [0.0, 0.0, 0])
        acc[0] = acc[0] + x.sum(0)
        acc[1] = acc[1] + x.pow(2).sum(0)
        acc[2] += x.shape[0]

    hooks = [m.register_forward_pre_hook(moment_hook) for m in model.modules() if isinstance(m, QuantLinear)]
    n = 0
    try:
        for x in tqdm(batches, desc="calibrate", unit="batch", disable=not progress, leave=False):
            model(x)
            n += len(x)
    finally:
        for h in hooks:
            h.remove()
    for q in acts:
        q.finish_observing()
    mean_sq = {m: (acc[1] / acc[2], acc[0] / acc[2]) for m, acc in moments.items()}
    if ln_groups:
        set_mode(quantizers_of(model), "off")
        probe = batches[0][: min(8, len(batches[0]))]
        before = model(probe)
        for ln, consumers in ln_groups.items():
            shift, r1 = reparameterize(ln, consumers)
            for lin, cmap in consumers:  # moments of the reparameterised input (X + shift) / r1
                sh, r = (shift, r1) if cmap is None else (shift[cmap], r1[cmap])
                ex2, ex = mean_sq[lin]
                mean_sq[lin] = ((ex2 + 2 * sh * ex + sh**2) / r**2, (ex + sh) / r)
        after = model(probe)
        err = (after - before).abs().max().item() / max(before.abs().max().item(), 1e-6)
        if err > 1e-3:
            raise RuntimeError(f"reparameterisation changed the float model's output (relative error {err:.2e})")
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.weight_quant.calibrate_tensor(m.weight, mean_sq[m][0].float() if m in mean_sq else None)
        elif isinstance(m, QuantConv2d):
            m.weight_quant.calibrate_tensor(m.weight)
    set_mode(quantizers_of(model), "quant")
    return n


def prepare(model: nn.Module, cfg: QuantConfig, example: torch.Tensor) -> dict:
    """Swap modules for quantized ones, in place (no calibration yet). Returns the
    LayerNorm -> [(QuantLinear, channel_map)] groups to reparameterise (empty unless
    the config asks)."""
    from .models import classifier_of

    plan = _Plan(head=classifier_of(model), patch_convs=_find_patch_convs(model), ln_groups={})
    if cfg.resolved("reparam"):
        plan.ln_groups = find_layernorm_consumers(model, example)
        # Models may declare groups that tensor identity cannot reveal (see LinearProbe).
        for ln, lin, cmap in getattr(model, "fastquant_reparam_groups", lambda: [])():
            plan.ln_groups.setdefault(ln, []).append((lin, cmap))
    swap_modules(model, cfg, plan)
    # A QuantLinear shares its weight tensor with the Linear it replaced.
    by_weight = {id(m.weight): m for m in model.modules() if isinstance(m, QuantLinear)}
    return {ln: [(by_weight[id(lin.weight)], cmap) for lin, cmap in group] for ln, group in plan.ln_groups.items()}


def quantize(model: nn.Module, calib_data: CalibData, config: QuantConfig | None = None, *, inplace: bool = False,
             progress: bool = True) -> nn.Module:
    """Fake-quantize ``model`` with ``config``, calibrated on ``calib_data`` (an [N, 3, H, W]
    tensor of preprocessed images, or an iterable of such batches or (images, labels)).

    Returns the quantized model (a copy unless ``inplace``); its modules hold float
    weights and quantizer state, and ``fastquant.save`` stores integer weights.
    """
    cfg = config or QuantConfig()
    if not isinstance(cfg, QuantConfig):
        raise FastquantError(f"config must be a fastquant.QuantConfig, got {type(cfg).__name__}")
    batches = [_checked(x) for x in _iter_batches(calib_data, cfg.calib_batch_size)]
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    ln_groups = prepare(model, cfg, batches[0][: min(2, len(batches[0]))])
    calibrate(model, batches, cfg, ln_groups, progress=progress)
    model.fastquant_config = cfg
    return model
