"""Ops: each declared once with torch.library, implemented per backend.

Every op has a pure-PyTorch reference (``torch_<op>``) that serves the CPU and is the
tests' oracle, and CUDA implementations from ``csrc/`` (the ``fastquant._C``
extension) and ``kernels/`` (Triton). For CUDA tensors an op uses the extension when it
is built, else Triton, else the reference; ``fastquant.backends`` says which are
available and why not.

``grid_linear`` (the reconstruction loop's product on integer grids) is its PyTorch
composition, which autograd and torch.compile trace as they are. The module
``fastquant.ops.fq_linear`` holds the same layer from the float inputs (quantization,
AdaRound's rounding, QDrop) as one op with its own backward (``fq_linear.fq_linear``),
fused into Triton GEMMs on CUDA, which ``QuantLinear`` uses on CUDA tensors during
reconstruction.
"""
from .fq_linear import torch_fq_linear
from .grid import grid_linear
from .int8 import quantize_per_token_int8, torch_quantize_per_token_int8

__all__ = ["grid_linear", "quantize_per_token_int8", "torch_fq_linear", "torch_quantize_per_token_int8"]
