"""What calibration measures on the float model: downstream error weights of activation
quantizers, every Linear layer's input statistics, and the second moments of convolution
patches (for GPTQ on a patch embedding)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..nn import QuantConv2d, QuantLinear, QuantMatMul
from ..quant import quantizers_in, set_mode


def error_weight_hooks(model: nn.Module) -> list:
    """Hooks that tell activation quantizers what their error costs downstream.

    For y = x W^T an error e_j in input channel j moves the output by e_j W[:, j], so
    its expected squared cost is e_j^2 ||W[:, j]||^2 (cross terms between channels
    average out). For a matmul a @ b the same holds with the partner operand: an error
    in a[..., i, k] costs sum_d b[..., k, d]^2, one in b[..., k, d] costs
    sum_i a[..., i, k]^2. The MSE search weights each sampled element by this cost
    (quantizers that take such weights have an ``error_weight`` attribute).
    """
    hooks = []
    for m in model.modules():
        if isinstance(m, QuantLinear) and hasattr(m.input_quant, "error_weight"):
            m.input_quant.error_weight = m.weight.detach().pow(2).sum(0)
        elif isinstance(m, QuantMatMul):
            def pre(mod, args):
                a, b = args[0].detach(), args[1].detach()
                if hasattr(mod.a_quant, "error_weight"):
                    mod.a_quant.error_weight = b.pow(2).sum(-1).unsqueeze(-2)
                if hasattr(mod.b_quant, "error_weight"):
                    mod.b_quant.error_weight = a.pow(2).sum(-2).unsqueeze(-1)

            hooks.append(m.register_forward_pre_hook(pre))
    return hooks



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


def forward_with_input_hooks(model: nn.Module, layers: list, hook, batches: list, desc: str, progress: bool = True):
    """Run ``batches`` through ``model`` with ``hook`` as a forward pre-hook on each of
    ``layers`` (removed afterwards, also on an error)."""
    hooks = [m.register_forward_pre_hook(hook) for m in layers]
    try:
        for x in tqdm(batches, desc=desc, unit="batch", disable=not progress, leave=False):
            model(x)
    finally:
        for h in hooks:
            h.remove()


@torch.no_grad()
def linear_input_stats(model: nn.Module, batches: list, covariance, progress: bool = True) -> dict:
    """One float pass (all quantizers off) recording every QuantLinear's input statistics;
    ``covariance``: whether to record second-moment matrices too (for GPTQ): True or False
    for every layer, or the set of layers that need them."""
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    wants = (lambda m: m in covariance) if isinstance(covariance, (set, frozenset)) else (lambda m: bool(covariance))
    stats = {m: InputStats(m.in_features, wants(m)) for m in layers}

    def hook(mod, inp):
        x = mod.prepare_input(inp[0].detach())
        xq = x
        q = mod.input_quant
        if q is not None:
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
def conv_input_stats(model: nn.Module, convs: list, batches: list, progress: bool = True) -> dict:
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
