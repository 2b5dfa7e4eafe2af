#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in one run: build the CUDA extension, run the GPU
# tests, then the GPU benchmarks. Each step's output goes to OUT_DIR (default
# bench/results/gpu), and a failing step does not stop the ones after it.
#
#   bash bench/gpu_check.sh [OUT_DIR]
#
# Assumes torch with CUDA, Triton, timm and pytest are installed (no package index is
# needed: the project installs with --no-build-isolation).
set -u
OUT_DIR=${1:-bench/results/gpu}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python}
status=0

step() {  # step NAME COMMAND...: run, tee to OUT_DIR/NAME.log, remember a failure
  local name=$1
  shift
  echo "== $name: $*"
  local start=$SECONDS
  "$@" 2>&1 | tee "$OUT_DIR/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - start)) s"
  [ "$rc" -eq 0 ] || status=1
}

step build env FASTQUANT_CUDA=1 "$PY" -m pip install -e . --no-build-isolation --no-deps -q
step backends "$PY" -c "import json, fastquant.backends as b; print(json.dumps(b.describe(), indent=1))"
step gpu_tests "$PY" -m pytest -q -x tests/test_cuda_ext.py tests/test_kernels_int8.py tests/test_kernels_int8_linear.py \
    tests/test_kernels_attention.py tests/test_kernels_fq_linear.py tests/test_kernels_fq_attention.py \
    tests/test_deploy.py -k "gpu or cuda or GPU"
step bench_kernels "$PY" bench/run.py --sections kernels --reps 20 --json "$OUT_DIR/run_cuda_kernels.json"
step bench_e2e "$PY" bench/run.py --sections e2e --models vit_base_patch16_224,dinov2-s14-fmnist --batches 1,8,64 \
    --eval-size 2000 --json "$OUT_DIR/run_cuda_e2e.json"
exit $status
