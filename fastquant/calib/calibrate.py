"""Calibration of a swapped model: observe, pick ranges, reparameterise, round weights, correct biases."""
from __future__ import annotations

import torch
from torch import nn
from tqdm import tqdm

from ..nn import QuantConv2d, QuantLinear
from ..nn.observe import conv_input_stats, forward_with_input_hooks, linear_input_stats
from ..quant import quantizers_in, set_mode
from ..quant.gptq import gptq_round
from .observe import error_weight_hooks
from .reparam import reparameterize
from .spec import CalibSpec


def weight_quantizers(model: nn.Module) -> set:
    return {m.weight_quant for m in model.modules() if isinstance(m, (QuantLinear, QuantConv2d))}


def edge_layers(model: nn.Module) -> set:
    """The quantized layers outside the transformer blocks, whose weights ``edge_rounding``
    rounds: every convolution (a ViT's patch embedding) and the classifier (the swapped
    model's ``get_classifier()``, else its ``head``)."""
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else getattr(model, "head", None)
    edges = {m for m in model.modules() if isinstance(m, QuantConv2d)}
    return edges | ({head} if isinstance(head, QuantLinear) else set())


@torch.no_grad()
def smooth(model: nn.Module, layers: list, batches: list, alpha: float, progress: bool = True):
    """Move each layer's per-channel input range into its weight columns (``fc2_smooth``):
    with a_c the channel's largest |x| on the calibration images (float pass) and w_c its
    weight column's largest |W|, d_c = a_c^alpha / w_c^(1 - alpha), scaled to mean 1; the
    layer then computes (x / d) (W diag(d))^T, the same in float. Channels that never
    exceed 1e-5 of the largest input keep that floor."""
    amax = {m: torch.zeros(m.in_features, device=m.weight.device) for m in layers}

    def hook(mod, inp):
        x = inp[0].detach()
        amax[mod] = torch.maximum(amax[mod], x.abs().reshape(-1, x.shape[-1]).amax(0).float())

    saved = [(q, q.mode) for q in quantizers_in(model)]
    set_mode([q for q, _ in saved], "off")
    try:
        forward_with_input_hooks(model, layers, hook, batches, "smoothing", progress)
    finally:
        for q, mode in saved:
            q.mode = mode
    for m in layers:
        a = amax[m].clamp_min(1e-5 * float(amax[m].max().clamp_min(1e-12)))
        w = m.weight.detach().abs().amax(0).float()
        w = w.clamp_min(1e-5 * float(w.max().clamp_min(1e-12)))
        d = a.pow(alpha) / w.pow(1 - alpha)
        d = d / d.mean()
        m.weight.mul_(d.to(m.weight.dtype))
        m.input_div = d.to(m.weight.dtype)


@torch.no_grad()
def calibrate(model: nn.Module, batches: list, cfg: CalibSpec, ln_groups: dict, progress: bool = True) -> int:
    """Calibrate a swapped model, in place. Returns the number of images seen.

    0. With ``fc2_smooth``, the MLPs' second Linear layers get their input divisors
       (:func:`smooth`), which leaves the float model's output unchanged.
    1. Activation quantizers observe the float model on ``batches`` and pick their
       ranges (weighted by their downstream cost when ``output_aware``).
    2. LayerNorm-fed inputs are reparameterised (``ln_groups``, LayerNorm -> its
       QuantLinear consumers), which leaves the float model's output unchanged.
    3. A second float pass measures each Linear's input statistics: the per-channel
       mean square (weights the weight-range search), the means of x and Qa(x) (bias
       correction) and, for ``weight_rounding="gptq"``, the input's second-moment matrix.
    4. Weights get their per-channel ranges and are rounded (to nearest, or with GPTQ
       error compensation: ``weight_rounding`` for the layers in the blocks,
       ``edge_rounding`` for the convolutions and the classifier, :func:`edge_layers`; a
       convolution's GPTQ uses the second moment of its input patches); then biases are
       corrected.
    """
    wqs = weight_quantizers(model)
    acts = [q for q in quantizers_in(model) if q not in wqs]
    smoothed = [m for m in model.modules() if isinstance(m, QuantLinear) and m.input_div is not None]
    if smoothed and cfg.fc2_smooth > 0:
        smooth(model, smoothed, batches, cfg.fc2_smooth, progress)
    set_mode(wqs, "off")
    for q in acts:
        q.start_observing()
    hooks = error_weight_hooks(model) if cfg.output_aware else []
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
    edges = edge_layers(model)
    gptq_layers = {m for m in model.modules() if isinstance(m, (QuantLinear, QuantConv2d))
                   and (cfg.edge_rounding if m in edges else cfg.weight_rounding) == "gptq"}
    bias_correct = cfg.bias_correct
    # The input statistics feed the MSE weight search, GPTQ and bias correction; rtn needs none.
    needs_stats = bool(gptq_layers) or bias_correct or cfg.calib == "mse"
    stats = linear_input_stats(model, batches, covariance=gptq_layers, progress=progress) if needs_stats else {}
    gptq_convs = [m for m in gptq_layers if isinstance(m, QuantConv2d)]
    patch_stats = conv_input_stats(model, gptq_convs, batches, progress=progress) if gptq_convs else {}
    for m in model.modules():
        if isinstance(m, QuantConv2d):
            m.weight_quant.calibrate_tensor(m.weight)
            if m in patch_stats:
                w = m.weight.reshape(m.out_channels, -1)
                m.weight.copy_(gptq_round(w, m.weight_quant, patch_stats[m].second_moment()).reshape_as(m.weight))
        if not isinstance(m, QuantLinear):
            continue
        st = stats.get(m)
        m.weight_quant.calibrate_tensor(m.weight, None if st is None else st.mean_square().float().to(m.weight.device))
        gptq = m in gptq_layers
        original = m.weight.detach().clone() if gptq else m.weight.detach()
        if gptq and st is not None:
            m.weight.copy_(gptq_round(m.weight, m.weight_quant, st.second_moment()))
        if bias_correct and st is not None and m.bias is not None:
            m.weight_quant.mode = "quant"
            dev = m.weight.device
            shift = (m.weight_quant(m.weight).double() @ st.mean_quantized().to(dev)
                     - original.double() @ st.mean().to(dev))
            m.bias.sub_(shift.to(m.bias.dtype))
    set_mode(quantizers_in(model), "quant")
    return n


