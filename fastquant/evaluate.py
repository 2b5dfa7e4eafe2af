"""Top-1 accuracy on a dataset split, in a fixed order."""
from __future__ import annotations

import itertools

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, limit: int | None = None, batch_size: int = 100,
             progress: bool = True, desc: str = "eval") -> float:
    """Top-1 (percent) on the first ``limit`` samples of ``dataset`` (all if None), with
    the images moved to the model's device and floating-point type (a model cast with
    ``.half()`` gets float16 images)."""
    n = len(dataset) if limit is None else min(limit, len(dataset))
    loader = DataLoader(Subset(dataset, range(n)), batch_size=batch_size, shuffle=False)
    model.eval()
    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None and first.is_floating_point() else None
    correct = 0
    for x, y in tqdm(loader, desc=desc, unit="batch", disable=not progress, leave=False):
        correct += (model(x.to(device, dtype)).argmax(-1).cpu() == y).sum().item()
    return 100.0 * correct / max(n, 1)
