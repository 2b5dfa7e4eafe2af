"""fastquant: post-training quantization for Vision Transformers."""
from .config import QuantConfig
from .deploy import convert
from .errors import FastquantError
from .ptq import quantize
from .serialize import load, save

__version__ = "0.1.0"
__all__ = ["QuantConfig", "FastquantError", "convert", "quantize", "save", "load", "__version__"]
