"""Checks of user input shared by every entry point (one message for one mistake)."""
from __future__ import annotations

import torch

from .errors import FastquantError


def check_images(x, what: str = "calibration images") -> torch.Tensor:
    """``x`` as a non-empty floating-point [N, C, H, W] tensor without NaN or Inf."""
    if not isinstance(x, torch.Tensor):
        raise FastquantError(f"{what} must be a tensor [N, C, H, W], got {type(x).__name__}")
    if x.dim() != 4 or len(x) == 0:
        raise FastquantError(f"{what} must be a non-empty [N, C, H, W] tensor, got shape {tuple(x.shape)}")
    if not torch.is_floating_point(x):
        raise FastquantError(f"{what} must be floating point, got {x.dtype}")
    if not torch.isfinite(x).all():
        raise FastquantError(f"{what.replace('images', 'data')} contains NaN or Inf")
    return x
