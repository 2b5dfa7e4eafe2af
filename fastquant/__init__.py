"""fastquant: post-training quantization for Vision Transformers.

    qmodel = fastquant.quantize(model, calib_images, fastquant.QuantConfig(w_bits=4, a_bits=4, method="pfcr"))

The package is layered (each layer imports only the ones below it; tests/test_layering.py
checks it): ``cli`` -> the API (``api``, ``config``, ``serialize``) -> the methods
(``calib``, ``recon``, ``deploy``, which never import each other) -> ``adapters`` (timm's
ViT structure) -> ``nn`` (quantized and deployed modules) -> ``backends`` (the only importer
of the kernels and extensions) -> ``ops`` (each op with its PyTorch twin) -> ``quant``
(quantizers) -> the foundation (errors, settings, the per-model record, input checks,
atomic file writes). ``models``, ``data`` and ``evaluate`` serve the API and the CLI only.
"""
from .api import convert, export_onnx, load, quantize, save
from .config import QuantConfig
from .errors import FastquantError
from .recon import ReconConfig, register_method
from .record import record_of

__version__ = "0.1.0"
__all__ = ["QuantConfig", "ReconConfig", "FastquantError", "convert", "export_onnx", "quantize", "save", "load", "record_of",
           "register_method", "__version__"]
