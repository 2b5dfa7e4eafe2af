"""Reconstruction configuration: one frozen dataclass; methods are sets of defaults.

Fields left at ``None`` take the method's default (``METHOD_DEFAULTS``), so
``ReconConfig(method="pfcr", pos=False)`` is PFCR without its progressive
optimisation strategy, and ``ReconConfig(method="mgrq", w_global=0.5)`` reweights
MGRQ's global term.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

import torch

from ..errors import FastquantError

RECON_METHODS = ("brecq", "qdrop", "pfcr", "mgrq")
SCHEDULES = ("block", "pfcr")
GLOBAL_RESTS = ("quant", "float")
LOCAL_LOSSES = ("moments", "mse")
POS_MODES = ("weights_first", "acts_first")
MATMUL_DTYPES = ("auto", "float32", "bfloat16")
GRID_MAX_BITS = 4  # widest weight and activation codes that take the bf16 grid product

# What each method changes from the shared defaults.
METHOD_DEFAULTS = {
    "brecq": dict(schedule="block", qdrop_p=0.0, pos=False, w_global=0.0, w_local=0.0),
    "qdrop": dict(schedule="block", qdrop_p=0.5, pos=False, w_global=0.0, w_local=0.0),
    "pfcr": dict(schedule="pfcr", qdrop_p=0.5, pos=True, w_global=0.0, w_local=0.0),
    "mgrq": dict(schedule="block", qdrop_p=0.5, pos=False, w_global=1.0, w_local=1.0),
}
RESOLVED_FIELDS = set(METHOD_DEFAULTS["qdrop"]) | {"lr_round"}
# AdaRound's usual learning rate and the iteration count it was tuned for (arXiv 2004.10568, BRECQ, QDrop).
LR_ROUND, LR_ROUND_ITERS, LR_ROUND_MAX = 1e-3, 20000, 0.1
# Fields that change how a run executes, not its result (left out of resume fingerprints).
RUNTIME_FIELDS = ("max_device_bytes",)


@dataclass(frozen=True)
class ReconConfig:
    """How to reconstruct: iterations, optimiser, rounding, QDrop, losses, schedule.

    Per unit: ``iters`` Adam steps on batches of ``batch_size`` calibration images
    (drawn without replacement within a batch), rounding variables at ``lr_round``
    (None: ``auto_lr_round(iters)``, 1e-3 at 20,000 steps), activation steps at
    ``lr_act``. The AdaRound regulariser ``round_weight *
    sum(1 - |2h - 1|^beta)`` is off for the first ``warmup`` fraction of the steps,
    then beta falls linearly from ``beta[0]`` to ``beta[1]``. Each loss term is divided
    by its value at the first step (of each POS stage), then weighted by ``w_rec``,
    ``w_global``, ``w_local``.

    - ``qdrop_p``: probability that an element of a quantized activation (and of the
      unit's input) is replaced by its float value while training.
    - ``pos``: PFCR's progressive optimisation strategy: each unit's steps in two
      stages, the first ``pos_split`` of them with one operand kind in float, then the
      rest with everything quantized. ``pos_mode="weights_first"``: the first stage
      trains the rounding with the unit's activations in float (its input still comes
      from the quantized prefix), the regulariser's warm-up and annealing spanning both
      stages. ``"acts_first"``: the first stage trains the activation steps (with QDrop)
      with the unit's weights in float; the rounding is trained in the second stage only,
      with the warm-up and annealing fitted to it. Measured on vit-tiny-fmnist W3A3
      (128 images, 100 steps per unit, PFCR up to blocks, two seeds), the KL divergence
      of the outputs from the float model's was 0.043 with weights_first, 0.041 with
      acts_first and 0.037 without POS (QDrop: 0.038): POS did not help there. On
      dinov2-s14-fmnist at W4A4 with the cpu budget, PFCR reached 55.25 top-1 with POS
      (weights_first) and 61.25 without it (QDrop 64.35).
    - ``carry``: for a unit of a later PFCR level, how much of the previous level's
      rounding is kept: h <- carry * h + (1 - carry) * frac(W/s) (0.5 keeps each decided
      rounding and lets the loss still change it; 1 keeps V; 0 restarts from float).
    - ``merge``, ``stop_at``: PFCR's schedule (see ``pfcr_levels``).
    - ``global_rest``: MGRQ's global term runs the unit's output through the rest of
      the model ``quant``ized (later blocks in their current hard state) or in ``float``;
      it is the KL divergence from the float model's logits to those logits. Running
      the rest costs up to ``depth`` blocks forward and backward per step (a DINOv2
      ViT-S block's step took 0.5 s, with the global term 4 s, on one CPU thread), so
      ``global_batch`` may compute it on only the first images of each batch (None: all).
    - ``local_loss``: MGRQ's local term per QuantLinear in the unit: ``moments`` aligns
      the per-channel mean and standard deviation of the layer's output with the float
      layer's on the float input (normalised by the float variance), ``mse`` compares
      the outputs element-wise.
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
      On CUDA tensors with Triton available, those layers run the fused fake-quant linear
      op instead of a grid product in this dtype (``fastquant.ops.fq_linear``: quantization
      in the GEMM's prologue, fp16 grids, exact for hard-rounded codes, soft-rounded ones
      and QDrop's float values to fp16's 11 significant bits; ``FASTQUANT_FUSED_RECON=0``
      turns it off). Not measured on a GPU yet.
    - ``max_device_bytes``: captured inputs and targets stay on the model's device when
      they take at most this much (None: half the free accelerator memory; on the CPU
      always), else in host memory, moved one batch at a time.
    """

    method: str = "qdrop"
    iters: int = 2000
    batch_size: int = 32
    lr_round: float | None = None
    lr_act: float = 4e-5
    round_weight: float = 0.01
    warmup: float = 0.2
    beta: tuple[float, float] = (20.0, 2.0)
    qdrop_p: float | None = None
    pos: bool | None = None
    pos_split: float = 0.5
    pos_mode: str = "weights_first"
    carry: float = 0.5
    schedule: str | None = None
    merge: int = 2
    stop_at: int | None = None
    w_rec: float = 1.0
    w_global: float | None = None
    w_local: float | None = None
    global_rest: str = "quant"
    global_batch: int | None = None
    local_loss: str = "moments"
    seed: int = 0
    matmul_dtype: str = "auto"
    capture_batch_size: int = 64
    max_device_bytes: int | None = None

    def __post_init__(self):
        if self.method not in RECON_METHODS:
            raise FastquantError(f"unknown reconstruction method {self.method!r} "
                                 f"(choose from {', '.join(RECON_METHODS)})")
        for name in ("iters", "batch_size", "capture_batch_size", "global_batch"):
            v = getattr(self, name)
            if v is None and name == "global_batch":
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise FastquantError(f"{name} must be a positive integer, got {v!r}")
        for name in ("lr_round", "lr_act"):
            v = getattr(self, name)
            if v is None and name == "lr_round":
                continue
            if not _finite(v) or v <= 0:
                raise FastquantError(f"{name} must be a positive number, got {v!r}")
        if not _finite(self.round_weight) or self.round_weight < 0:
            raise FastquantError(f"round_weight must be a non-negative number, got {self.round_weight!r}")
        if not _finite(self.warmup) or not 0 <= self.warmup < 1:
            raise FastquantError(f"warmup must be a fraction in [0, 1), got {self.warmup!r}")
        if (not isinstance(self.beta, tuple) or len(self.beta) != 2 or not all(_finite(b) and b > 0 for b in self.beta)
                or self.beta[0] < self.beta[1]):
            raise FastquantError(f"beta must be a pair (start, end) with start >= end > 0, got {self.beta!r}")
        if self.qdrop_p is not None and (not _finite(self.qdrop_p) or not 0 <= self.qdrop_p <= 1):
            raise FastquantError(f"qdrop_p must be a probability in [0, 1], got {self.qdrop_p!r}")
        if self.pos is not None and not isinstance(self.pos, bool):
            raise FastquantError(f"pos must be True, False or None, got {self.pos!r}")
        if not _finite(self.pos_split) or not 0 < self.pos_split < 1:
            raise FastquantError(f"pos_split must be a fraction in (0, 1), got {self.pos_split!r}")
        if self.pos_mode not in POS_MODES:
            raise FastquantError(f"pos_mode must be one of {', '.join(POS_MODES)}, got {self.pos_mode!r}")
        if not _finite(self.carry) or not 0 <= self.carry <= 1:
            raise FastquantError(f"carry must be in [0, 1], got {self.carry!r}")
        if self.schedule is not None and self.schedule not in SCHEDULES:
            raise FastquantError(f"unknown schedule {self.schedule!r} (choose from {', '.join(SCHEDULES)})")
        if isinstance(self.merge, bool) or not isinstance(self.merge, int) or self.merge < 2:
            raise FastquantError(f"merge must be an integer of at least 2, got {self.merge!r}")
        if self.stop_at is not None and (isinstance(self.stop_at, bool) or not isinstance(self.stop_at, int)
                                         or self.stop_at < 0):
            raise FastquantError(f"stop_at must be a non-negative integer or None, got {self.stop_at!r}")
        weights = {}
        for name in ("w_rec", "w_global", "w_local"):
            v = self.resolved(name)
            if not _finite(v) or v < 0:
                raise FastquantError(f"loss weight {name} must be a non-negative number, got {v!r}")
            weights[name] = v
        if not any(weights.values()):
            raise FastquantError("the loss weights w_rec, w_global and w_local are all zero: nothing to optimise")
        if self.global_rest not in GLOBAL_RESTS:
            raise FastquantError(f"global_rest must be one of {', '.join(GLOBAL_RESTS)}, got {self.global_rest!r}")
        if self.local_loss not in LOCAL_LOSSES:
            raise FastquantError(f"local_loss must be one of {', '.join(LOCAL_LOSSES)}, got {self.local_loss!r}")
        if self.matmul_dtype not in MATMUL_DTYPES:
            raise FastquantError(f"matmul_dtype must be one of {', '.join(MATMUL_DTYPES)}, got {self.matmul_dtype!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise FastquantError(f"seed must be an integer, got {self.seed!r}")
        mdb = self.max_device_bytes
        if mdb is not None and (isinstance(mdb, bool) or not isinstance(mdb, int) or mdb < 0):
            raise FastquantError(f"max_device_bytes must be a non-negative integer or None, got {mdb!r}")

    def resolved(self, key: str):
        """The value of a field after the method's defaults are applied."""
        value = getattr(self, key)
        if key == "lr_round" and value is None:
            return auto_lr_round(self.iters)
        return METHOD_DEFAULTS[self.method][key] if value is None else value

    def to_dict(self, runtime: bool = True) -> dict:
        """All fields, with the method's defaults filled in (``runtime=False``: without
        the fields that do not change the result)."""
        d = {f.name: self.resolved(f.name) if f.name in RESOLVED_FIELDS else getattr(self, f.name)
             for f in dataclasses.fields(self)}
        d["beta"] = list(d["beta"])
        if not runtime:
            for name in RUNTIME_FIELDS:
                d.pop(name)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def grid_dtype(matmul_dtype: str, device: torch.device) -> torch.dtype | None:
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


def auto_lr_round(iters: int) -> float:
    """Adam's learning rate for the rounding variables V when none is given:
    ``1e-3 * 20000 / iters`` within [1e-3, 0.1], so that shorter runs can still move V
    about as far as the usual 20,000 steps at 1e-3 do (Adam's steps are about ``lr``
    each; V beyond +-2.4 saturates the rounding, so larger steps gain nothing). Measured on
    vit-tiny-fmnist W3A3, block 2, 128 images, output MSE 0.123 before: after 300 steps
    at 1e-3 0.095, 1e-2 0.062, 3e-2 0.056, 1e-1 0.055; after 1,000 steps at 1e-3 0.070,
    at 1e-2 0.055."""
    return min(LR_ROUND_MAX, LR_ROUND * max(1.0, LR_ROUND_ITERS / iters))


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
