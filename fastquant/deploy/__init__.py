"""Deployment: turn a fake-quant model into one whose linear layers run on integer codes.

``convert(qmodel, backend)`` (``fastquant.convert``) replaces every
:class:`~fastquant.nn.QuantLinear` of a calibrated (or reconstructed) model by an
:class:`~fastquant.nn.Int8Linear`; on the GPU backends every attention whose quantizers
allow it becomes a :class:`~fastquant.nn.FusedQuantAttention`. Layers the integer path
cannot express (a per-channel input step, a non-uniform quantizer, ...) keep their
fake-quant module, and the report says why.
"""
from .convert import BACKENDS, DeployReport, convert, fuse_attention, resolve_backend

__all__ = ["BACKENDS", "DeployReport", "convert", "fuse_attention", "resolve_backend"]
