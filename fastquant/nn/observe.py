"""What the quantized modules see: running statistics of every QuantLinear's input (and of
the convolution patches a QuantConv2d multiplies), observed with forward pre-hooks in a
float pass. Calibration reads them for range search, bias correction and GPTQ;
reconstruction for its GPTQ rounding start."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..quant import quantizers_in, set_mode
from .modules import QuantConv2d, QuantLinear


class InputStats:
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


def forward_with_input_hooks(model: nn.Module, layers: list, hook, batches, desc: str, progress: bool = True):
    """Run ``batches`` (a sequence of model inputs) through ``model`` with ``hook`` as a
    forward pre-hook on each of ``layers`` (removed afterwards, also on an error)."""
    hooks = [m.register_forward_pre_hook(hook) for m in layers]
    try:
        for x in tqdm(batches, desc=desc, unit="batch", disable=not progress, leave=False):
            model(x)
    finally:
        for h in hooks:
            h.remove()


@torch.no_grad()
def linear_input_stats(model: nn.Module, batches, covariance, progress: bool = True, layers=None,
                       quantized: bool = True) -> dict:
    """One float pass (all quantizers set off, and left off) recording the input statistics
    of ``layers`` (default: every QuantLinear of ``model``); ``covariance``: whether to
    record second-moment matrices too (for GPTQ): True or False for every layer, or the set
    of layers that need them. ``quantized``: also the mean of each input as its input
    quantizer quantizes it (``InputStats.mean_quantized``; False: the float mean, and the
    input quantizers are not touched)."""
    if layers is None:
        layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    wants = (lambda m: m in covariance) if isinstance(covariance, (set, frozenset)) else (lambda m: bool(covariance))
    stats = {m: InputStats(m.in_features, wants(m)) for m in layers}

    def hook(mod, inp):
        x = mod.prepare_input(inp[0].detach())
        xq = x
        q = mod.input_quant
        if quantized and q is not None:
            q.mode = "quant"
            xq = q(x)
            q.mode = "off"
        stats[mod].add(x, xq)

    set_mode(quantizers_in(model), "off")
    forward_with_input_hooks(model, layers, hook, batches, "layer statistics", progress)
    return {m: st for m, st in stats.items() if st.n > 0}


def conv_patches(conv: QuantConv2d, x: torch.Tensor) -> torch.Tensor:
    """The input patches a convolution's weight [O, C, kh, kw] multiplies, as rows
    [N * L, C * kh * kw] in the order of ``weight.reshape(O, -1)``'s columns."""
    cols = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


@torch.no_grad()
def conv_input_stats(model: nn.Module, convs: list, batches, progress: bool = True) -> dict:
    """One float pass (all quantizers off) recording the second moment of each convolution's
    input patches (:func:`conv_patches`), for GPTQ: {conv: InputStats with covariance}.
    Grouped convolutions are left out (their weight does not multiply whole patches)."""
    convs = [m for m in convs if m.groups == 1]
    stats = {m: InputStats(m.in_channels * m.kernel_size[0] * m.kernel_size[1], True) for m in convs}

    def hook(mod, inp):
        rows = conv_patches(mod, inp[0].detach())
        stats[mod].add(rows, rows)

    set_mode(quantizers_in(model), "off")
    forward_with_input_hooks(model, convs, hook, batches, "patch statistics", progress)
    return {m: st for m, st in stats.items() if st.n > 0}
