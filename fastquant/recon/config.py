"""Reconstruction configuration: one frozen dataclass, validated on creation.

The engine's own settings are fields; a method's own options (``fastquant.recon.registry``)
are given the same way and kept in ``options``:

    ReconConfig(method="pfcr", iters=500, carry=0.5)

Fields left at ``None`` (``qdrop_p``, ``w_global``, ``w_local``, ``global_form``, ``lr_act``)
and options not given take the method's defaults; ``resolved(name)`` reads any of them
after defaults are applied.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import FastquantError
from .registry import BASE_DEFAULTS, METHOD_FIELDS, finite, get_method, is_int, method_names, option, options

GLOBAL_RESTS = ("quant", "float")
GLOBAL_FORMS = ("kl", "fisher")
FISHER_POOLS = ("none", "images")
LOCAL_LOSSES = ("moments", "mse")
MATMUL_DTYPES = ("auto", "float32", "bfloat16")
LR_SCHEDULES = ("constant", "cosine")
QDROP_SCHEDULES = ("constant", "linear")
ROUND_STARTS = ("nearest", "gptq")
GRID_MAX_BITS = 4  # widest weight and activation codes that take the bf16 grid product
# AdaRound's usual learning rate and the iteration count it was tuned for (arXiv 2004.10568, BRECQ, QDrop).
LR_ROUND, LR_ROUND_ITERS, LR_ROUND_MAX = 1e-3, 20000, 0.1
LR_ACT, LR_ACT_MAX = 4e-5, 1e-2
# Fields that change how a run executes, not its result (left out of resume fingerprints).
RUNTIME_FIELDS = ("max_device_bytes",)


@dataclass(frozen=True, init=False)
class ReconConfig:
    """How to reconstruct: iterations, optimiser, rounding, QDrop, losses; plus the method's
    options (see its record in ``fastquant.recon.methods``).

    Per unit: ``iters`` Adam steps on batches of ``batch_size`` calibration images
    (drawn without replacement within a batch), rounding variables at ``lr_round``
    (None: ``auto_lr_round(iters)``, 1e-3 at 20,000 steps), activation steps at
    ``lr_act`` (None: ``auto_lr_act(iters)``, 4e-5 at 20,000 steps); with ``lr_bias`` > 0
    the biases of the unit's Linear layers, with ``lr_norm`` > 0 the affine parameters of
    its LayerNorms, are trained too (plain float parameters, kept as they end; 0: left as
    calibrated). ``lr_schedule``: ``constant``, or ``cosine``: the learning rates of the
    activation steps and float parameters fall along a half cosine to 0 at the unit's last
    step (the rounding variables' stays constant). The AdaRound regulariser ``round_weight *
    sum(1 - |2h - 1|^beta)`` is off for the first ``warmup`` fraction of the steps,
    then beta falls linearly from ``beta[0]`` to ``beta[1]``. Each loss term is divided
    by its value at the first step (of each stage), then weighted by ``w_rec``,
    ``w_global``, ``w_local``.

    - ``round_start``: where the learned rounding starts: ``nearest``, between the two grid
      points around each float weight with h = frac(W/s) (AdaRound's start), or ``gptq``:
      around GPTQ's error-compensated weight of each block Linear (``gptq_round`` with
      ``compensated=True``, on the second moment of the layer's float input over the
      calibration images), so that the hard rounding starts as GPTQ's instead of
      round-to-nearest; the float weights stay as they are. Measured on dinov2-s14-fmnist
      W4A4 at the cpu budget: a lower error before training, none after (pfcr 81.10
      against 82.00, brecq 79.50 against 79.60; docs/methods.md), so ``nearest`` stays.

    - ``qdrop_p``: probability that an element of a quantized activation (and of the
      unit's input) is replaced by its float value while training; ``qdrop_schedule``:
      ``constant``, or ``linear``: the probability falls linearly from ``qdrop_p`` at the
      first step to 0 at the last, so that the unit ends trained on fully quantized inputs
      (None: the method's default, ``linear`` for ``mgrq``, else ``constant``).
    - ``w_global``, ``global_rest``, ``global_batch``: the global loss term (MGRQ's) runs
      the unit's output through the rest of the model ``quant``ized (later blocks in their
      current hard state) or in ``float``; it is the KL divergence from the float model's
      logits to those logits. Running the rest costs up to ``depth`` blocks forward and
      backward per step (a DINOv2 ViT-S block's step took 0.5 s, with the global term 4 s,
      on one CPU thread), so ``global_batch`` may compute it on only the first images of
      each batch (None: all). ``global_form``: ``kl`` (that divergence, computed every
      step), or ``fisher``: its second-order form at the float model, computed once per
      unit: the unit's squared output error weighted element-wise by the diagonal Fisher
      information of the float model's output distribution with respect to the unit's
      output, estimated per calibration image from ``fisher_samples`` labels drawn from the
      float model's own softmax (no labels needed), the gradients taken through the float
      rest of the model (``global_rest`` and ``global_batch`` do not apply). It costs
      ``fisher_samples`` backward passes through the rest per unit instead of one per step.
      ``fisher_pool``: ``none`` keeps a weight per image and element; ``images`` averages
      the weights over the calibration images, one per token position and channel, so that
      the images the float model is unsure of do not take the term to themselves (None:
      the method's default; MGRQ's is ``images``).
    - ``w_local``, ``local_loss``: the local loss term (MGRQ's) per QuantLinear in the
      unit: ``moments`` aligns the per-channel mean and standard deviation of the layer's
      output with the float layer's on the float input (normalised by the float
      variance), ``mse`` compares the outputs element-wise.
    - ``w_head``: on the unit that ends at the last block only, the KL divergence from
      the float model's logits to the logits of the unit's output run through the final
      norm and the head as quantized (what the classifier reads: the whole-token MSE
      weighs every token alike, the head pools them). 0: off. Measured on dinov2-s14-fmnist
      W4A4 (brecq, cpu budget, first 2,000 test images): 66.80 at 1 against 76.30 off.
    - ``head_iters``: after the last unit, this many Adam steps train the classifier head's
      input step (LSQ, at ``lr_act``, batches of ``batch_size``) to bring the head's logits
      on the quantized model's final tokens to the float model's logits (MSE), over the
      calibration images; the head's weights keep their rounding (GPTQ's, with the default
      ``edge_rounding``) and no unit reconstructs the head otherwise. It counts as one more
      unit of the run (its record is named ``head``; its MSEs are the logits'). 0: off.
      Measured on saved W4A4 models (bench/head_step.py, first 2,000 test images): pfcr
      81.20 -> 82.30, mgrq on the digits 86.85 -> 87.50, brecq 81.15 -> 79.60, so off.
    - ``matmul_dtype``: the dtype of the training steps' linear-layer products, taken on
      the integer grids with the scales applied in fp32 (``fastquant.ops.grid_linear``):
      ``bfloat16`` (exact products for hard-rounded operands, the result rounded to 8
      significant bits), ``float32`` (the plain fake-quant path), or ``auto``: bfloat16
      on a CPU with native bf16 matmuls (AVX-512 BF16 or AMX) and on a CUDA GPU that
      supports it, else float32. It applies to layers whose weights and inputs both have
      at most ``GRID_MAX_BITS`` (4) bits and a per-tensor input step (wider codes lose
      AdaRound's soft rounding and QDrop's float values to bf16's 8 significant bits);
      the others, the attention matmuls, the captured targets, the hard-rounded passes and
      evaluation run in fp32. Measured on dinov2-s14-fmnist, one block's training step
      (batch 32, 65 tokens, W4A4, QDrop p=0.5) on 2 CPU threads: 0.287 s before this
      path and the cheaper QDrop mask (``keep_mask``, ``LsqGrid``) existed, 0.235 s with
      the mask in fp32, 0.167 s with bf16 grids (without QDrop: 0.210 s and 0.147 s).
      On CUDA tensors with a fused backend, those layers run the fused fake-quant linear
      op instead of a grid product in this dtype (``fastquant.ops.fq_linear``: quantization
      in the GEMM's prologue, fp16 grids, exact for hard-rounded codes, soft-rounded ones
      and QDrop's float values to fp16's 11 significant bits; ``FASTQUANT_FUSED_RECON=0``
      turns it off). Not measured on a GPU yet.
    - ``max_device_bytes``: captured inputs and targets stay on the model's device when
      they take at most this much (None: half the free accelerator memory; on the CPU
      always), else in host memory, moved one batch at a time.
    - ``options``: the method options given, as sorted (name, value) pairs.
    """

    method: str = "qdrop"
    iters: int = 2000
    batch_size: int = 32
    lr_round: Optional[float] = None
    # None: the method's default, else auto_lr_act(iters); at 300 steps auto measured better
    # than 4e-5 for brecq and qdrop (W4A4 dinov2-s14-fmnist: 73.00 -> 76.30, 64.35 -> 66.85);
    # mgrq kept 4e-5 until its terms were weighed 0.1 (docs/methods.md, item 12)
    lr_act: Optional[float] = None
    lr_bias: float = 0.0
    lr_norm: float = 0.0
    lr_schedule: str = "constant"
    qdrop_schedule: Optional[str] = None  # None: the method's default, else "constant"
    round_weight: float = 0.01
    round_start: str = "nearest"
    warmup: float = 0.2
    beta: tuple = (20.0, 2.0)
    qdrop_p: Optional[float] = None
    w_rec: float = 1.0
    w_global: Optional[float] = None
    w_local: Optional[float] = None
    w_head: float = 0.0
    head_iters: int = 0
    global_rest: str = "quant"
    global_batch: Optional[int] = None
    global_form: Optional[str] = None  # None: the method's default, else "kl"
    fisher_samples: int = 2
    fisher_pool: Optional[str] = None  # None: the method's default, else "none"
    local_loss: str = "moments"
    seed: int = 0
    matmul_dtype: str = "auto"
    capture_batch_size: int = 64
    max_device_bytes: Optional[int] = None
    options: tuple = ()

    def __init__(self, method: str = "qdrop", **settings):
        given = dict(settings.pop("options", ()) or ())
        for f in dataclasses.fields(self):
            if f.name in ("method", "options"):
                continue
            object.__setattr__(self, f.name, settings.pop(f.name, f.default))
        given.update(settings)  # what is left: method options
        object.__setattr__(self, "method", method)
        object.__setattr__(self, "options", tuple(sorted(given.items())))
        self._check()

    # -- validation --------------------------------------------------------------------------
    def _check(self):
        if self.method not in method_names():
            raise FastquantError(f"unknown reconstruction method {self.method!r} "
                                 f"(choose from {', '.join(method_names())})")
        for name in ("iters", "batch_size", "capture_batch_size", "global_batch", "fisher_samples"):
            v = getattr(self, name)
            if v is None and name == "global_batch":
                continue
            if not is_int(v) or v < 1:
                raise FastquantError(f"{name} must be a positive integer, got {v!r}")
        if not is_int(self.head_iters) or self.head_iters < 0:
            raise FastquantError(f"head_iters must be a non-negative integer (0: off), got {self.head_iters!r}")
        for name in ("lr_round", "lr_act"):
            v = getattr(self, name)
            if v is None:
                continue
            if not finite(v) or v <= 0:
                raise FastquantError(f"{name} must be a positive number, got {v!r}")
        for name in ("lr_bias", "lr_norm"):
            v = getattr(self, name)
            if not finite(v) or v < 0:
                raise FastquantError(f"{name} must be a non-negative number (0: not trained), got {v!r}")
        if not finite(self.round_weight) or self.round_weight < 0:
            raise FastquantError(f"round_weight must be a non-negative number, got {self.round_weight!r}")
        if not finite(self.warmup) or not 0 <= self.warmup < 1:
            raise FastquantError(f"warmup must be a fraction in [0, 1), got {self.warmup!r}")
        if (not isinstance(self.beta, tuple) or len(self.beta) != 2 or not all(finite(b) and b > 0 for b in self.beta)
                or self.beta[0] < self.beta[1]):
            raise FastquantError(f"beta must be a pair (start, end) with start >= end > 0, got {self.beta!r}")
        if self.qdrop_p is not None and (not finite(self.qdrop_p) or not 0 <= self.qdrop_p <= 1):
            raise FastquantError(f"qdrop_p must be a probability in [0, 1], got {self.qdrop_p!r}")
        for name, value in self.options:
            try:
                spec = option(name)
            except KeyError:
                settable = [f.name for f in dataclasses.fields(self) if f.name not in ("method", "options")]
                raise FastquantError(f"unknown reconstruction setting {name!r} (settings: {', '.join(settable)}; "
                                     f"method options: {', '.join(sorted(options()))})") from None
            message = spec.check(value)
            if message:
                raise FastquantError(message)
        weights = {}
        for name in ("w_rec", "w_global", "w_local", "w_head"):
            v = self.resolved(name)
            if not finite(v) or v < 0:
                raise FastquantError(f"loss weight {name} must be a non-negative number, got {v!r}")
            weights[name] = v
        # w_head alone would leave every unit but the last with nothing to optimise
        if not any(weights[name] for name in ("w_rec", "w_global", "w_local")):
            raise FastquantError("the loss weights w_rec, w_global and w_local are all zero: nothing to optimise")
        if self.global_rest not in GLOBAL_RESTS:
            raise FastquantError(f"global_rest must be one of {', '.join(GLOBAL_RESTS)}, got {self.global_rest!r}")
        if self.resolved("global_form") not in GLOBAL_FORMS:
            raise FastquantError(f"global_form must be one of {', '.join(GLOBAL_FORMS)}, got {self.global_form!r}")
        if self.resolved("fisher_pool") not in FISHER_POOLS:
            raise FastquantError(f"fisher_pool must be one of {', '.join(FISHER_POOLS)}, got {self.fisher_pool!r}")
        if self.local_loss not in LOCAL_LOSSES:
            raise FastquantError(f"local_loss must be one of {', '.join(LOCAL_LOSSES)}, got {self.local_loss!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise FastquantError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if self.resolved("qdrop_schedule") not in QDROP_SCHEDULES:
            raise FastquantError(f"qdrop_schedule must be one of {', '.join(QDROP_SCHEDULES)}, "
                                 f"got {self.qdrop_schedule!r}")
        if self.round_start not in ROUND_STARTS:
            raise FastquantError(f"round_start must be one of {', '.join(ROUND_STARTS)}, got {self.round_start!r}")
        if self.matmul_dtype not in MATMUL_DTYPES:
            raise FastquantError(f"matmul_dtype must be one of {', '.join(MATMUL_DTYPES)}, got {self.matmul_dtype!r}")
        if not is_int(self.seed):
            raise FastquantError(f"seed must be an integer, got {self.seed!r}")
        mdb = self.max_device_bytes
        if mdb is not None and (not is_int(mdb) or mdb < 0):
            raise FastquantError(f"max_device_bytes must be a non-negative integer or None, got {mdb!r}")

    def check_options_apply(self):
        """Refuse options the method does not have (set for another method, or left over
        from one): an option that would change nothing is a mistake to report."""
        own = get_method(self.method).options
        foreign = [name for name, _ in self.options if name not in own]
        if foreign:
            have = f"its options are {', '.join(own)}" if own else "it has no options"
            raise FastquantError(f"{', '.join(foreign)}: not an option of method {self.method} ({have})")
        return self

    # -- reading -------------------------------------------------------------------------------
    def resolved(self, key: str):
        """The value of a field or option after the method's defaults are applied."""
        given = dict(self.options)
        if key in given:
            return given[key]
        method = get_method(self.method)
        if key in method.options:
            return method.options[key]
        if key == "lr_round" and self.lr_round is None:
            return auto_lr_round(self.iters)
        if key == "lr_act" and self.lr_act is None:
            rate = method.defaults.get("lr_act")
            return auto_lr_act(self.iters) if rate is None else rate
        if key in METHOD_FIELDS and getattr(self, key) is None:
            return method.defaults.get(key, BASE_DEFAULTS[key])
        if key in options():
            return option(key).default
        return getattr(self, key)

    def with_iters(self, iters: int) -> "ReconConfig":
        """The same settings with ``iters`` steps per unit, the learning rates kept as this
        config resolves them (a level of its own length in a run, e.g. PFCR's ``level_steps``)."""
        settings = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "method"}
        settings.update(iters=iters, lr_round=self.resolved("lr_round"), lr_act=self.resolved("lr_act"))
        return ReconConfig(self.method, **settings)

    def to_dict(self, runtime: bool = True) -> dict:
        """All settings and the method's options, with the method's defaults filled in
        (``runtime=False``: without the fields that do not change the result)."""
        d = {f.name: self.resolved(f.name) for f in dataclasses.fields(self) if f.name != "options"}
        d["beta"] = list(d["beta"])
        for name in get_method(self.method).options:
            d[name] = self.resolved(name)
        for name, value in self.options:  # given for another method (see check_options_apply)
            d.setdefault(name, value)
        if not runtime:
            for name in RUNTIME_FIELDS:
                d.pop(name)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def grid_dtype(matmul_dtype: str, device: torch.device) -> Optional[torch.dtype]:
    """The dtype of the grid products for ``ReconConfig.matmul_dtype`` on ``device``
    (None: the plain fp32 fake-quant path)."""
    if matmul_dtype == "float32":
        return None
    if matmul_dtype == "bfloat16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu":
        return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None
    return None


def auto_lr_act(iters: int) -> float:
    """Adam's learning rate for the activation steps when ``lr_act`` is None: the usual 4e-5
    at 20,000 steps, scaled as ``auto_lr_round`` scales the rounding's, ``4e-5 * 20000 /
    iters`` (at least 4e-5, at most 1e-2), so that a short run can move a step as far.
    Measured on dinov2-s14-fmnist W4A4 (brecq, cpu budget, 300 steps per unit, first 2,000
    test images): 73.00 at 4e-5, 76.30 at 2.7e-3."""
    return min(LR_ACT_MAX, LR_ACT * max(1.0, LR_ROUND_ITERS / iters))


def auto_lr_round(iters: int) -> float:
    """Adam's learning rate for the rounding variables V when none is given:
    ``1e-3 * 20000 / iters`` within [1e-3, 0.1], so that shorter runs can still move V
    about as far as the usual 20,000 steps at 1e-3 do (Adam's steps are about ``lr``
    each; V beyond +-2.4 saturates the rounding, so larger steps gain nothing). Measured on
    vit-tiny-fmnist W3A3, block 2, 128 images, output MSE 0.123 before: after 300 steps
    at 1e-3 0.095, 1e-2 0.062, 3e-2 0.056, 1e-1 0.055; after 1,000 steps at 1e-3 0.070,
    at 1e-2 0.055."""
    return min(LR_ROUND_MAX, LR_ROUND * max(1.0, LR_ROUND_ITERS / iters))
