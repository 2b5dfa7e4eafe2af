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

Integrity: the metadata key ``sha256`` holds a checksum of every tensor (its bytes, shape
and dtype) and of the metadata fastquant reads; ``load`` refuses a file whose content does
not match, naming the tensor, and a file whose values no quantizer can hold (NaN or Inf,
a step that is not positive, codes or zero points outside the bit range). Saving writes a
temporary file beside the target and renames it (``fastquant.files.atomic_write``).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from .calib import plan_for, swap_modules
from .config import QuantConfig
from .deploy import convert
from .errors import FastquantError
from .files import atomic_write, check_writable
from .models import ModelSpec, build_model
from .nn import Int8Linear, QuantConv2d, QuantLinear
from .ops.int8_linear import pack_int4, unpack_int4
from .quant import quantizers_in, set_mode
from .record import record_of

FORMAT = "fastquant-fakequant-v1"
CHECKSUMS = "sha256"  # metadata key: {tensor name: checksum, METADATA: checksum of the metadata read}
METADATA = "__metadata__"
METADATA_KEYS = ("format", "config", "model", "deploy")


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
    meta[CHECKSUMS] = json.dumps({**tensor_checksums(sd), METADATA: metadata_checksum(meta)}, sort_keys=True)
    path = check_writable(path, "save()")
    return atomic_write(path, lambda tmp: save_file(sd, str(tmp), metadata=meta))


def tensor_checksums(tensors: dict) -> dict:
    """{name: the first 16 hex digits of the SHA-256 of the tensor's bytes, shape and dtype}."""
    out = {}
    for name, t in tensors.items():
        h = hashlib.sha256(f"{tuple(t.shape)}{t.dtype}".encode())
        t = t.detach().contiguous().cpu()
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
        out[name] = h.hexdigest()[:16]
    return out


def metadata_checksum(meta: dict) -> str:
    """The first 16 hex digits of the SHA-256 of the metadata fastquant reads."""
    text = json.dumps({k: meta.get(k) for k in METADATA_KEYS}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _saved_checksums(path: Path, meta: dict) -> dict | None:
    """The checksums a file carries (files from version 0.1.0 on; None for older ones), once
    the metadata they cover is found intact."""
    if CHECKSUMS not in meta:
        return None
    try:
        saved = json.loads(meta[CHECKSUMS])
    except ValueError:
        saved = None
    if not isinstance(saved, dict) or not all(isinstance(v, str) for v in saved.values()):
        raise FastquantError(f"{path} has corrupted metadata (its checksums are not a JSON mapping)")
    if saved.get(METADATA) != metadata_checksum(meta):
        raise FastquantError(f"{path} has corrupted metadata: it does not match its checksum")
    return {k: v for k, v in saved.items() if k != METADATA}


def _verify(path: Path, saved: dict | None, sd: dict):
    """Refuse a file whose tensors are not the ones saved (``saved``: their checksums) or hold
    values no quantizer can have."""
    if saved is not None:
        if set(saved) != set(sd):
            raise FastquantError(f"{path} is corrupted: its tensors are not the ones its checksums list")
        now = tensor_checksums(sd)
        bad = sorted(name for name in sd if now[name] != saved[name])
        if bad:
            raise FastquantError(f"{path} is corrupted: tensor {bad[0]} does not match its checksum"
                                 + (f" ({len(bad) - 1} more)" if len(bad) > 1 else ""))
    for name, t in sd.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise FastquantError(f"{path} is corrupted: tensor {name} holds NaN or Inf")
        if name.endswith((".scale", ".input_div")) and t.numel() and not (t > 0).all():
            raise FastquantError(f"{path} is corrupted: quantizer step {name} is not positive")


def read_metadata(path: str | os.PathLike) -> dict:
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        raise FastquantError(f"quantized model {path} is a folder, not a file")
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


def read_config(path: Path, meta: dict) -> tuple:
    """(QuantConfig, ModelSpec) from a saved model's metadata, or FastquantError naming the file.
    A config saved before a field existed gets the value that reproduces the model it was
    saved with (``fc2_smooth``: 0, off; ``zero_point_search``: off)."""
    try:
        config = meta["config"]
        data = json.loads(config) if isinstance(config, str) else None
        if isinstance(data, dict):
            missing = {k: v for k, v in (("fc2_smooth", 0.0), ("zero_point_search", False)) if k not in data}
            if missing:
                config = json.dumps({**data, **missing})
        return QuantConfig.from_json(config), ModelSpec.from_json(meta["model"])
    except FastquantError as exc:
        raise FastquantError(f"{path} has corrupted metadata ({exc})") from None
    except (KeyError, ValueError, TypeError) as exc:
        raise FastquantError(f"{path} has corrupted metadata ({type(exc).__name__}: {exc})") from None


def load(path: str | os.PathLike) -> nn.Module:
    """Rebuild a model written by ``save``: quantized, in eval mode."""
    from safetensors.torch import load_file

    path = Path(path)
    meta = read_metadata(path)
    checksums = _saved_checksums(path, meta)
    cfg, spec = read_config(path, meta)
    try:
        sd = load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type for bad data
        raise FastquantError(f"{path} is corrupted ({type(exc).__name__})") from None
    _verify(path, checksums, sd)
    model, _ = build_model(spec, weights=False, empty=True)  # every tensor is loaded below
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
            qmax = m.weight_quant.qmax
            if codes.numel() and int(codes.max()) > qmax or ((zp < 0) | (zp > qmax) | (zp != zp.round())).any():
                raise FastquantError(f"{path} is corrupted: layer {name} has codes or zero points outside "
                                     f"0..{qmax} ({m.weight_quant.bits} bits)")
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
