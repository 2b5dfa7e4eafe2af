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
from .quantizers import LogQuantizer, UniformQuantizer, fake_quant_uniform, range_to_qparams

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


def _error_weight_hooks(model: nn.Module) -> list:
    """Hooks that tell activation quantizers what their error costs downstream.

    For y = x W^T an error e_j in input channel j moves the output by e_j W[:, j], so
    its expected squared cost is e_j^2 ||W[:, j]||^2 (cross terms between channels
    average out). For a matmul a @ b the same holds with the partner operand: an error
    in a[..., i, k] costs sum_d b[..., k, d]^2, one in b[..., k, d] costs
    sum_i a[..., i, k]^2. The MSE search weights each sampled element by this cost.
    """
    hooks = []
    for m in model.modules():
        if isinstance(m, QuantLinear) and isinstance(m.input_quant, UniformQuantizer):
            m.input_quant.error_weight = m.weight.detach().pow(2).sum(0)
        elif isinstance(m, QuantMatMul):
            def pre(mod, args):
                a, b = args[0].detach(), args[1].detach()
                if isinstance(mod.a_quant, UniformQuantizer):
                    mod.a_quant.error_weight = b.pow(2).sum(-1).unsqueeze(-2)
                if isinstance(mod.b_quant, UniformQuantizer):
                    mod.b_quant.error_weight = a.pow(2).sum(-2).unsqueeze(-1)

            hooks.append(m.register_forward_pre_hook(pre))
    return hooks


def set_mode(quantizers, mode: str):
    for q in quantizers:
        q.mode = mode


@torch.no_grad()
def calibrate(model: nn.Module, batches: list, cfg: QuantConfig, ln_groups: dict, progress: bool = True) -> int:
    """Calibrate a swapped model, in place. Returns the number of images seen.

    1. Activation quantizers observe the float model on ``batches`` and pick their
       ranges (weighted by their downstream cost when ``output_aware``).
    2. LayerNorm-fed inputs are reparameterised (``ln_groups``, LayerNorm -> its
       QuantLinear consumers), which leaves the float model's output unchanged.
    3. A second float pass measures each Linear's input statistics: the per-channel
       mean square (weights the weight-range search), the means of x and Qa(x) (bias
       correction) and, for ``weight_rounding="gptq"``, the input's second-moment matrix.
    4. Weights get their per-channel ranges and are rounded (to nearest, or with GPTQ
       error compensation); then biases are corrected.
    """
    wqs = weight_quantizers(model)
    acts = [q for q in quantizers_of(model) if q not in wqs]
    set_mode(wqs, "off")
    for q in acts:
        q.start_observing()
    hooks = _error_weight_hooks(model) if cfg.resolved("output_aware") else []
    n = 0
    try:
        for x in tqdm(batches, desc="calibrate", unit="batch", disable=not progress, leave=False):
            model(x)
            n += len(x)
    finally:
        for h in hooks:
            h.remove()
        for q in acts:
            q.error_weight = None
    for q in acts:
        q.finish_observing()
    set_mode(acts, "off")
    if ln_groups:
        probe = batches[0][: min(8, len(batches[0]))]
        before = model(probe)
        for ln, consumers in ln_groups.items():
            reparameterize(ln, consumers)
        after = model(probe)
        err = (after - before).abs().max().item() / max(before.abs().max().item(), 1e-6)
        if err > 1e-3:
            raise RuntimeError(f"reparameterisation changed the float model's output (relative error {err:.2e})")
    gptq = cfg.resolved("weight_rounding") == "gptq"
    bias_correct = cfg.resolved("bias_correct")
    # The input statistics feed the MSE weight search, GPTQ and bias correction; rtn needs none.
    needs_stats = gptq or bias_correct or cfg.resolved("calib") == "mse"
    stats = _linear_input_stats(model, batches, covariance=gptq, progress=progress) if needs_stats else {}
    for m in model.modules():
        if isinstance(m, QuantConv2d):
            m.weight_quant.calibrate_tensor(m.weight)
        if not isinstance(m, QuantLinear):
            continue
        st = stats.get(m)
        m.weight_quant.calibrate_tensor(m.weight, None if st is None else st.mean_square().float().to(m.weight.device))
        original = m.weight.detach().clone() if gptq else m.weight.detach()
        if gptq and st is not None:
            m.weight.copy_(gptq_round(m.weight, m.weight_quant, st.second_moment()))
        if bias_correct and st is not None and m.bias is not None:
            m.weight_quant.mode = "quant"
            dev = m.weight.device
            shift = (m.weight_quant(m.weight).double() @ st.mean_quantized().to(dev)
                     - original.double() @ st.mean().to(dev))
            m.bias.sub_(shift.to(m.bias.dtype))
    set_mode(quantizers_of(model), "quant")
    return n


class _InputStats:
    """Running statistics of one Linear's input x (as rows [*, C]) and of Qa(x)."""

    def __init__(self, channels: int, covariance: bool):
        self.n = 0
        self.sum = torch.zeros(channels, dtype=torch.float64)
        self.sum_q = torch.zeros(channels, dtype=torch.float64)
        self.sum_sq = torch.zeros(channels, dtype=torch.float64)
        self.xtx = torch.zeros(channels, channels) if covariance else None

    def add(self, x: torch.Tensor, xq: torch.Tensor):
        x, xq = x.reshape(-1, x.shape[-1]), xq.reshape(-1, x.shape[-1])
        self.n += x.shape[0]
        self.sum += x.double().sum(0).cpu()
        self.sum_q += xq.double().sum(0).cpu()
        self.sum_sq += x.double().pow(2).sum(0).cpu()
        if self.xtx is not None:
            xf = x.float()
            self.xtx += (xf.t() @ xf).cpu()

    def mean(self) -> torch.Tensor:
        return self.sum / self.n

    def mean_quantized(self) -> torch.Tensor:
        return self.sum_q / self.n

    def mean_square(self) -> torch.Tensor:
        return self.sum_sq / self.n

    def second_moment(self) -> torch.Tensor:
        return self.xtx / self.n


@torch.no_grad()
def _linear_input_stats(model: nn.Module, batches: list, covariance: bool, progress: bool = True) -> dict:
    """One float pass (all quantizers off) recording every QuantLinear's input statistics."""
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    stats = {m: _InputStats(m.in_features, covariance) for m in layers}

    def hook(mod, inp):
        x = inp[0].detach()
        xq = x
        q = mod.input_quant
        if q is not None:
            q.mode = "quant"
            xq = q(x)
            q.mode = "off"
        stats[mod].add(x, xq)

    set_mode(quantizers_of(model), "off")
    hooks = [m.register_forward_pre_hook(hook) for m in layers]
    try:
        for x in tqdm(batches, desc="layer statistics", unit="batch", disable=not progress, leave=False):
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return {m: st for m, st in stats.items() if st.n > 0}


def round_to_grid(w: torch.Tensor, quantizer: UniformQuantizer) -> torch.Tensor:
    """Round-to-nearest fake quantization of a weight [O, ...] with the quantizer's
    fixed per-output-channel parameters."""
    shape = (-1,) + (1,) * (w.dim() - 1)
    scale = quantizer.scale.reshape(shape).to(w)
    zp = quantizer.zero_point.reshape(shape).to(w)
    return fake_quant_uniform(w, scale, zp, quantizer.qmax)


@torch.no_grad()
def gptq_round(weight: torch.Tensor, quantizer: UniformQuantizer, second_moment: torch.Tensor,
               damp: float = 0.01, block: int = 128) -> torch.Tensor:
    """Round ``weight`` [O, C] onto ``quantizer``'s per-output-channel grid with GPTQ
    (Frantar et al., arXiv 2210.17323): columns are quantized one at a time and each
    column's rounding error is spread over the columns not yet quantized so that
    E||x W^T - x Q^T||^2 stays smallest for inputs with second moment E[x x^T]
    (``second_moment``, [C, C]). Scales and zero points stay as calibrated. Returns
    the dequantized weight: values on the grid, which the quantizer maps to the same codes.
    """
    w = weight.detach().float().clone()
    cols = w.shape[1]
    h = second_moment.to(w).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += torch.eye(cols, dtype=h.dtype, device=h.device) * (damp * torch.diag(h).mean())
    try:
        # Upper Cholesky factor of H^-1: row i holds how column i's error spreads to later columns.
        u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    except RuntimeError:  # not positive definite even after damping: plain rounding
        return round_to_grid(weight, quantizer)
    scale = quantizer.scale.reshape(-1, 1).to(w)
    zp = quantizer.zero_point.reshape(-1, 1).to(w)
    out = torch.empty_like(w)
    for b0 in range(0, cols, block):
        b1 = min(b0 + block, cols)
        wb = w[:, b0:b1].clone()
        errs = torch.empty_like(wb)
        ub = u[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = wb[:, i : i + 1]
            q = fake_quant_uniform(col, scale, zp, quantizer.qmax)
            out[:, b0 + i : b0 + i + 1] = q
            e = (col - q) / ub[i, i]
            wb[:, i:] -= e * ub[i : i + 1, i:]
            errs[:, i : i + 1] = e
        w[:, b1:] -= errs @ u[b0:b1, b1:]
    return out.to(weight.dtype)


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
             progress: bool = True, recon=None, state_dir=None, resume: bool = False) -> nn.Module:
    """Fake-quantize ``model`` with ``config``, calibrated on ``calib_data`` (an [N, 3, H, W]
    tensor of preprocessed images, or an iterable of such batches or (images, labels)).

    The reconstruction methods (brecq, qdrop, pfcr, mgrq) then run ``fastquant.recon`` on
    the same images with ``recon`` (a ``fastquant.recon.ReconConfig``; None: its defaults),
    saving their state in ``state_dir`` after every unit and, with ``resume``, continuing
    from it; the record is kept as ``model.fastquant_recon``.

    Returns the quantized model (a copy unless ``inplace``); its modules hold float
    weights and quantizer state, and ``fastquant.save`` stores integer weights.
    """
    from .config import RECON_METHODS

    cfg = config or QuantConfig()
    if not isinstance(cfg, QuantConfig):
        raise FastquantError(f"config must be a fastquant.QuantConfig, got {type(cfg).__name__}")
    reconstructs = cfg.method in RECON_METHODS
    if not reconstructs and (recon is not None or state_dir is not None or resume):
        raise FastquantError(f"reconstruction settings apply to {', '.join(RECON_METHODS)}, not {cfg.method}")
    batches = [_checked(x) for x in _iter_batches(calib_data, cfg.calib_batch_size)]
    fp_model = model
    if inplace and reconstructs:
        fp_model = copy.deepcopy(model)  # the float targets of reconstruction
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    ln_groups = prepare(model, cfg, batches[0][: min(2, len(batches[0]))])
    calibrate(model, batches, cfg, ln_groups, progress=progress)
    model.fastquant_config = cfg
    if reconstructs:
        from .recon import run_method

        model.fastquant_recon = run_method(fp_model, model, torch.cat(batches), cfg.method, recon,
                                           state_dir=state_dir, resume=resume, progress=progress)
    return model
