"""bench/gpu_check.sh's orchestration, dry: a stand-in python plays every step.

The script is meant to run once, unattended, on a GPU machine lent for a few minutes; these
tests check on the CPU that it writes everything into the folder it is given, that a
failing step does not stop the next ones, that the deadline cuts a step that runs long and
skips the rest, and that its summary and the report printer work on what it wrote.
"""
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.sh"

# Plays python3 for gpu_check.sh: the CUDA build fails (exit 3), the build without it
# passes, the kernel benchmark writes its JSON, the ViT-B benchmark hangs, xdist and
# pytest-timeout are missing, the dinov2 data is missing; the summary is the real one.
STAND_IN = r"""#!/usr/bin/env bash
echo "$*" >>"$CALLS"
json_after() { local prev=""; for a in "$@"; do [ "$prev" = --json ] && echo "$a"; prev=$a; done; }
case "$*" in
  "- "*) echo "timm 9.9.9 (stand-in)"; exit 0 ;;
  "-m pip install -e "*) [ "${FASTQUANT_CUDA:-}" = 1 ] && { echo "nvcc: error (stand-in)"; exit 3; }; exit 0 ;;
  "bench/gpu_report.py env "*) echo '{"stand_in": true}' >"$3"; exit 0 ;;
  "bench/gpu_report.py has-dinov2-data") echo "missing: everything (stand-in)"; exit 1 ;;
  "bench/gpu_report.py summary "*) exec "$REAL_PY" "$@" ;;
  *"--sections kernels"*)
    echo '{"records": [{"name": "target:w8a8_gemm", "speedup": 1.5, "baseline": "fp16"}]}' >"$(json_after "$@")"
    exit 0 ;;
  *"--sections e2e"*) sleep 120; exit 0 ;;
  "-c import xdist"|"-c import pytest_timeout") exit 1 ;;
  *) echo "stand-in: unexpected call: $*" >&2; exit 99 ;;
esac
"""


def _stand_in(tmp_path: Path) -> dict:
    fake = tmp_path / "python3"
    fake.write_text(STAND_IN)
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    return dict(os.environ, FASTQUANT_PYTHON=str(fake), CALLS=str(tmp_path / "calls.txt"), REAL_PY=sys.executable,
                FASTQUANT_GPU_KIT=str(tmp_path / "no-kit"))


def _results_listing() -> set:
    folder = REPO / "bench" / "results"
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def test_dry_run_writes_into_out_continues_after_failures_and_keeps_the_deadline(tmp_path):
    env = _stand_in(tmp_path)
    env.update(GPU_CHECK_DEADLINE="8", GPU_CHECK_MIN_STEP="2")
    out = tmp_path / "out"
    before = _results_listing()
    start = time.monotonic()
    proc = subprocess.run(["bash", str(SCRIPT), str(out)], env=env, capture_output=True, text=True, timeout=120)
    wall = time.monotonic() - start
    assert proc.returncode == 1, proc.stdout + proc.stderr  # some steps failed
    assert wall < 8 + 10, f"the 8 s deadline was not kept: {wall:.1f} s"
    assert _results_listing() == before  # nothing written inside the tree

    summary = json.loads((out / "summary.json").read_text())
    status = {s["step"]: s["status"] for s in summary["steps"]}
    assert status["build"] == "failed" and summary["steps"][0]["rc"] == 3
    assert status["build_without_cuda_ext"] == "ok"  # the failure did not stop the next steps
    assert status["env"] == "ok" and status["kernels"] == "ok"
    assert status["e2e"] == "timeout"  # cut at the deadline
    assert status["tests"] == "skipped" and status["dinov2"] == "skipped"
    assert summary["kit"] == "absent"

    assert json.loads((out / "env.json").read_text()) == {"stand_in": True}
    assert json.loads((out / "kernels.json").read_text())["records"][0]["name"] == "target:w8a8_gemm"
    log = (out / "gpu_check.log").read_text()
    assert "nvcc: error (stand-in)" in log and "== e2e: timeout" in log
    assert "| target:w8a8_gemm | 1.5x over fp16 |" in log  # the real summary printer read the JSON
    assert {p.name for p in out.iterdir()} <= {"gpu_check.log", "summary.json", "env.json", "kernels.json",
                                                "e2e.json", "tests.xml", "dinov2.json"}  # at most 7 files come back
    calls = (tmp_path / "calls.txt").read_text().splitlines()
    assert not any(c.startswith("-m pytest") for c in calls)  # skipped, never started


def test_every_step_passes_with_time_to_spare(tmp_path):
    """With a generous deadline the hanging benchmark is cut by its own cap, not the
    deadline; the tests step starts, and without xdist or pytest-timeout runs plainly."""
    env = _stand_in(tmp_path)
    # The same script with the e2e cap lowered to 3 s, so the test stays short, in a copy of
    # bench/ (the script runs in the folder above its own).
    bench = tmp_path / "repo" / "bench"
    bench.mkdir(parents=True)
    text = SCRIPT.read_text().replace("step e2e 120 ", "step e2e 3 ")
    assert "step e2e 3 " in text
    script = bench / "gpu_check.sh"
    script.write_text(text)
    (bench / "gpu_report.py").write_text((REPO / "bench" / "gpu_report.py").read_text())
    env.update(GPU_CHECK_DEADLINE="60", GPU_CHECK_MIN_STEP="2")
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(script), str(out)], env=env, capture_output=True, text=True, timeout=120)
    summary = json.loads((out / "summary.json").read_text())
    status = {s["step"]: s["status"] for s in summary["steps"]}
    assert status["e2e"] == "timeout" and [s["cap_s"] for s in summary["steps"] if s["step"] == "e2e"] == [3]
    assert status["tests"] == "failed"  # the stand-in does not know pytest: exit 99, recorded, not fatal
    calls = (tmp_path / "calls.txt").read_text().splitlines()
    pytest_call = [c for c in calls if c.startswith("-m pytest")]
    assert pytest_call and "-m gpu" in pytest_call[0] and " -n " not in pytest_call[0]
    assert f"--junitxml {out / 'tests.xml'}" in pytest_call[0]
    assert proc.returncode == 1


@pytest.mark.parametrize("args", [[], [""], ["a", "b"]])
def test_usage_error_exits_2(args):
    proc = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "usage: bash bench/gpu_check.sh OUT_DIR" in proc.stderr


def test_the_gpu_benchmarks_run_on_the_cpu_in_smoke_mode(tmp_path):
    """Every line of bench/run.py's kernel benchmarks (W8A8 GEMM with the CUDA C++ beside Triton
    where built, attention, the reconstruction step, quantization), on tiny shapes through
    Triton's CPU interpreter: a benchmark broken by a change fails here, not on the GPU day."""
    pytest.importorskip("triton")
    out = tmp_path / "smoke.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "run.py"), "--sections", "kernels", "--smoke",
                           "--reps", "1", "--json", str(out)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    names = [r["name"] for r in json.loads(out.read_text())["records"]]
    assert not [n for n in names if n.endswith("_error")], proc.stdout[-3000:]
    for name in ("kernel:w8a8_linear", "kernel:quant_attention", "recon_step", "target:recon_step",
                 "kernel:quantize_per_token_int8"):
        assert name in names, (name, names)
