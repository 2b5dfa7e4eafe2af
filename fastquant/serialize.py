"""Saving and loading quantized models as safetensors with integer weights.

The file holds every quantized layer's weight as integer codes (``<layer>.weight_int``,
uint8 in 0 .. 2**bits - 1) beside its per-channel scale and zero point, all other
parameters and quantizer state in float, and in its metadata the QuantConfig and the
ModelSpec needed to rebuild the architecture. Loading rebuilds the model, dequantizes
the codes and gives logits equal to the saved model's.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .config import QuantConfig
from .errors import FastquantError
from .modules import QuantConv2d, QuantLinear
from .ptq import _find_patch_convs, _Plan, quantizers_of, set_mode, swap_modules

FORMAT = "fastquant-fakequant-v1"


def _quant_layers(model: nn.Module):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, (QuantLinear, QuantConv2d))]


def save(qmodel: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``qmodel`` (from ``fastquant.quantize`` on a model from ``fastquant.models``)."""
    from safetensors.torch import save_file

    cfg = getattr(qmodel, "fastquant_config", None)
    spec = getattr(qmodel, "fastquant_spec", None)
    if cfg is None:
        raise FastquantError("save() needs a model returned by fastquant.quantize")
    if spec is None:
        raise FastquantError("save() needs to know the architecture: build the model with fastquant.models.load_model")
    sd = {k: v.detach().cpu().contiguous() for k, v in qmodel.state_dict().items()}
    for name, m in _quant_layers(qmodel):
        del sd[f"{name}.weight"]
        sd[f"{name}.weight_int"] = m.weight_quant.quantize(m.weight.detach()).cpu().contiguous()
    meta = {"format": FORMAT, "config": cfg.to_json(), "model": spec.to_json()}
    path = Path(path)
    if path.parent and not path.parent.is_dir():
        raise FastquantError(f"output folder {path.parent} does not exist")
    tmp = path.with_name(path.name + ".partial")
    try:
        save_file(sd, str(tmp), metadata=meta)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def read_metadata(path: str | os.PathLike) -> dict:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FastquantError(f"quantized model {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # noqa: BLE001 - the reader raises several types for a bad file
        raise FastquantError(f"{path} is not a readable safetensors file ({type(exc).__name__})") from None
    if meta.get("format") != FORMAT:
        raise FastquantError(f"{path} is not a fastquant quantized model (format {meta.get('format')!r})")
    return meta


def load(path: str | os.PathLike) -> nn.Module:
    """Rebuild a model written by ``save``: quantized, in eval mode."""
    from safetensors.torch import load_file

    from .models import ModelSpec, build_model, classifier_of

    meta = read_metadata(path)
    try:
        cfg = QuantConfig.from_json(meta["config"])
        spec = ModelSpec.from_json(meta["model"])
        sd = load_file(str(path))
    except (KeyError, ValueError, TypeError) as exc:
        raise FastquantError(f"{path} has corrupted metadata ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type for bad data
        raise FastquantError(f"{path} is corrupted ({type(exc).__name__})") from None
    model, _ = build_model(spec, weights=False)
    # Saved models are already reparameterised: every input quantizer is per tensor.
    swap_modules(model, cfg, _Plan(head=classifier_of(model), patch_convs=_find_patch_convs(model), ln_groups={}))
    with torch.no_grad():
        for name, m in _quant_layers(model):
            codes = sd.pop(f"{name}.weight_int", None)
            if codes is None:
                raise FastquantError(f"{path} is missing the integer weight of {name}")
            scale = sd.get(f"{name}.weight_quant.scale")
            zp = sd.get(f"{name}.weight_quant.zero_point")
            if scale is None or zp is None or codes.shape != m.weight.shape:
                raise FastquantError(f"{path} does not fit {spec.name}: layer {name}")
            sd[f"{name}.weight"] = ((codes.float() - zp) * scale).to(m.weight.dtype)
            if f"{name}.bias" in sd and m.bias is None:
                m.bias = nn.Parameter(torch.zeros_like(sd[f"{name}.bias"]))
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise FastquantError(f"{path} does not fit {spec.name}: {str(exc).splitlines()[0]}") from None
    set_mode(quantizers_of(model), "quant")
    model.fastquant_config = cfg
    model.fastquant_spec = spec
    return model.eval()
