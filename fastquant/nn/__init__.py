"""Quantized modules: drop-in fake-quant modules swapped in for timm's by type
(``modules``), and deployed modules on integer codes and fused kernels (``deployed``)."""
from .deployed import FusedQuantAttention, Int8Linear, KernelFakeQuant, KernelLogQuant, deployed_quantizer
from .modules import (Attention, QuantAttention, QuantConv2d, QuantLinear, QuantMatMul, QuantWindowAttention,
                      WindowAttention, adopt)

__all__ = ["FusedQuantAttention", "Int8Linear", "KernelFakeQuant", "KernelLogQuant", "deployed_quantizer",
           "Attention", "QuantAttention", "QuantConv2d", "QuantLinear", "QuantMatMul", "QuantWindowAttention",
           "WindowAttention", "adopt"]
