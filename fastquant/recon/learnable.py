"""Reconstruction's learnable state: the wrappers of ``fastquant.quant.learnable`` installed
in the quantized modules of the units being reconstructed, found per unit, configured for a
training stage, and written back into plain quantizer state at the end."""
from __future__ import annotations

import torch
from torch import nn

from ..nn import QuantConv2d, QuantLinear
from ..quant import ActQuant, AdaRoundWeight, Learnable, Quantizer


class LearnableState:
    """Installs the wrappers in ``modules`` (and their descendants), finds them per unit,
    and writes them back.

    Every QuantLinear's weight quantizer with a calibrated step (``step()``; per-channel
    uniform) gets an :class:`AdaRoundWeight`; every other quantizer that is a direct child of
    a module (activation inputs of QuantLinear, both operands of QuantMatMul) gets an
    :class:`ActQuant`; the patch embedding's convolution keeps its weight quantizer.
    """

    def __init__(self, modules: list[nn.Module]):
        self.weights: dict[QuantLinear, AdaRoundWeight] = {}
        self.acts: list[tuple[nn.Module, str, ActQuant]] = []
        seen = set()
        parents = [m for root in modules for m in root.modules()]  # before any swap
        for parent in parents:
            if id(parent) in seen:
                continue
            seen.add(id(parent))
            self._install(parent)

    def _install(self, parent: nn.Module):
        if isinstance(parent, Learnable):  # already installed
            return
        for name, child in list(parent.named_children()):
            if isinstance(parent, QuantLinear) and child is parent.weight_quant:
                if isinstance(child, Quantizer) and child.kind == "uniform" and child.step() is not None:
                    wrapper = AdaRoundWeight(child, parent.weight)
                    parent.weight_quant = wrapper
                    self.weights[parent] = wrapper
            elif isinstance(parent, QuantConv2d) and child is parent.weight_quant:
                continue
            elif isinstance(child, Quantizer):
                wrapper = ActQuant(child)
                setattr(parent, name, wrapper)
                self.acts.append((parent, name, wrapper))

    def of(self, modules: list[nn.Module]) -> tuple[list[tuple[QuantLinear, AdaRoundWeight]], list[ActQuant]]:
        """The wrappers inside ``modules``: (layer, AdaRound) pairs and activation wrappers."""
        inside = {id(m) for root in modules for m in root.modules()}
        weights = [(layer, w) for layer, w in self.weights.items() if id(w) in inside]
        acts = [a for _, _, a in self.acts if id(a) in inside]
        return weights, acts

    @property
    def num_rounding(self) -> int:
        return sum(w.alpha.numel() for w in self.weights.values())

    def mark_trained(self, modules: list[nn.Module]):
        weights, acts = self.of(modules)
        for _, w in weights:
            w.trained = True
        for a in acts:
            a.trained = True

    @staticmethod
    def start_training(weights, acts, generator: torch.Generator):
        """Soft rounding for the weights; QDrop draws from ``generator``."""
        for _, w in weights:
            w.configure(soft=True)
        for a in acts:
            a.configure(generator=generator)

    @staticmethod
    def enter_stage(weights, acts, float_weights: bool, float_acts: bool, qdrop_p: float):
        """Which operands pass through in float during a stage; QDrop only on quantized ones."""
        for _, w in weights:
            w.configure(float_=float_weights)
        for a in acts:
            a.configure(float_=float_acts, drop_p=0.0 if float_acts else qdrop_p)

    @staticmethod
    def stop_training(weights, acts):
        for _, w in weights:
            w.reset()
        for a in acts:
            a.reset()

    def write_back(self):
        """Hard rounding into the weights, learned steps into the quantizers (for wrappers
        that were trained; the others leave their layer as it was); uninstall."""
        for layer, w in self.weights.items():
            layer.weight_quant = w.write_back(layer.weight)
        for parent, name, a in self.acts:
            setattr(parent, name, a.write_back())
        self.weights, self.acts = {}, []
