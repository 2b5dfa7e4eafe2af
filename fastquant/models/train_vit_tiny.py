"""Train ``vit-tiny-fmnist``: a 4-block ViT (96 wide, 3 heads, 28 px, patch 4) from scratch.

    python -m fastquant.models.train_vit_tiny [--epochs 4] [--seed 0]

AdamW with cosine decay on all 60,000 Fashion-MNIST training images (random
horizontal flips), saved as fp32 safetensors (about 2 MB) in fastquant/assets. It is
for fast plumbing tests, not for comparing methods.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..data import load_dataset
from . import VIT_TINY, VIT_TINY_ARGS, ModelSpec, build_model


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=VIT_TINY)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    t0 = time.time()
    spec = ModelSpec("vit-tiny-fmnist", VIT_TINY_ARGS["img_size"], 10)
    model, dcfg = build_model(spec, weights=False)
    train = load_dataset("fmnist", "train", dcfg)
    test = load_dataset("fmnist", "test", dcfg)
    steps_per_epoch = len(train) // args.batch_size
    total = steps_per_epoch * args.epochs
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 200) * 0.5 * (1 + math.cos(math.pi * s / total)))
    model.train()
    bar = tqdm(total=total, desc="train vit-tiny", unit="step")
    for _ in range(args.epochs):
        perm = torch.randperm(len(train))
        for i in range(steps_per_epoch):
            x, y = train.batch(perm[i * args.batch_size:(i + 1) * args.batch_size])
            flip = torch.rand(len(x)) < 0.5
            x[flip] = x[flip].flip(-1)
            loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()
    with torch.no_grad():
        correct = sum((model(test.batch(range(i, min(i + 500, len(test))))[0]).argmax(1)
                       == test.labels[i:i + 500]).sum().item() for i in range(0, len(test), 500))
    acc = 100.0 * correct / len(test)
    from safetensors.torch import save_file

    meta = {"test_top1": f"{acc:.2f}", "epochs": str(args.epochs), "seed": str(args.seed),
            "command": f"python -m fastquant.models.train_vit_tiny --epochs {args.epochs} --seed {args.seed}"}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(args.out), metadata=meta)
    print(json.dumps({**meta, "seconds": round(time.time() - t0, 1)}))


if __name__ == "__main__":
    main()
