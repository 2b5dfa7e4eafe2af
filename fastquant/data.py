"""Datasets: Fashion-MNIST from its IDX files, and ImageNet-style image folders.

A dataset spec is ``fmnist`` or ``imagefolder:PATH``. Images are returned already
preprocessed for the model (``DataConfig``), as float tensors [3, H, W].
"""
from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .errors import FastquantError

FMNIST_DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


@dataclass(frozen=True)
class DataConfig:
    """How a model wants its input: square size, normalisation, resize method."""

    img_size: int
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bicubic"
    crop_pct: float = 0.875


def _read_idx(path: Path, magic: int) -> torch.Tensor:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise FastquantError(f"cannot read {path}: {exc}") from None
    if len(raw) < 8 or int.from_bytes(raw[:4], "big") != magic:
        raise FastquantError(f"{path} is not an IDX file (bad magic number)")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    count = 1
    for d in dims:
        count *= d
    if len(raw) - offset != count:
        raise FastquantError(f"{path} is truncated: expected {count} bytes of data, found {len(raw) - offset}")
    return torch.frombuffer(bytearray(raw[offset:]), dtype=torch.uint8).reshape(dims)


def _find(root: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    raise FastquantError(
        f"Fashion-MNIST file {stem}[.gz] not found in {root} "
        "(install the Debian package dataset-fashion-mnist, or set FASTQUANT_FMNIST to a folder holding the IDX files)"
    )


class FashionMNIST(Dataset):
    """Fashion-MNIST from IDX files, resized to the model's size and given 3 channels."""

    classes = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

    def __init__(self, split: str, cfg: DataConfig, root: str | os.PathLike | None = None):
        root = Path(root or os.environ.get("FASTQUANT_FMNIST") or FMNIST_DEFAULT_DIR)
        if not root.is_dir():
            raise FastquantError(
                f"Fashion-MNIST folder {root} does not exist "
                "(install the Debian package dataset-fashion-mnist, or set FASTQUANT_FMNIST)"
            )
        img_stem, lbl_stem = FMNIST_FILES[split]
        self.images = _read_idx(_find(root, img_stem), 2051)
        self.labels = _read_idx(_find(root, lbl_stem), 2049).long()
        if self.images.dim() != 3 or len(self.images) != len(self.labels):
            raise FastquantError(f"Fashion-MNIST files in {root} disagree: {len(self.images)} images, {len(self.labels)} labels")
        self.cfg = cfg
        self._mean = torch.tensor(cfg.mean).view(3, 1, 1)
        self._std = torch.tensor(cfg.std).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """Preprocessed images [n, 3, S, S] and labels for ``indices``: bilinear resize, 3 channels, normalise."""
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        x = self.images[idx].float().div_(255.0)[:, None]
        if x.shape[-1] != self.cfg.img_size:
            x = F.interpolate(x, size=(self.cfg.img_size, self.cfg.img_size), mode="bilinear", align_corners=False)
        x = x.expand(-1, 3, -1, -1)
        return (x - self._mean) / self._std, self.labels[idx]

    def __getitem__(self, i: int):
        x, y = self.batch([i])
        return x[0], int(y[0])


class ImageFolder(Dataset):
    """An ImageNet-style folder: one sub-folder per class, sorted names give the labels.

    ``PATH`` may hold ``train/`` and ``val/`` (calibration from train, evaluation on
    val); otherwise the folder itself serves both splits.
    """

    def __init__(self, root: str, split: str, cfg: DataConfig):
        base = Path(root)
        if not base.is_dir():
            raise FastquantError(f"image folder {base} does not exist")
        sub = {"train": "train", "test": "val"}[split]
        folder = base / sub if (base / sub).is_dir() else base
        classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
        if not classes:
            raise FastquantError(f"image folder {folder} has no class sub-folders")
        self.classes = tuple(classes)
        self.samples = []
        for label, cls in enumerate(classes):
            for dirpath, _, files in sorted(os.walk(folder / cls)):
                for name in sorted(files):
                    if name.lower().endswith(IMG_EXTENSIONS):
                        self.samples.append((os.path.join(dirpath, name), label))
        if not self.samples:
            raise FastquantError(f"image folder {folder} holds no images ({', '.join(IMG_EXTENSIONS)})")
        self.transform = _eval_transform(cfg)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        from PIL import Image, UnidentifiedImageError

        path, label = self.samples[i]
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
        except (OSError, UnidentifiedImageError) as exc:
            raise FastquantError(f"cannot read image {path}: {exc}") from None
        return self.transform(img), label


def _eval_transform(cfg: DataConfig):
    """The model's own evaluation preprocessing (resize, center crop, normalise)."""
    from ._compat import import_timm

    timm = import_timm()
    return timm.data.create_transform(
        input_size=(3, cfg.img_size, cfg.img_size),
        is_training=False,
        interpolation=cfg.interpolation,
        mean=cfg.mean,
        std=cfg.std,
        crop_pct=cfg.crop_pct,
    )


def load_dataset(spec: str, split: str, cfg: DataConfig) -> Dataset:
    """``spec`` is ``fmnist`` or ``imagefolder:PATH``; ``split`` is ``train`` or ``test``."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if spec == "fmnist":
        return FashionMNIST(split, cfg)
    if spec.startswith("imagefolder:"):
        path = spec.split(":", 1)[1]
        if not path:
            raise FastquantError("imagefolder needs a path: --data imagefolder:PATH")
        return ImageFolder(path, split, cfg)
    raise FastquantError(f"unknown dataset {spec!r} (choose fmnist or imagefolder:PATH)")


def calibration_indices(n_total: int, n: int, seed: int) -> list[int]:
    """``n`` distinct indices drawn deterministically from ``seed``."""
    if n <= 0:
        raise FastquantError(f"calibration set is empty (--calib-size {n})")
    if n > n_total:
        raise FastquantError(f"--calib-size {n} is larger than the training split ({n_total} images)")
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n_total, generator=g)[:n].tolist()


def stack(dataset: Dataset, indices) -> tuple[torch.Tensor, torch.Tensor]:
    """Materialise the given samples as one batch (images, labels)."""
    if hasattr(dataset, "batch"):
        return dataset.batch(list(indices))
    xs, ys = zip(*(dataset[i] for i in indices))
    return torch.stack(xs), torch.tensor(ys)
