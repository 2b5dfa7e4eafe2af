"""Ops: each declared once (``op.declare``: an ``Op`` with its PyTorch twin, and a
``torch.library`` custom op with its fake), implemented per backend by
``fastquant.backends``. See ``fastquant.ops.op`` for what a backend is and how an op picks one.

==========================  =====================================================  ======================
op                          what                                                   backends besides torch
==========================  =====================================================  ======================
``quantize_per_token_int8``  symmetric int8 codes per row                          triton, cuda
``quantize_asym``            asymmetric activation codes, row sums                  triton, cuda
``int8_gemm``                int8 (or packed int4) GEMM, dequantization epilogue    triton, cuda
``pack_weight_int4``         the GEMMs' packed 4-bit weight                         cuda
``int8_linear``              a deployed integer linear layer, whole                 cpu, triton, cuda
``quant_attention``          fused quantized attention for inference               triton, cuda
``fake_quant_uniform``       one-pass uniform fake quantization                     cpu
``fake_quant_log``           one-pass log fake quantization                         cpu
``fq_linear_fwd`` / ``_bwd``  reconstruction's fake-quant linear layer              triton
``fq_attention_fwd`` / ``_bwd``  reconstruction's fake-quant attention              triton
==========================  =====================================================  ======================

``grid_linear`` (the reconstruction loop's product on integer grids) is a plain PyTorch
composition, which autograd and torch.compile trace as they are.
"""
from . import attention, fake_quant, fq_attention, fq_linear, int8_linear, quantize_int8  # noqa: F401  (declare)
from .grid import grid_linear
from .op import BACKENDS, REGISTRY, Op, op_named
from .quantize_int8 import quantize_per_token_int8, torch_quantize_per_token_int8

__all__ = ["BACKENDS", "REGISTRY", "Op", "op_named", "grid_linear", "quantize_per_token_int8",
           "torch_quantize_per_token_int8"]
