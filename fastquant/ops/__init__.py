"""Ops: each declared once with torch.library, implemented per backend.

Every op has a pure-PyTorch reference (``torch_<op>``) that serves the CPU and is the
tests' oracle, and CUDA implementations from ``csrc/`` (the ``fastquant._C``
extension) and ``kernels/`` (Triton). For CUDA tensors an op uses the extension when it
is built, else Triton, else the reference; ``fastquant.backends`` says which are
available and why not.
"""
from .grid import grid_linear
from .int8 import quantize_per_token_int8, torch_quantize_per_token_int8

__all__ = ["grid_linear", "quantize_per_token_int8", "torch_quantize_per_token_int8"]
