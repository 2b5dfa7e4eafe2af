"""Deployment: turn a fake-quant model into one whose linear layers run on integer codes.

``convert(qmodel, backend)`` (``fastquant.convert``) replaces every
:class:`~fastquant.nn.QuantLinear` of a calibrated (or reconstructed) model by an
:class:`~fastquant.nn.Int8Linear`; on the GPU backends every attention whose quantizers
allow it becomes a :class:`~fastquant.nn.FusedQuantAttention`. Layers the integer path
cannot express (a per-channel input step, a non-uniform quantizer, ...) keep their
fake-quant module, and the report says why.

``export_onnx(qmodel, path)`` (``fastquant.export_onnx``) writes the fake-quant model as a
standard QDQ ONNX graph for ONNX Runtime, OpenVINO or TensorRT (``export.py``).
"""
from .convert import BACKENDS, DeployReport, convert, fuse_attention, resolve_backend
from .export import ExportReport, export_onnx

__all__ = ["BACKENDS", "DeployReport", "ExportReport", "convert", "export_onnx", "fuse_attention", "resolve_backend"]
