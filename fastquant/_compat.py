"""Import shims that make timm usable next to a CPU-only torch.

timm imports torchvision. The PyPI torchvision wheel fails to import beside a CPU
build of torch because its compiled ops need CUDA libraries
("operator torchvision::nms does not exist"). Defining the two op schemas it
registers fake kernels for lets the Python part of torchvision import; only
torchvision's own C++ ops (nms, roi_align, ...) stay unusable, and fastquant uses
none of them. The shim is applied only when the normal import fails.
"""
from __future__ import annotations

import importlib
import sys

_done = False


def ensure_torchvision() -> None:
    global _done
    if _done:
        return
    try:
        importlib.import_module("torchvision")
    except RuntimeError as exc:
        if "torchvision::nms" not in str(exc):
            raise
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        import torch

        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        # Keep the library object alive for the life of the process.
        globals()["_torchvision_lib"] = lib
        importlib.import_module("torchvision")
    _done = True


def import_timm():
    ensure_torchvision()
    import timm

    return timm
