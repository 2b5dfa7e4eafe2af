"""``convert``: a deployable copy of a fake-quant model (see the package docstring)."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import FastquantError
from ..nn import FusedQuantAttention, Int8Linear, QuantAttention, QuantLinear, QuantMatMul, adopt, deployed_quantizer
from ..ops.attention import QUANT_ATTENTION
from ..ops.int8_linear import INT8_LINEAR
from ..ops.op import BACKENDS as OP_BACKENDS
from ..record import record_of

BACKENDS = ("auto",) + OP_BACKENDS
# The device type each backend's deployed model must be on (None: any).
BACKEND_DEVICE = {"torch": None, "cpu": "cpu", "triton": "cuda", "cuda": "cuda"}


@dataclass(frozen=True)
class DeployReport:
    """What ``convert`` did: the backend, the linear layers now on integers and the others
    with the reason, the attention modules fused and the others with the reason."""

    backend: str
    converted: list = field(default_factory=list)
    kept: dict = field(default_factory=dict)
    fused_attention: list = field(default_factory=list)
    unfused_attention: dict = field(default_factory=dict)


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend ``backend`` names for a model on ``device`` (``auto``: the best one there),
    or FastquantError with the reason it cannot be used."""
    if backend not in BACKENDS:
        raise FastquantError(f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")
    if backend == "auto":
        preference = ("cpu",) if device.type == "cpu" else ("cuda", "triton")
        return next((b for b in preference if INT8_LINEAR.available(b)), "torch")
    needs = BACKEND_DEVICE[backend]
    if needs is not None and device.type != needs:
        where = "the CPU" if needs == "cpu" else "a CUDA device"
        raise FastquantError(f"backend {backend!r} needs the model on {where}, it is on {device}")
    if not INT8_LINEAR.available(backend):
        raise FastquantError(f"backend {backend!r} is unavailable: {INT8_LINEAR.why_not(backend)}")
    return backend


def _replace(model: nn.Module, name: str, module: nn.Module):
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, module)


def fuse_attention(model: nn.Module, backend: str) -> tuple[list[str], dict[str, str]]:
    """Turn every fusable QuantAttention of ``model`` into a FusedQuantAttention on ``backend``
    (in place). Returns the fused names, and the others with the reason."""
    fused, unfused = [], {}
    for name, m in list(model.named_modules()):
        if not isinstance(m, QuantAttention):
            continue
        reason = FusedQuantAttention.why_not(m, backend)
        if not reason and not QUANT_ATTENTION.available(backend):
            reason = QUANT_ATTENTION.why_not(backend)
        if reason:
            unfused[name] = reason
            continue
        _replace(model, name, adopt(FusedQuantAttention, m).fuse(backend))
        fused.append(name)
    return fused, unfused


def convert(qmodel: nn.Module, backend: str = "auto", *, inplace: bool = False) -> nn.Module:
    """A deployable copy of ``qmodel`` (from ``fastquant.quantize`` or ``fastquant.load``)
    whose quantized linear layers run on integers.

    ``backend`` (``fastquant.ops.op``): ``cpu`` (a model on the CPU: the fused kernels of
    ``fastquant._C_cpu``, ``torch._int_mm``'s VNNI GEMM inside), ``triton`` (a model on a
    CUDA device: the Triton quantize and int8 GEMM kernels), ``cuda`` (a model on a CUDA
    device: the CUDA C++ kernels of ``csrc/``), ``torch`` (the PyTorch twins, any device), or
    ``auto`` (the best one there: ``cpu`` on the CPU, ``cuda`` then ``triton`` on a GPU,
    else ``torch``). With ``cpu``, ``triton`` and ``cuda`` the attention blocks whose quantizers allow
    it become :class:`FusedQuantAttention`: one kernel from Q, K, V to the attention output.
    The result's record (``fastquant.record_of(model).deploy``) is a :class:`DeployReport`.
    """
    record = record_of(qmodel)
    if record is None or record.config is None:
        raise FastquantError("convert() needs a model returned by fastquant.quantize or fastquant.load")
    if record.deploy is not None:
        raise FastquantError(f"this model is already deployed (backend {record.deploy.backend}): convert the "
                             "fake-quantized model it came from")
    param = next(qmodel.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    backend = resolve_backend(backend, device)
    model = qmodel if inplace else copy.deepcopy(qmodel)
    converted, kept = [], {}
    for name, layer in list(model.named_modules()):
        if not isinstance(layer, QuantLinear):
            continue
        reason = Int8Linear.why_not(layer)
        if reason:
            kept[name] = reason
            continue
        _replace(model, name, Int8Linear.pack(layer).set_backend(backend))
        converted.append(name)
    if not converted:
        raise FastquantError("no layer of this model can run on integers: "
                             + "; ".join(f"{n}: {r}" for n, r in list(kept.items())[:3]))
    fused, unfused = fuse_attention(model, backend) if backend in ("cpu", "triton", "cuda") else ([], {})
    for m in model.modules():  # the other attention matmuls stay fake-quantized (one pass each on the CPU)
        if isinstance(m, QuantMatMul):
            m.a_quant, m.b_quant = deployed_quantizer(m.a_quant), deployed_quantizer(m.b_quant)
    record_of(model, create=True).deploy = DeployReport(backend, converted, kept, fused, unfused)
    return model.eval()
