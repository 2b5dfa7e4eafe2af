"""The loss terms a unit can be trained with; a method picks them by their weights.

Each term is built for one unit (``Term(ctx)``, ``ctx``: the engine's :class:`UnitContext`),
may prepare the step (``before_forward``), gives its value for the unit's output on a batch
(``value(out, batch)``) and undoes what it installed (``close``). ``TERMS`` lists them in
the order their values are summed, each with the setting that weighs it:

- ``rec`` (``w_rec``): the mean squared error of the unit's output against the float
  model's output of the unit (the target);
- ``global`` (``w_global``, MGRQ's extra-block global supervision): the KL divergence from
  the float model's logits to the logits of the unit's output run through the rest of the
  model (``global_rest``: the rest ``quant``ized or in ``float``; ``global_batch``: on the
  first images of each batch only); with ``global_form=fisher`` instead its second-order
  form at the float model: the unit's squared output error weighted by the diagonal Fisher
  information of the float model's prediction with respect to the unit's output;
- ``head`` (``w_head``): on the unit ending at the last block only, the KL divergence from
  the float model's logits to the logits of the unit's output through the final norm and
  the head (quantized as they are);
- ``local`` (``w_local``, MGRQ's intra-block local supervision): per QuantLinear of the unit,
  its output against the float model's same layer on the float input (``local_loss``:
  ``moments`` aligns per-channel means and standard deviations, ``mse`` the elements).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..adapters import Unit, depth_of, rest_modules, run_head, run_rest, run_span
from ..errors import FastquantError
from ..quant import quantizers_in, quantizers_off


@dataclass
class StepBatch:
    """One training step's batch: the images' indices, the float input of the unit and its
    float output (the target)."""

    idx: torch.Tensor
    x_fp: torch.Tensor
    target: torch.Tensor


class Term:
    def __init__(self, ctx):
        self.ctx = ctx

    def before_forward(self):
        pass

    def value(self, out: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        raise NotImplementedError

    def close(self):
        pass


def kl_to_float(logits: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """KL(softmax(ref) || softmax(logits)), averaged over the batch."""
    return F.kl_div(F.log_softmax(logits, -1), F.log_softmax(ref, -1), log_target=True, reduction="batchmean")


class Reconstruction(Term):
    def value(self, out, batch):
        return F.mse_loss(out, batch.target)


class GlobalKL(Term):
    """KL(float model's softmax || softmax of the unit's output through the rest)."""

    def __init__(self, ctx):
        super().__init__(ctx)
        cfg = ctx.cfg
        self.rest_quantizers = ([q for m in rest_modules(ctx.model, ctx.unit) for q in quantizers_in(m)]
                                if cfg.global_rest == "float" else [])

    def value(self, out, batch):
        ctx = self.ctx
        fp_logits = ctx.float_logits()
        idx = batch.idx
        if ctx.cfg.global_batch is not None:
            out, idx = out[:ctx.cfg.global_batch], idx[:ctx.cfg.global_batch]
        with quantizers_off(self.rest_quantizers):
            logits = run_rest(ctx.model, out, ctx.unit)
        ref = fp_logits[idx.to(fp_logits.device)].to(ctx.device)
        return kl_to_float(logits, ref)


class GlobalFisher(Term):
    """The global term in its second-order form: near the float model, KL(p_fp || p(z + e))
    is about e^T F e / 2, with F the Fisher information of the model's softmax with respect
    to the unit's output z. F's diagonal is estimated per calibration image as the mean of
    the squared gradients of log p(y | z) over ``fisher_samples`` labels y drawn from the
    float model's own softmax, through the float rest of the model, once for the unit; the
    term is the squared error of the unit's output weighted by it (the weights scaled to
    mean 1). Images the float model is sure of weigh little; the tokens and channels the
    prediction reads weigh most (at the last block the class token alone, for a head that
    reads it). With ``fisher_pool="images"`` the weights are averaged over the images."""

    def __init__(self, ctx):
        super().__init__(ctx)
        target, cfg, device = ctx.target, ctx.cfg, ctx.device
        if target is None:
            raise FastquantError(f"unit {ctx.unit.name}: the Fisher form of the global term needs the unit's float output")
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + ctx.level * 1_009 + ctx.index)
        k, bs, parts = cfg.fisher_samples, cfg.capture_batch_size, []
        for i in range(0, len(target), bs):
            z = target[i:i + bs].to(device).detach().requires_grad_(True)
            with torch.enable_grad():
                logp = F.log_softmax(run_rest(ctx.fp, z, ctx.unit).float(), -1)
                probs = logp.detach().exp().cpu()
                acc = torch.zeros_like(z)
                for j in range(k):
                    y = torch.multinomial(probs, 1, generator=gen).to(device)
                    (g,) = torch.autograd.grad(logp.gather(1, y).sum(), z, retain_graph=j < k - 1)
                    acc += g.detach().pow(2)
            parts.append((acc / k).to(target.device))
        w = torch.cat(parts)
        if cfg.resolved("fisher_pool") == "images":  # one weight per token position and channel
            w = w.mean(0, keepdim=True)
        self.weights = w / w.mean().clamp_min(1e-30)

    def value(self, out, batch):
        w = self.weights
        w = (w if len(w) == 1 else w[batch.idx.to(w.device)]).to(out.device)
        return (w * (out - batch.target).pow(2)).mean()


def make_global(ctx) -> Term:
    return GlobalFisher(ctx) if ctx.cfg.resolved("global_form") == "fisher" else GlobalKL(ctx)


class HeadKL(Term):
    """KL(float model's softmax || softmax of the last unit's output through the final norm
    and the head)."""

    @staticmethod
    def applies(ctx) -> bool:
        return ctx.unit.end == 2 * depth_of(ctx.model)

    def value(self, out, batch):
        ctx = self.ctx
        fp_logits = ctx.float_logits()
        logits = run_head(ctx.model, out)
        ref = fp_logits[batch.idx.to(fp_logits.device)].to(ctx.device)
        return kl_to_float(logits, ref)


class LocalAlignment(Term):
    """The output of every QuantLinear in the unit against the float model's same layer,
    taken on the float input of the unit."""

    def __init__(self, ctx):
        super().__init__(ctx)
        self.mode = ctx.cfg.local_loss
        self.q_out: dict[int, torch.Tensor] = {}
        self.fp_out: dict[int, torch.Tensor] = {}
        self.armed = False
        self.hooks = []
        for i, layer in enumerate(ctx.layers):
            name = ctx.names[layer]
            fp_layer = ctx.fp_modules.get(name)
            if fp_layer is None:
                raise FastquantError(f"the float model has no layer {name} to compare with")
            self.hooks.append(layer.register_forward_hook(self._tap(self.q_out, i, armed_only=True)))
            self.hooks.append(fp_layer.register_forward_hook(self._tap(self.fp_out, i, armed_only=False)))

    def _tap(self, store: dict, i: int, armed_only: bool):
        def hook(mod, inp, out):
            if self.armed or not armed_only:
                store[i] = out
        return hook

    def before_forward(self):
        self.q_out.clear()
        self.armed = True

    def value(self, out, batch):
        self.armed = False
        self.fp_out.clear()
        unit = self.ctx.unit
        with torch.no_grad():
            run_span(self.ctx.fp, batch.x_fp, unit.start, unit.end)
        terms = []
        for i, q in self.q_out.items():
            f = self.fp_out[i]
            if self.mode == "mse":
                terms.append(F.mse_loss(q, f) / f.pow(2).mean().clamp_min(1e-12))
            else:
                q2, f2 = q.reshape(-1, q.shape[-1]), f.reshape(-1, f.shape[-1])
                var_f = f2.var(0, unbiased=False)
                d_mean = (q2.mean(0) - f2.mean(0)).pow(2).mean()
                d_std = (q2.std(0, unbiased=False) - var_f.sqrt()).pow(2).mean()
                terms.append((d_mean + d_std) / var_f.mean().clamp_min(1e-12))
        if not terms:
            raise FastquantError(f"unit {unit.name} has no quantized layers for the local loss")
        return torch.stack(terms).mean()

    def close(self):
        for h in self.hooks:
            h.remove()
        self.hooks = []


@dataclass(frozen=True)
class TermSpec:
    name: str
    weight: str  # the setting (ReconConfig field or method option) that weighs it
    make: Any
    applies: Any = None  # (ctx) -> whether the term takes part for this unit (None: always)


TERMS = [TermSpec("rec", "w_rec", Reconstruction), TermSpec("global", "w_global", make_global),
         TermSpec("head", "w_head", HeadKL, HeadKL.applies), TermSpec("local", "w_local", LocalAlignment)]


def register_term(spec: TermSpec) -> TermSpec:
    """Add a loss term (summed after the others); its weight is a setting or method option."""
    if any(t.name == spec.name for t in TERMS):
        raise FastquantError(f"loss term {spec.name!r} is already registered")
    TERMS.append(spec)
    return spec


__all__ = ["StepBatch", "Term", "Reconstruction", "GlobalKL", "GlobalFisher", "make_global", "HeadKL", "LocalAlignment", "TermSpec", "TERMS",
           "register_term", "kl_to_float", "Unit"]
