"""RepQ-ViT's reparameterisation: per-channel input steps folded into the LayerNorm before them."""
from __future__ import annotations

import torch
from torch import nn

from ..quant import UniformQuantizer, range_to_qparams


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
        new = UniformQuantizer(old.bits, (), method=old.method, percentile=old.percentile,
                               keep_min=old.keep_min).to(s.device)
        new.set_qparams(s_t.float(), z_t.float())
        new.mode = old.mode
        lin.input_quant = new
    return shift, r1


