#!/usr/bin/env bash
# Every GPU number in one command, on a bare GPU machine with no network:
#
#   bash bench/gpu_check.sh OUT_DIR
#
# Run from anywhere; it works in the repository it belongs to. Every log and JSON goes
# straight into OUT_DIR (seven files, so that a device that brings back at most eight
# returns them all):
#
#   gpu_check.log  every step's output       env.json     device, versions, backends
#   summary.json   each step: status, time   kernels.json bench/run.py --sections kernels
#   e2e.json       ViT-B end to end          tests.xml    the GPU tests (JUnit)
#   dinov2.json    dinov2-s14-fmnist accuracy of the deployed GPU backends (with the kit)
#
# Key numbers first: build the CUDA extension (not the CPU one), the kernel benchmarks
# (target:w8a8_gemm, target:attention, target:recon_step; CUDA C++ beside Triton), ViT-B
# end to end at batches 1, 8, 64 (target:gpu_e2e_w8a8), every test marked `gpu` (without
# -x, in parallel when pytest-xdist is there), then dinov2's accuracy when the kit's data
# is there. Each step runs under its own cap and all of them under one deadline
# (GPU_CHECK_DEADLINE seconds, default 480); a step that fails or runs out of time is
# recorded and the next one starts. Exit status: 0 when every step passed, 1 otherwise,
# 2 for a usage error.
#
# The kit (`make gpu-kit`, folder .gpu/ or FASTQUANT_GPU_KIT) carries what the machine
# lacks: the DINOv2 backbone in fp16 (FASTQUANT_CACHE), the Fashion-MNIST files the GPU
# steps read (FASTQUANT_FMNIST), and a timm wheel installed only when the machine's timm
# is older than fastquant needs.
#
# Settings (environment): FASTQUANT_PYTHON (default python3), GPU_CHECK_DEADLINE (s, 480),
# GPU_CHECK_MIN_STEP (a step starts only with this many seconds left, default 20),
# FASTQUANT_GPU_KIT (default .gpu), GPU_CHECK_TEST_WORKERS (pytest-xdist workers, 8).
set -u

if [ $# -ne 1 ] || [ -z "$1" ]; then
  echo "usage: bash bench/gpu_check.sh OUT_DIR" >&2
  exit 2
fi
mkdir -p "$1" || { echo "gpu_check: cannot create $1" >&2; exit 2; }
OUT=$(cd "$1" && pwd)
cd "$(dirname "$0")/.." || exit 2
ROOT=$(pwd)

PY=${FASTQUANT_PYTHON:-python3}
DEADLINE=${GPU_CHECK_DEADLINE:-480}
MIN_STEP=${GPU_CHECK_MIN_STEP:-20}
KIT=${FASTQUANT_GPU_KIT:-$ROOT/.gpu}
WORKERS=${GPU_CHECK_TEST_WORKERS:-8}
TIMM_FLOOR=1.0.26  # keep in step with pyproject.toml
LOG=$OUT/gpu_check.log
SUMMARY=$OUT/summary.json
STEPS=()
FAILED=0
: >"$LOG"
export PYTHONUNBUFFERED=1

say() { echo "$*" | tee -a "$LOG"; }

write_summary() {  # summary.json from the steps so far (rewritten after every step)
  local IFS=,
  printf '{"deadline_s": %s, "elapsed_s": %s, "python": "%s", "kit": "%s", "steps": [%s]}\n' \
    "$DEADLINE" "$SECONDS" "$PY" "$KIT_STATE" "${STEPS[*]}" >"$SUMMARY.partial" && mv "$SUMMARY.partial" "$SUMMARY"
}

record() {  # record NAME STATUS RC SECONDS CAP NOTE
  STEPS+=("{\"step\": \"$1\", \"status\": \"$2\", \"rc\": $3, \"seconds\": $4, \"cap_s\": $5, \"note\": \"$6\"}")
  case $2 in ok|skipped) ;; *) FAILED=1 ;; esac
  write_summary
}

step() {  # step NAME CAP COMMAND...: run under min(CAP, time left), output to the log and stdout
  local name=$1 cap=$2
  shift 2
  local left=$((DEADLINE - SECONDS))
  if [ "$left" -lt "$MIN_STEP" ]; then
    say "== $name: skipped ($left s left before the deadline)"
    record "$name" skipped 0 0 "$cap" "deadline"
    return 1
  fi
  [ "$cap" -gt "$left" ] && cap=$left
  say "== $name (at most ${cap} s): $*"
  local start=$SECONDS
  # timeout signals the command's whole process group (pytest-xdist workers, ninja jobs).
  timeout --kill-after=5 "$cap" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]} took=$((SECONDS - start)) status=ok
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    status=timeout
  elif [ "$rc" -ne 0 ]; then
    status=failed
  fi
  say "== $name: $status (exit $rc) after $took s"
  record "$name" "$status" "$rc" "$took" "$cap" ""
  [ "$status" = ok ]
}

skip() {  # skip NAME REASON
  say "== $1: skipped ($2)"
  record "$1" skipped 0 0 0 "$2"
}

# -- the kit ------------------------------------------------------------------------------
KIT_STATE=absent
if [ -d "$KIT" ]; then
  KIT_STATE=present
  [ -d "$KIT/fmnist" ] && export FASTQUANT_FMNIST="$KIT/fmnist"
  [ -d "$KIT/cache" ] && export FASTQUANT_CACHE="$KIT/cache"
fi
say "gpu_check: out $OUT, deadline $DEADLINE s, python $PY, kit $KIT ($KIT_STATE)"
write_summary

# timm: the machine's, unless it is older than fastquant needs and the kit has a wheel.
timm_ok() {
  "$PY" - "$TIMM_FLOOR" <<'EOF' 2>/dev/null
import sys
import timm
have = tuple(int(p) for p in timm.__version__.split("+")[0].split(".")[:3] if p.isdigit())
need = tuple(int(p) for p in sys.argv[1].split("."))
print(f"timm {timm.__version__} (fastquant needs >= {sys.argv[1]})")
sys.exit(0 if have >= need else 1)
EOF
}
if timm_msg=$(timm_ok); then
  say "$timm_msg"
elif ls "$KIT"/wheels/timm-*.whl >/dev/null 2>&1; then
  if step timm_wheel 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/fastquant-site \
      "$KIT"/wheels/timm-*.whl; then
    export PYTHONPATH=/tmp/fastquant-site${PYTHONPATH:+:$PYTHONPATH}
  fi
else
  say "warning: timm is missing or older than $TIMM_FLOOR ($timm_msg) and the kit has no timm wheel"
fi

# -- 1. build: the CUDA extension (not the CPU one); without it, Triton alone ---------------
if ! step build 240 env FASTQUANT_CUDA=1 FASTQUANT_CPU_EXT=0 MAX_JOBS="${MAX_JOBS:-16}" \
    "$PY" -m pip install -e . --no-build-isolation --no-deps --no-index; then
  step build_without_cuda_ext 90 env FASTQUANT_CUDA=0 FASTQUANT_CPU_EXT=0 \
    "$PY" -m pip install -e . --no-build-isolation --no-deps --no-index
fi
step env 60 "$PY" bench/gpu_report.py env "$OUT/env.json"

# -- 2. the kernel benchmarks, 3. ViT-B end to end -----------------------------------------
step kernels 150 "$PY" bench/run.py --sections kernels --reps 20 --json "$OUT/kernels.json"
step e2e 120 "$PY" bench/run.py --sections e2e --models vit_base_patch16_224 --batches 1,8,64 --reps 10 \
  --eval-size 0 --json "$OUT/e2e.json"

# -- 4. every GPU test, in parallel where pytest-xdist is there ----------------------------
PARALLEL=()
if "$PY" -c "import xdist" 2>/dev/null; then PARALLEL=(-n "$WORKERS"); fi
TIMEOUT_OPT=()
if "$PY" -c "import pytest_timeout" 2>/dev/null; then TIMEOUT_OPT=(--timeout 150); fi
step tests 180 "$PY" -m pytest -q -m gpu -rs "${PARALLEL[@]}" "${TIMEOUT_OPT[@]}" -p no:cacheprovider \
  --junitxml "$OUT/tests.xml" tests

# -- 5. dinov2-s14-fmnist accuracy of the deployed GPU backends (needs the kit's data) ------
if "$PY" bench/gpu_report.py has-dinov2-data >>"$LOG" 2>&1; then
  step dinov2 120 "$PY" bench/run.py --sections e2e --models dinov2-s14-fmnist --batches 64 --reps 5 \
    --eval-size 2000 --json "$OUT/dinov2.json"
else
  skip dinov2 "no DINOv2 weights or Fashion-MNIST here (make gpu-kit)"
fi

write_summary
"$PY" bench/gpu_report.py summary "$OUT" 2>&1 | tee -a "$LOG"
say "gpu_check: done in $SECONDS s; $( [ "$FAILED" -eq 0 ] && echo "every step passed" || echo "some steps failed" )"
exit "$FAILED"
