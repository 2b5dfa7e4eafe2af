"""Saving and loading quantized models as safetensors with integer weights.

The file holds every quantized layer's weight as integer codes beside its per-channel
scale and zero point: ``<layer>.weight_int`` (uint8 in 0 .. 2**bits - 1, one code per
byte) or, for codes of at most 4 bits, ``<layer>.weight_int4`` (two codes per byte, the
even column in the low nibble: ``fastquant.ops.int8_linear.pack_int4``;
``<layer>.weight_cols`` the column count). All other
parameters and quantizer state are stored in float, and the metadata holds the
QuantConfig and the ModelSpec needed to rebuild the architecture. Loading rebuilds the
model, dequantizes the codes and gives logits equal to the saved model's.

A deployed model (``fastquant.convert``) is saved the same way, its integer layers as the
codes and quantizer state they were made from, with the backend in the metadata;
loading converts it again, giving the same integer layers.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .calib import plan_for, swap_modules
from .config import QuantConfig
from .deploy import convert
from .errors import FastquantError
from .models import ModelSpec, build_model
from .nn import Int8Linear, QuantConv2d, QuantLinear
from .ops.int8_linear import pack_int4, unpack_int4
from .quant import quantizers_in, set_mode
from .record import record_of

FORMAT = "fastquant-fakequant-v1"


def _quant_layers(model: nn.Module):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, (QuantLinear, QuantConv2d))]


def _put_codes(sd: dict, name: str, codes: torch.Tensor, bits: int):
    codes = codes.cpu().to(torch.uint8).contiguous()
    if bits <= 4 and codes.dim() == 2:
        sd[f"{name}.weight_int4"] = pack_int4(codes, dim=-1)
        sd[f"{name}.weight_cols"] = torch.tensor([codes.shape[1]], dtype=torch.int64)
    else:
        sd[f"{name}.weight_int"] = codes


def _take_codes(sd: dict, name: str) -> torch.Tensor | None:
    packed = sd.pop(f"{name}.weight_int4", None)
    if packed is None:
        return sd.pop(f"{name}.weight_int", None)
    cols = sd.pop(f"{name}.weight_cols", None)
    if cols is None or cols.numel() != 1:
        return None
    return unpack_int4(packed, int(cols.item()), dim=-1)


def save(qmodel: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``qmodel`` (from ``fastquant.quantize`` on a model from ``fastquant.models``)."""
    from safetensors.torch import save_file

    record = record_of(qmodel)
    cfg = getattr(record, "config", None)
    spec = getattr(record, "spec", None)
    if cfg is None:
        raise FastquantError("save() needs a model returned by fastquant.quantize")
    if spec is None:
        raise FastquantError("save() needs to know the architecture: build the model with fastquant.models.load_model")
    sd = {k: v.detach().cpu().contiguous() for k, v in qmodel.state_dict().items()}
    for name, m in _quant_layers(qmodel):
        del sd[f"{name}.weight"]
        _put_codes(sd, name, m.weight_quant.quantize(m.weight.detach()), m.weight_quant.bits)
    for name, m in qmodel.named_modules():
        if isinstance(m, Int8Linear):
            for key in [k for k in sd if k.startswith(name + ".")]:
                del sd[key]
            state = m.quant_state()
            _put_codes(sd, name, state.pop("weight_int"), m.w_bits)
            sd.update({f"{name}.{k}": v.detach().cpu().contiguous() for k, v in state.items()})
    meta = {"format": FORMAT, "config": cfg.to_json(), "model": spec.to_json()}
    if record.deploy is not None:
        meta["deploy"] = record.deploy.backend
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
    swap_modules(model, cfg.calib_spec(), plan_for(model))
    with torch.no_grad():
        for name, m in _quant_layers(model):
            codes = _take_codes(sd, name)
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
    set_mode(quantizers_in(model), "quant")
    record = record_of(model, create=True)
    record.config, record.spec = cfg, spec
    if "deploy" in meta:
        # The model loads on the CPU: a deployment comes back on the best CPU backend (the
        # same integer layers); convert(model.cuda(), "triton") moves it back to a GPU.
        model = convert(model, "torch" if meta["deploy"] == "torch" else "auto", inplace=True)
    return model.eval()
