"""``export_onnx``: a fake-quantized model as a standard QDQ ONNX graph.

Every uniform quantizer with calibrated steps becomes the standard form that ONNX Runtime
and OpenVINO turn into integer kernels (TensorRT also needs symmetric activations, which
fastquant's are not; untested there):

- a weight: its integer codes as an int8 initializer and one ``DequantizeLinear`` with the
  per-channel steps (``axis=0``). ``weights="asymmetric"`` (default, exact): fastquant's
  codes 0 .. 2^b - 1 moved down by 2^(b-1), the zero points with them, so the values are
  unchanged; ONNX Runtime runs these fastest. On x86 CPUs without VNNI (AVX2 or AVX-512
  alone) ONNX Runtime's uint8 x int8 kernels add pairs of products in 16 bits, which
  saturate with 8-bit weights (2 x 255 x 128 > 32767; below 8 bits they cannot), so there an
  8-bit model's integer path differs from the graph; ``cpu_saturates()`` tells.
  ``weights="unsigned"`` (exact on every CPU): fastquant's own codes and zero points as
  uint8, run by ONNX Runtime's uint8 x uint8 kernels, which add in 32 bits.
  ``weights="symmetric"``: zero point 0, the form
  OpenVINO runs about 3x faster and TensorRT requires (``ExportLinear``): exact below 8 bits,
  at 8 bits a zero-point correction from the input's row sum taken before quantization (the
  nearest form; ``ExportLinear`` says why). The patch embedding's convolution stays
  asymmetric;
- an activation: ``QuantizeLinear`` -> ``DequantizeLinear`` on uint8 with fastquant's step and
  zero point, per tensor or per head (``axis=1``); below 8 bits a ``Clip`` of the uint8
  codes to 0 .. 2^b - 1 sits between them (exact, but runtimes then keep that operand in
  float).

The reparameterised LayerNorms (RepQ-ViT's scale folding) and smoothing divisors are plain
float parameters of the quantized model, so they are exported as they are: a LayerNorm
with the folded affine, a ``Div`` by fc2's ``input_div``.

Quantizers that have no standard QDQ form:

- the log2 / log-sqrt2 softmax quantizer: ``softmax="uint8"`` (default) writes it as uint8
  QDQ with step 1/255 and zero point 0 on [0, 1], the form runtimes quantize P V with;
  ``softmax="exact"`` writes fastquant's rounding as a threshold table in float operations
  (``ExportLog``: the same codes away from float rounding of its switch points, no integer
  kernel);
- per-head steps of the attention operands Q and K (a per-axis activation zero point, which
  ONNX allows but ONNX Runtime's integer MatMul refuses): ``per_head="tensor"`` (default)
  writes one uint8 QDQ whose range covers every head's, ``per_head="exact"`` writes the
  per-head rounding as float operations;
- dynamic per-token steps (``per_token=True``): written as float operations (ReduceMin,
  ReduceMax, Round, Clip), exact but not on integer kernels.

``ExportReport`` lists which quantizers took which form. The graph uses the legacy
TorchScript exporter of ``torch.onnx`` (the one with custom symbolics), opset 17 by
default, a dynamic batch dimension, input ``images`` and output ``logits``.
"""
from __future__ import annotations

import contextlib
import copy
import os
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from .._compat import cpu_info
from ..errors import FastquantError
from ..files import atomic_write, check_writable
from ..nn import QuantConv2d, QuantLinear, QuantMatMul
from ..quant.base import Quantizer
from ..quant.functional import range_to_qparams
from ..quant.learnable import Learnable
from ..quant.log import LogQuantizer
from ..quant.uniform import UniformQuantizer
from ..record import record_of

SOFTMAX_FORMS = ("uint8", "exact")
PER_HEAD_FORMS = ("tensor", "exact")
WEIGHT_FORMS = ("asymmetric", "symmetric", "unsigned")
MIN_OPSET = 13  # per-axis QuantizeLinear / DequantizeLinear


@dataclass(frozen=True)
class ExportReport:
    """What ``export_onnx`` wrote: the quantizers as standard QDQ (``qdq``, weights as integer
    initializers in ``weights``), those written as float operations (``emulated``, with the
    reason) and those replaced by the nearest standard form (``approximated``, with it)."""

    path: str
    opset: int
    weights: list = field(default_factory=list)
    qdq: list = field(default_factory=list)
    emulated: dict = field(default_factory=dict)
    approximated: dict = field(default_factory=dict)


def _const(g, t: torch.Tensor):
    return g.op("Constant", value_t=t)


class _WeightDQ(torch.autograd.Function):
    """Forward: the dequantized weight. ONNX: int8 codes -> DequantizeLinear (per channel)."""

    @staticmethod
    def forward(ctx, weight, codes, scale, zero_point):
        shape = (-1,) + (1,) * (codes.dim() - 1)
        return ((codes.float() - zero_point.float().reshape(shape)) * scale.reshape(shape)).to(weight.dtype)

    @staticmethod
    def symbolic(g, weight, codes, scale, zero_point):
        return g.op("DequantizeLinear", codes, scale, zero_point, axis_i=0)


class _ActQDQ(torch.autograd.Function):
    """Forward: fastquant's fake quantization. ONNX: QuantizeLinear [-> Clip] -> DequantizeLinear."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmax: int, axis):
        shape = [1] * x.dim()
        if axis is not None:
            shape[axis] = -1
        s, z = scale.reshape(shape), zero_point.float().reshape(shape)
        return ((torch.clamp(torch.round(x / s) + z, 0, qmax) - z) * s).to(x.dtype)

    @staticmethod
    def symbolic(g, x, scale, zero_point, qmax: int, axis):
        kw = {} if axis is None else {"axis_i": axis}
        q = g.op("QuantizeLinear", x, scale, zero_point, **kw)
        if qmax < 255:
            q = g.op("Clip", q, _const(g, torch.tensor(0, dtype=torch.uint8)),
                     _const(g, torch.tensor(qmax, dtype=torch.uint8)))
        return g.op("DequantizeLinear", q, scale, zero_point, **kw)


class ExportWeight(nn.Module):
    """A weight quantizer as integer codes and per-channel steps (replaces ``weight_quant``):
    int8 codes moved down by 2^(b-1) with their zero points, or (``unsigned``) fastquant's own
    codes and zero points as uint8."""

    def __init__(self, quantizer: UniformQuantizer, weight: torch.Tensor, unsigned: bool = False):
        super().__init__()
        offset = 0 if unsigned else 1 << (quantizer.bits - 1)
        dtype = torch.uint8 if unsigned else torch.int8
        codes = quantizer.quantize(weight.detach()).to(torch.int16) - offset
        self.register_buffer("codes", codes.to(dtype))
        self.register_buffer("scale", quantizer.scale.detach().reshape(-1).float().clone())
        self.register_buffer("zero_point", (quantizer.zero_point.detach().reshape(-1) - offset).to(dtype))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return _WeightDQ.apply(w, self.codes, self.scale, self.zero_point)


class ExportLinear(nn.Module):
    """A QuantLinear with symmetric int8 weight codes (zero point 0), the form OpenVINO's
    integer GEMM runs fastest (asymmetric weights about 3x slower) and TensorRT requires.
    fastquant's weights are asymmetric, w = s (c - z) with codes c in 0 .. 2^b - 1: below 8
    bits c - z fits int8 and is the code (exact); at 8 bits the code is c - 128 and the layer
    adds s (128 - z) times a row sum of its input: x w^T = s sum_i x_i (c_i - 128) + s (128 - z)
    sum_i x_i. The exact row sum is the quantized input's; it is taken from the input before
    quantization instead (the nearest form: it differs by the sum of the input's rounding
    errors), because OpenVINO 2026.4 moves a ReduceSum's dequantization after it and sums the
    uint8 codes in uint8, which breaks the model."""

    def __init__(self, layer: QuantLinear, input_quant: nn.Module | None):
        super().__init__()
        wq = layer.weight_quant
        codes = wq.quantize(layer.weight.detach()).to(torch.int16)
        z = wq.zero_point.detach().reshape(-1).to(torch.int16)
        shift = z if wq.bits < 8 else torch.full_like(z, 128)
        self.register_buffer("codes", (codes - shift.reshape(-1, 1)).to(torch.int8))
        self.register_buffer("scale", wq.scale.detach().reshape(-1).float().clone())
        self.register_buffer("zero_point", torch.zeros_like(z, dtype=torch.int8))
        corr = wq.scale.detach().reshape(-1).float() * (shift - z).float()
        self.register_buffer("correction", corr if bool((corr != 0).any()) else None)
        self.register_buffer("input_div", None if layer.input_div is None else layer.input_div.detach().clone())
        self.input_quant = input_quant
        self.bias = layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_div is not None:
            x = x / self.input_div
        rows = x.sum(-1, keepdim=True) if self.correction is not None else None
        if self.input_quant is not None:
            x = self.input_quant(x)
        w = _WeightDQ.apply(self.codes.float(), self.codes, self.scale, self.zero_point)
        y = torch.nn.functional.linear(x, w, self.bias)
        return y if rows is None else y + rows * self.correction


class ExportLog(nn.Module):
    """A log2 / log-sqrt2 quantizer as a threshold table (``softmax="exact"``): the code is the
    number of thresholds above the value, the output that code's level. The thresholds are
    where ``LogQuantizer`` switches codes: the midpoint of two adjacent levels, and below the
    smallest level L the switch to zero at L / 2 (log2) or L / sqrt(2) (log-sqrt2, the search
    in the log domain stopping half a level step below L). The same codes except within float
    rounding of a switch point (and, at 8 bits, below 1e-29 of the scale, where LogQuantizer
    clamps the value for its search only). ONNX: Less, Cast, ReduceSum, Gather."""

    def __init__(self, q: LogQuantizer):
        super().__init__()
        levels = q.levels().detach().cpu().double()  # codes 0 .. zero code; the last is 0
        mids = (levels[:-2] + levels[1:-1]) / 2
        last = levels[-2] / (2.0 if q.steps_per_octave == 1 else 2.0 ** 0.5)
        self.register_buffer("thresholds", torch.cat([mids, last.reshape(1)]).float())
        self.register_buffer("levels", levels.float())
        # LogQuantizer searches values below 1e-30 of the scale as 1e-30 of it (at 8 bits only)
        self.register_buffer("floor", (q.scale.detach().cpu().float() * 1e-30).reshape(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        codes = (torch.maximum(x, self.floor).unsqueeze(-1) < self.thresholds).to(torch.int64).sum(-1)
        return self.levels[codes].to(x.dtype)


class ExportAct(nn.Module):
    """A calibrated uniform activation quantizer as uint8 QDQ (per tensor, or per axis 1)."""

    def __init__(self, scale: torch.Tensor, zero_point: torch.Tensor, qmax: int):
        super().__init__()
        per_axis = scale.numel() > 1
        self.axis = 1 if per_axis else None  # per head: axis 1 of (B, H, N, D)
        self.register_buffer("scale", scale.detach().float().reshape(-1 if per_axis else ()).clone())
        self.register_buffer("zero_point", zero_point.detach().reshape(-1 if per_axis else ()).to(torch.uint8))
        self.qmax = int(qmax)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ActQDQ.apply(x, self.scale, self.zero_point, self.qmax, self.axis)


def cpu_saturates() -> bool:
    """True on an x86 CPU without VNNI (AVX512_VNNI or AVX_VNNI): there ONNX Runtime's (and
    OpenVINO's) uint8 x int8 kernels add pairs of products in 16 bits with saturation, so a
    graph with 8-bit int8 weights (``weights="asymmetric"`` or ``"symmetric"``) can run other
    than it reads; ``weights="unsigned"`` cannot. False elsewhere (ARM's dot products and VNNI
    add in 32 bits) and where the CPU's flags cannot be read."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return False
    flags = cpu_info()[1]
    return flags is not None and "avx2" in flags and not {"avx512_vnni", "avx_vnni"} & set(flags)


def _per_head(scale: torch.Tensor) -> bool:
    """Steps of shape (1, H, 1, 1) (per head on a (B, H, N, D) operand) or a scalar."""
    return scale.dim() == 4 and scale.shape[0] == scale.shape[2] == scale.shape[3] == 1


def _qdq_reason(q: Quantizer) -> str | None:
    """Why a uniform activation quantizer cannot be QDQ (None: it can)."""
    if q.per_token:
        return "dynamic per-token steps (written as float operations)"
    if q.scale.numel() > 1 and not _per_head(q.scale):
        return f"steps of shape {tuple(q.scale.shape)} (written as float operations)"
    if q.bits > 8:
        return f"{q.bits}-bit codes (written as float operations)"
    zp = q.zero_point
    if not torch.equal(zp, zp.round()) or zp.min() < 0 or zp.max() > q.qmax:
        return "zero points off the integer grid (written as float operations)"
    return None


def _covering(q: UniformQuantizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor step and zero point whose range covers every head's range of ``q``."""
    s, z = q.scale.detach().float(), q.zero_point.detach().float()
    lo, hi = ((0 - z) * s).min(), ((q.qmax - z) * s).max()
    return range_to_qparams(lo, hi, q.qmax)


def _export_copy(model: nn.Module, softmax: str, per_head: str, weights: str) -> tuple[nn.Module, dict]:
    """A copy of ``model`` whose quantizers are the export modules, and what each became."""
    ex = copy.deepcopy(model).float().cpu().eval()
    done = {"weights": [], "qdq": [], "emulated": {}, "approximated": {}}

    def act(owner: nn.Module, attr: str, name: str):
        q = getattr(owner, attr)
        if q is None:
            return
        if isinstance(q, UniformQuantizer):
            why = _qdq_reason(q)
            if why is None and q.scale.numel() > 1:
                if per_head == "tensor":
                    setattr(owner, attr, ExportAct(*_covering(q), q.qmax))
                    done["approximated"][name] = f"{q.scale.numel()} per-head steps -> one covering step"
                else:
                    done["emulated"][name] = "per-head steps (written as float operations)"
            elif why is None:
                setattr(owner, attr, ExportAct(q.scale, q.zero_point, q.qmax))
                done["qdq"].append(name)
            else:
                done["emulated"][name] = why
        elif isinstance(q, LogQuantizer):
            if softmax == "uint8":
                setattr(owner, attr, ExportAct(torch.tensor(1.0 / 255), torch.tensor(0), 255))
                done["approximated"][name] = f"log{q.base} {q.bits}-bit -> uint8 step 1/255"
            else:
                setattr(owner, attr, ExportLog(q))
                done["emulated"][name] = f"log{q.base} {q.bits}-bit (a threshold table in float operations)"
        else:
            done["emulated"][name] = f"{type(q).__name__} (written as float operations)"

    def replace(name: str, module: nn.Module):
        parent, _, attr = name.rpartition(".")
        setattr(ex.get_submodule(parent) if parent else ex, attr, module)

    for name, mod in list(ex.named_modules()):
        wq = getattr(mod, "weight_quant", None)
        if (weights == "symmetric" and isinstance(mod, QuantLinear) and isinstance(wq, UniformQuantizer)
                and not wq.per_token and wq.bits <= 8):
            act(mod, "input_quant", f"{name}.input_quant")
            lin = ExportLinear(mod, mod.input_quant)
            replace(name, lin)
            done["weights"].append(f"{name}.weight_quant")
            if lin.correction is not None:
                done["approximated"][f"{name}.weight_quant"] = ("8-bit zero points -> symmetric codes and a "
                                                                "correction from the unquantized input's row sum")
        elif isinstance(mod, (QuantLinear, QuantConv2d)):
            wq = mod.weight_quant
            if isinstance(wq, UniformQuantizer) and not wq.per_token and wq.bits <= 8 and wq.scale.numel() > 0:
                mod.weight_quant = ExportWeight(wq, mod.weight, unsigned=weights == "unsigned")
                done["weights"].append(f"{name}.weight_quant")
            else:
                done["emulated"][f"{name}.weight_quant"] = f"{type(wq).__name__} (written as float operations)"
            act(mod, "input_quant", f"{name}.input_quant")
        elif isinstance(mod, QuantMatMul):
            act(mod, "a_quant", f"{name}.a_quant")
            act(mod, "b_quant", f"{name}.b_quant")
    return ex, done


def _example_input(model: nn.Module, image_size, spec) -> torch.Tensor:
    pe = getattr(model, "patch_embed", None)
    proj = getattr(pe, "proj", None)
    chans = getattr(proj, "in_channels", 3)
    if image_size is None:  # the size the model was built for, else its patch embedding's
        size = getattr(spec, "img_size", None) or getattr(pe, "img_size", None)
        if size is None:
            raise FastquantError("export_onnx: the model's input size is unknown; pass image_size=(H, W)")
        image_size = size
    h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    return torch.zeros(1, chans, h, w)


def export_onnx(qmodel: nn.Module, path: str | os.PathLike, *, softmax: str = "uint8", per_head: str = "tensor",
                weights: str = "asymmetric", opset: int = 17,
                image_size: int | tuple[int, int] | None = None) -> ExportReport:
    """Write ``qmodel`` (fake-quantized: from ``fastquant.quantize`` or ``fastquant.load``) to
    ``path`` as a QDQ ONNX model (input ``images`` N x C x H x W, output ``logits``; the batch
    dimension is dynamic). ``softmax``: ``"uint8"`` or ``"exact"``; ``per_head``: ``"tensor"``
    or ``"exact"``; ``weights``: ``"asymmetric"``, ``"symmetric"`` or ``"unsigned"`` (see the
    module docstring).
    Returns an ``ExportReport``. The file is written atomically: on any error nothing is left."""
    if softmax not in SOFTMAX_FORMS:
        raise FastquantError(f"softmax must be one of {', '.join(SOFTMAX_FORMS)}, got {softmax!r}")
    if weights not in WEIGHT_FORMS:
        raise FastquantError(f"weights must be one of {', '.join(WEIGHT_FORMS)}, got {weights!r}")
    if per_head not in PER_HEAD_FORMS:
        raise FastquantError(f"per_head must be one of {', '.join(PER_HEAD_FORMS)}, got {per_head!r}")
    if not isinstance(opset, int) or isinstance(opset, bool) or opset < MIN_OPSET:
        raise FastquantError(f"opset must be an integer >= {MIN_OPSET} (per-axis QDQ), got {opset!r}")
    if not isinstance(qmodel, nn.Module):
        raise FastquantError(f"export_onnx needs a quantized nn.Module, got {type(qmodel).__name__}")
    rec = record_of(qmodel)
    if rec is None or rec.config is None:
        raise FastquantError("export_onnx needs a model from fastquant.quantize or fastquant.load")
    if rec.deploy is not None:
        raise FastquantError("export_onnx takes the fake-quantized model, not a converted one "
                             "(export the model before fastquant.convert)")
    if any(isinstance(m, Learnable) for m in qmodel.modules()):
        raise FastquantError("the model still holds reconstruction wrappers (a reconstruction did not finish)")
    if any(q.mode != "quant" for q in qmodel.modules() if isinstance(q, Quantizer)):
        raise FastquantError("every quantizer must be calibrated (mode 'quant') before export")
    path = check_writable(path, "the ONNX file")
    ex, done = _export_copy(qmodel, softmax, per_head, weights)
    x = _example_input(ex, image_size, rec.spec)

    def write(tmp):
        with warnings.catch_warnings(), open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
            warnings.simplefilter("ignore")
            torch.onnx.export(ex, (x,), str(tmp), dynamo=False, opset_version=opset, input_names=["images"],
                              output_names=["logits"], dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
                              do_constant_folding=True)

    try:
        with torch.no_grad():
            atomic_write(path, write)
    except FastquantError:
        raise
    except Exception as exc:  # the exporter's own errors: one line naming the cause
        raise FastquantError(f"ONNX export failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                             ) from exc
    return ExportReport(path=str(path), opset=opset, **done)
