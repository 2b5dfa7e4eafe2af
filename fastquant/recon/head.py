"""The classifier head's input step, trained after the units (``ReconConfig.head_iters``):
no unit reconstructs the head, whose 4-bit input keeps the step calibration chose on the
float model's features."""
from __future__ import annotations

import torch
from torch import nn
from tqdm import tqdm

from ..adapters import run_head
from ..errors import FastquantError
from ..nn import QuantLinear
from ..quant import ActQuant, Quantizer


def quantized_head(model: nn.Module) -> QuantLinear:
    """The model's classifier (``get_classifier()``, else ``head``) as a QuantLinear whose
    input has one calibrated step; anything else is refused."""
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else getattr(model, "head", None)
    q = getattr(head, "input_quant", None)
    step = q.step() if isinstance(q, Quantizer) and q.kind == "uniform" else None
    if not isinstance(head, QuantLinear) or step is None or step.numel() != 1:
        raise FastquantError("head_iters: the model's classifier is not a quantized Linear whose input has one "
                             "calibrated step (set head_iters=0)")
    return head


def _logits_mse(model: nn.Module, tokens: torch.Tensor, target: torch.Tensor, batch: int = 256) -> float:
    device = next(model.parameters()).device
    with torch.no_grad():
        sq = sum(float((run_head(model, tokens[i:i + batch].to(device)) - target[i:i + batch].to(device))
                       .double().pow(2).sum()) for i in range(0, len(tokens), batch))
    return sq / target.numel()


def train_head_step(model: nn.Module, tokens: torch.Tensor, target: torch.Tensor, cfg, seed: int,
                    progress: bool = False, desc: str = "head") -> tuple[list, float, float]:
    """``cfg.head_iters`` Adam steps on the step of the classifier's input quantizer (LSQ,
    at ``cfg.resolved("lr_act")``, batches of ``cfg.batch_size`` drawn with ``seed``) so
    that the logits of ``tokens`` (the tokens leaving the last block, run through the final
    norm and the head) approach ``target`` (MSE, divided by its first value); the learned
    step is written into the quantizer. Returns (losses, logits' MSE before, after)."""
    if cfg.head_iters < 1:
        raise FastquantError(f"train_head_step needs head_iters >= 1, got {cfg.head_iters}")
    head = quantized_head(model)
    device = next(model.parameters()).device
    before = _logits_mse(model, tokens, target)
    wrapper = ActQuant(head.input_quant)
    head.input_quant = wrapper
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([wrapper.scale], lr=cfg.resolved("lr_act"))
    n, bs = len(tokens), min(cfg.batch_size, len(tokens))
    history, first = [], None
    wrapper.scale.requires_grad_(True)
    bar = tqdm(range(cfg.head_iters), desc=desc, unit="it", disable=not progress, leave=False)
    try:
        for it in bar:
            idx = torch.randperm(n, generator=gen)[:bs]
            out = run_head(model, tokens[idx.to(tokens.device)].to(device))
            loss = (out - target[idx.to(target.device)].to(device)).pow(2).mean()
            first = loss.detach().clamp_min(1e-12) if first is None else first
            loss = loss / first
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            history.append(loss.item())
            if it % 10 == 0 or it == cfg.head_iters - 1:
                bar.set_postfix_str(f"loss {history[-1]:.4g}", refresh=False)
    finally:
        bar.close()
        wrapper.scale.requires_grad_(False)
        wrapper.trained = True
        head.input_quant = wrapper.write_back()
    return history, before, _logits_mse(model, tokens, target)
