"""Quantization configuration: one frozen dataclass, validated on creation.

``method`` names a calibration preset (``rtn``, ``repq``: ``fastquant.calib.PRESETS``) or a
registered reconstruction method (``brecq``, ``qdrop``, ``pfcr``, ``mgrq``, or one added with
``fastquant.recon.register_method``), which starts from the calibration its record names.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

from .calib import CALIB_FIELDS, PRESETS, SOFTMAX_QUANTIZERS, WEIGHT_ROUNDING, CalibSpec, auto_softmax
from .errors import FastquantError
from .quant import CALIB_METHODS, check_bits
from .recon import get_method
from .recon import method_names as recon_methods

CALIB_PRESETS = tuple(PRESETS)


def methods() -> tuple[str, ...]:
    """Every method ``QuantConfig`` takes: the calibration presets, then the registered
    reconstruction methods."""
    return CALIB_PRESETS + recon_methods()


def method_defaults(method: str) -> dict:
    """What ``method`` changes from the plain defaults, for each method-dependent field."""
    if method in PRESETS:
        return dict(PRESETS[method])
    start = dict(get_method(method).calibration)
    preset = start.pop("preset", "repq")
    return dict(PRESETS[preset], **start)


def reconstructs(method: str) -> bool:
    return method in recon_methods()


@dataclass(frozen=True)
class QuantConfig:
    """What to quantize and how.

    Weights are quantized per output channel, activations per tensor (or per token),
    Q and K per head, softmax probabilities with a logarithmic quantizer. The
    patch-embedding input stays at 8 bits; the classifier head is quantized at the
    target bits unless ``head_w_bits``/``head_a_bits`` say otherwise. LayerNorm,
    softmax and GELU are computed in float.
    """

    w_bits: int = 8
    a_bits: int = 8
    method: str = "repq"
    calib: str | None = None  # minmax | percentile | mse; None: the method's default
    softmax: str | None = None  # log2 | log_sqrt2 | uniform | auto; None: the method's default
    reparam: bool | None = None  # fold per-channel post-LayerNorm scales into the LayerNorm
    # MSE search for activations weighted by how much each element's error reaches the
    # consumer's output (column norms of the next Linear's weight, the partner operand of a matmul).
    output_aware: bool | None = None
    # Subtract each Linear's mean output shift caused by quantization (measured on the
    # calibration images with float inputs) from its bias.
    bias_correct: bool | None = None
    # "nearest", or "gptq": round weight columns one by one, compensating each
    # rounding error in the columns still to come (Frantar et al., arXiv 2210.17323).
    weight_rounding: str | None = None
    # Move the per-channel input ranges of every MLP's second Linear (fc2, after GELU) into
    # its weight columns: the input is divided per channel by d_c = a_c^alpha / w_c^(1 - alpha)
    # (a_c, w_c: the channel's input and weight-column absolute maxima) and the weight column
    # multiplied by it (SmoothQuant's migration, Xiao et al., arXiv 2211.10438); 0: off.
    fc2_smooth: float | None = None
    # The MSE search of activation steps also tries, at each step, the zero points that keep
    # the observed minimum in range (fastquant.quant.uniform.MSE_RATIOS explains why).
    zero_point_search: bool | None = None
    # The rounding of the weights outside the transformer blocks, which no reconstruction
    # unit learns: the convolutions (a ViT's patch embedding) and the classifier head.
    # "nearest" or "gptq" (with a convolution's input patches as GPTQ's inputs).
    edge_rounding: str | None = None
    per_token: bool = False  # dynamic per-token activation scales instead of calibrated per-tensor
    qk_per_head: bool = True
    patch_embed_a_bits: int = 8
    patch_embed_w_bits: int | None = None  # None: w_bits
    head_w_bits: int | None = None  # None: w_bits
    head_a_bits: int | None = None  # None: a_bits
    calib_batch_size: int = 32
    percentile: float = 99.99

    def __post_init__(self):
        if not isinstance(self.method, str) or self.method not in methods():
            raise FastquantError(f"unknown method {self.method!r} (choose from {', '.join(methods())})")
        for name in ("per_token", "qk_per_head"):
            if not isinstance(getattr(self, name), bool):
                raise FastquantError(f"{name} must be True or False, got {getattr(self, name)!r}")
        for name in ("reparam", "output_aware", "bias_correct", "zero_point_search"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), bool):
                raise FastquantError(f"{name} must be True, False or None (the method's default), "
                                     f"got {getattr(self, name)!r}")
        for name in ("calib", "softmax", "weight_rounding", "edge_rounding"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise FastquantError(f"{name} must be a name or None (the method's default), got {getattr(self, name)!r}")
        sm = self.fc2_smooth
        if sm is not None and (isinstance(sm, bool) or not isinstance(sm, (int, float)) or not math.isfinite(sm)
                               or not 0 <= sm <= 1):
            raise FastquantError(f"fc2_smooth must be a number in [0, 1] or None (the method's default), got {sm!r}")
        check_bits(self.w_bits, "w_bits")
        check_bits(self.a_bits, "a_bits")
        check_bits(self.patch_embed_a_bits, "patch_embed_a_bits")
        for name in ("patch_embed_w_bits", "head_w_bits", "head_a_bits"):
            if getattr(self, name) is not None:
                check_bits(getattr(self, name), name)
        if self.calib is not None and self.calib not in CALIB_METHODS:
            raise FastquantError(f"unknown calibration {self.calib!r} (choose from {', '.join(CALIB_METHODS)})")
        if self.softmax is not None and self.softmax not in SOFTMAX_QUANTIZERS:
            raise FastquantError(f"unknown softmax quantizer {self.softmax!r} (choose from {', '.join(SOFTMAX_QUANTIZERS)})")
        if self.weight_rounding is not None and self.weight_rounding not in WEIGHT_ROUNDING:
            raise FastquantError(f"unknown weight rounding {self.weight_rounding!r} (choose from {', '.join(WEIGHT_ROUNDING)})")
        if self.edge_rounding is not None and self.edge_rounding not in WEIGHT_ROUNDING:
            raise FastquantError(f"unknown edge rounding {self.edge_rounding!r} (choose from {', '.join(WEIGHT_ROUNDING)})")
        if (isinstance(self.calib_batch_size, bool) or not isinstance(self.calib_batch_size, int)
                or self.calib_batch_size < 1):
            raise FastquantError(f"calib_batch_size must be a positive integer, got {self.calib_batch_size!r}")
        p = self.percentile
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p) or not 50.0 < p <= 100.0:
            raise FastquantError(f"percentile must be a number in (50, 100], got {p!r}")

    def resolved(self, key: str):
        """The value of a method-dependent field (calib, softmax, reparam, output_aware,
        bias_correct, weight_rounding, fc2_smooth, zero_point_search, edge_rounding) after the method's
        defaults are applied."""
        value = getattr(self, key)
        if value is None:
            value = method_defaults(self.method)[key]
        if key == "softmax" and value == "auto":
            value = auto_softmax(self.a_bits)
        return value

    @property
    def reconstructs(self) -> bool:
        """Whether ``method`` is a reconstruction method (it then runs ``fastquant.recon``)."""
        return reconstructs(self.method)

    def calib_spec(self) -> CalibSpec:
        """The calibration's view of this config: every field decided."""
        return CalibSpec(w_bits=self.w_bits, a_bits=self.a_bits, **{k: self.resolved(k) for k in CALIB_FIELDS},
                         per_token=self.per_token, qk_per_head=self.qk_per_head,
                         patch_embed_a_bits=self.patch_embed_a_bits, patch_embed_w_bits=self.patch_embed_w_bits,
                         head_w_bits=self.head_w_bits, head_a_bits=self.head_a_bits, percentile=self.percentile)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "QuantConfig":
        try:
            data = json.loads(text)
        except (TypeError, ValueError):
            raise FastquantError("a QuantConfig must be a JSON object") from None
        if not isinstance(data, dict):
            raise FastquantError("a QuantConfig must be a JSON object")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise FastquantError(f"unknown QuantConfig fields {sorted(unknown)}")
        return cls(**data)
