"""What calibration measures on the float model: downstream error weights of activation
quantizers (here), every Linear layer's input statistics and the second moments of
convolution patches (for GPTQ on a patch embedding; ``fastquant.nn.observe``, which
reconstruction reads too)."""
from __future__ import annotations

from torch import nn

from ..nn import QuantLinear, QuantMatMul


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
