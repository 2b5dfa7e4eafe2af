"""The Python API: quantize a model, deploy it, save and load it.

    qmodel = fastquant.quantize(model, calib_images, fastquant.QuantConfig(w_bits=4, a_bits=4, method="pfcr"))
    fastquant.save(qmodel, "vit_w4a4.safetensors")
    deployed = fastquant.convert(fastquant.load("vit_w4a4.safetensors"), "auto")

The only module that knows calibration, reconstruction and deployment together.
"""
from __future__ import annotations

import copy
import dataclasses
import warnings
from typing import Iterable, Union

import torch
from torch import nn

from .adapters import expected_input, has_attention
from .calib import calibrate, prepare
from .config import QuantConfig
from .deploy import convert, export_onnx
from .errors import FastquantError
from .recon import ReconConfig, run_method
from .recon import method_names as recon_methods
from .record import record_of
from .serialize import load, save
from .validate import check_images

CalibData = Union[torch.Tensor, Iterable]

__all__ = ["quantize", "convert", "export_onnx", "save", "load", "CalibData"]


def _iter_batches(data: CalibData, batch_size: int):
    """Calibration batches as tensors; accepts a tensor, or batches / (x, y) tuples."""
    if isinstance(data, torch.Tensor):
        if data.dim() == 0:
            raise FastquantError("calibration images must be a [N, C, H, W] tensor, got a 0-d tensor")
        if data.numel() == 0 or len(data) == 0:
            raise FastquantError("calibration set is empty")
        for i in range(0, len(data), batch_size):
            yield data[i:i + batch_size]
        return
    seen = False
    for item in data:
        x = item[0] if isinstance(item, (tuple, list)) else item
        if not isinstance(x, torch.Tensor):
            raise FastquantError(f"calibration batches must be tensors, got {type(x).__name__}")
        seen = True
        yield x
    if not seen:
        raise FastquantError("calibration set is empty")


def _fit(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Calibration images as the model takes them: its channels and size (FastquantError
    naming what was expected), on its device and in its floating-point type."""
    channels, size = expected_input(model)
    if channels is not None and x.shape[1] != channels:
        if x.shape[-1] == channels:
            raise FastquantError(f"calibration images look channels-last ({list(x.shape)}); fastquant takes "
                                 f"[N, C, H, W]: use images.permute(0, 3, 1, 2)")
        raise FastquantError(f"calibration images must have {channels} channels for this model, got "
                             f"{x.shape[1]} (shape {list(x.shape)}, [N, C, H, W])")
    if size is not None and tuple(x.shape[2:]) != size:
        raise FastquantError(f"calibration images must be {size[0]}x{size[1]} for this model, got "
                             f"{x.shape[2]}x{x.shape[3]}")
    param = next(model.parameters(), None)
    if param is not None and param.is_floating_point():
        x = x.to(device=param.device, dtype=param.dtype)
    return x


def quantize(model: nn.Module, calib_data: CalibData, config: QuantConfig | None = None, *, inplace: bool = False,
             progress: bool = True, recon: ReconConfig | None = None, state_dir=None,
             resume: bool = False) -> nn.Module:
    """Fake-quantize ``model`` with ``config``, calibrated on ``calib_data`` (an [N, 3, H, W]
    tensor of preprocessed images, or an iterable of such batches or (images, labels)).

    The reconstruction methods (brecq, qdrop, pfcr, mgrq, and any registered one) then run
    ``fastquant.recon`` on the same images with ``recon`` (a ``fastquant.recon.ReconConfig``;
    None: its defaults), saving their state in ``state_dir`` after every unit and, with
    ``resume``, continuing from it; the record is kept in ``fastquant.record_of(model).recon``.

    Returns the quantized model (a copy unless ``inplace``); its modules hold float
    weights and quantizer state, and ``fastquant.save`` stores integer weights.
    """
    if not isinstance(model, nn.Module):
        raise FastquantError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    cfg = config or QuantConfig()
    if not isinstance(cfg, QuantConfig):
        raise FastquantError(f"config must be a fastquant.QuantConfig, got {type(cfg).__name__}")
    if not cfg.reconstructs and (recon is not None or state_dir is not None or resume):
        raise FastquantError(f"reconstruction settings apply to {', '.join(recon_methods())}, not {cfg.method}")
    if recon is not None:
        if not isinstance(recon, ReconConfig):
            raise FastquantError(f"recon must be a fastquant.recon.ReconConfig, got {type(recon).__name__}")
        recon = dataclasses.replace(recon, method=cfg.method).check_options_apply()
    batches = [_fit(model, check_images(x)) for x in _iter_batches(calib_data, cfg.calib_batch_size)]
    if not has_attention(model):
        warnings.warn(f"{type(model).__name__} has no timm attention module: only its Linear and Conv2d "
                      "layers are quantized (fastquant is made for Vision Transformers)", stacklevel=2)
    spec = cfg.calib_spec()
    fp_model = model
    if inplace and cfg.reconstructs:
        fp_model = copy.deepcopy(model)  # the float targets of reconstruction
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    ln_groups = prepare(model, spec, batches[0][: min(2, len(batches[0]))])
    calibrate(model, batches, spec, ln_groups, progress=progress)
    record = record_of(model, create=True)
    record.config = cfg
    if cfg.reconstructs:
        record.recon = run_method(fp_model, model, torch.cat(batches), cfg.method, recon,
                                  state_dir=state_dir, resume=resume, progress=progress)
    return model
