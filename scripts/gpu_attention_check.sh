#!/usr/bin/env bash
# Attention part of the GPU check (issue 4): the `gpu` tests of prefill and paged attention, then
# the attention benchmark with its Triton config sweep. Every step runs under `timeout`, logs to
# $OUT/attention/<step>.log and prints its tail; the script goes on after a failed step and exits
# 1 if any failed. Results: $OUT/attention/attention-<gpu>.json (written after every case),
# junit.xml, and the tuning tables the sweep picked in $OUT/attention/configs/<op>.json (copy
# them into src/fuselm/kernels/configs/ to make them the defaults).
#
# Budgets (seconds) can be overridden: ATTN_BUILD_TIMEOUT, ATTN_TEST_TIMEOUT, ATTN_BENCH_TIMEOUT;
# ATTN_BENCH_ARGS adds flags to the benchmark (e.g. "--preset quick" or "--no-sweep").
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/fuselm-gpu-check}
LOG="$OUT/attention"
mkdir -p "$LOG"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/torch_extensions}
status=0

step() {  # step NAME TIMEOUT_S CMD...
  local name=$1 limit=$2 start rc
  shift 2
  echo "=== $name (timeout ${limit}s): $*"
  start=$(date +%s)
  timeout --kill-after=15 "$limit" "$@" >"$LOG/$name.log" 2>&1
  rc=$?
  echo "=== $name: rc=$rc after $(($(date +%s) - start))s$([ $rc -eq 124 ] && echo ' (TIMED OUT)')"
  tail -n 40 "$LOG/$name.log"
  [ $rc -eq 0 ] || status=1
}

nvidia-smi >"$LOG/nvidia-smi.txt" 2>&1 || true
step env 60 python -c "import torch, triton; print(torch.__version__, triton.__version__, \
torch.version.cuda, torch.cuda.get_device_name(), torch.backends.cudnn.version())"
# Builds (or loads) the CUDA extension once, so the tests below time nothing but themselves.
step cuda_build "${ATTN_BUILD_TIMEOUT:-300}" python -c "from fuselm.kernels import _extension as e; \
from fuselm.kernels import available_backends as a; print(e.extension_status()); \
print('paged_attention backends:', a('paged_attention')); \
print('prefill_attention backends:', a('prefill_attention'))"
step tests "${ATTN_TEST_TIMEOUT:-300}" python -m pytest -m gpu -q -rA --durations=15 \
  --junitxml="$LOG/junit.xml" tests/kernels/test_prefill_attention.py \
  tests/kernels/test_paged_attention.py
# shellcheck disable=SC2086
step bench "${ATTN_BENCH_TIMEOUT:-360}" python -m fuselm.bench.kernels_attention --preset full \
  --output-dir "$LOG" --configs-dir "$LOG/configs" ${ATTN_BENCH_ARGS:-}
echo "=== attention check: $([ $status -eq 0 ] && echo PASSED || echo FAILED); logs in $LOG"
exit $status
