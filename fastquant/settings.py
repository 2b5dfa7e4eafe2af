"""fastquant's switches, in one place: read once from the environment at import, changed
only through these functions (or the ``overridden`` context manager).

- ``fused_recon`` (``FASTQUANT_FUSED_RECON``, default on): reconstruction may run its
  layers through the fused fake-quant linear and attention ops on CUDA tensors
  (``fastquant.ops.fq_linear``, ``fastquant.ops.fq_attention``); ``0`` forces the
  reference path, for comparisons.
"""
from __future__ import annotations

import contextlib
import os

from .errors import FastquantError


def _flag(name: str, default: bool) -> bool:
    value = os.environ.get(name, "").strip().lower()
    if value == "":
        return default
    if value in ("1", "true", "on", "yes"):
        return True
    if value in ("0", "false", "off", "no"):
        return False
    raise FastquantError(f"{name} must be 0 or 1, got {os.environ[name]!r}")


_SETTINGS = {"fused_recon": _flag("FASTQUANT_FUSED_RECON", True)}


def get(name: str):
    if name not in _SETTINGS:
        raise KeyError(f"unknown fastquant setting {name!r} (one of {', '.join(_SETTINGS)})")
    return _SETTINGS[name]


def set(name: str, value) -> None:  # noqa: A001 - the natural name beside get()
    get(name)
    _SETTINGS[name] = value


def fused_recon() -> bool:
    """Whether reconstruction may use the fused fake-quant ops (on CUDA tensors)."""
    return bool(_SETTINGS["fused_recon"])


@contextlib.contextmanager
def overridden(**values):
    """Run with some settings changed, restoring them after: ``with overridden(fused_recon=False): ...``"""
    old = {name: get(name) for name in values}
    _SETTINGS.update(values)
    try:
        yield
    finally:
        _SETTINGS.update(old)
