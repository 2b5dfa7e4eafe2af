"""Import shims that make timm usable next to a CPU-only torch.

timm imports torchvision. The PyPI torchvision wheel fails to import beside a CPU
build of torch because its compiled ops need CUDA libraries
("operator torchvision::nms does not exist"). Defining the two op schemas it
registers fake kernels for lets the Python part of torchvision import; only
torchvision's own C++ ops (nms, roi_align, ...) stay unusable, and fastquant uses
none of them. The shim is applied only when the normal import fails.

``cpu_info`` reads what the CPU is and offers (Linux's /proc/cpuinfo), for the records of
a run and for choices that depend on the instruction set.
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


def cpu_info() -> tuple[str | None, list[str] | None]:
    """The first processor's model name and flags from /proc/cpuinfo, each None where they
    cannot be read (another OS, no such entry)."""
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
                if "model name" in info and "flags" in info:
                    break
    except OSError:
        pass
    flags = info.get("flags")
    return info.get("model name") or None, flags.split() if flags is not None else None
