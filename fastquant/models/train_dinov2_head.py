"""Train the linear head of ``dinov2-s14-fmnist`` on Fashion-MNIST training features.

    python -m fastquant.models.train_dinov2_head [--img-size 112] [--out fastquant/assets/dinov2_s14_fmnist_head.safetensors]

Features are [class token, mean of patch tokens] of the DINOv2 ViT-S/14 backbone
(fp32, no augmentation) for all 60,000 training images, cached in
``$FASTQUANT_CACHE``. The head is multinomial logistic regression on standardised
features (full-batch L-BFGS); its L2 weight is chosen on the last 5,000 training
images, then the head is refit on all 60,000 and the standardisation is folded into
its weights. The test set is never used for choosing anything.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from ..data import DataConfig, load_dataset
from .dinov2 import cache_dir, create_backbone
from .probe import probe_features

ASSET = Path(__file__).resolve().parent.parent / "assets" / "dinov2_s14_fmnist_head.safetensors"


@torch.no_grad()
def extract(backbone, dataset, batch_size=250, desc="features"):
    out = []
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    for x, _ in tqdm(loader, desc=desc, unit="batch"):
        out.append(probe_features(backbone.forward_features(x), backbone.num_prefix_tokens))
    return torch.cat(out)


def cached_features(backbone, dataset, name, limit=None):
    path = cache_dir() / f"{name}.pt"
    if path.is_file():
        return torch.load(path)
    data = dataset if limit is None else Subset(dataset, range(limit))
    feats = extract(backbone, data, desc=name)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(feats, path)
    return feats


def fit_logreg(x, y, num_classes, l2, iters=300):
    w = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    x = x.double()
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=iters, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w.t() + b, y) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def accuracy(x, y, w, b):
    return ((x.double() @ w.t() + b).argmax(1) == y).double().mean().item() * 100


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--img-size", type=int, default=112)
    p.add_argument("--out", type=Path, default=ASSET)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    cfg = DataConfig(img_size=args.img_size)
    backbone = create_backbone(args.img_size)
    train = load_dataset("fmnist", "train", cfg)
    test = load_dataset("fmnist", "test", cfg)
    xtr = cached_features(backbone, train, f"fmnist_train_dinov2s14_{args.img_size}")
    xte = cached_features(backbone, test, f"fmnist_test_dinov2s14_{args.img_size}")
    ytr, yte = train.labels, test.labels
    mu, sd = xtr.mean(0), xtr.std(0).clamp_min(1e-6)
    ztr, zte = (xtr - mu) / sd, (xte - mu) / sd
    n_val = 5000
    scores = {}
    for l2 in (1e-4, 3e-4, 1e-3, 3e-3):
        w, b = fit_logreg(ztr[:-n_val], ytr[:-n_val], 10, l2)
        scores[l2] = accuracy(ztr[-n_val:], ytr[-n_val:], w, b)
        print(f"l2={l2:g}: validation top-1 {scores[l2]:.2f}")
    best = max(scores, key=scores.get)
    w, b = fit_logreg(ztr, ytr, 10, best)
    test_acc = accuracy(zte, yte, w, b)
    # Fold the standardisation: w (x - mu) / sd + b = (w / sd) x + (b - (w / sd) mu).
    w_fold = w / sd.double()
    b_fold = b - w_fold @ mu.double()
    from safetensors.torch import save_file

    meta = {
        "img_size": str(args.img_size),
        "l2": str(best),
        "train_images": str(len(ytr)),
        "fp32_test_top1_full": f"{test_acc:.2f}",
        "command": f"python -m fastquant.models.train_dinov2_head --img-size {args.img_size}",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file({"weight": w_fold.float().contiguous(), "bias": b_fold.float().contiguous()}, str(args.out), metadata=meta)
    print(json.dumps({**meta, "seconds": round(time.time() - t0, 1)}, indent=1))


if __name__ == "__main__":
    main()
