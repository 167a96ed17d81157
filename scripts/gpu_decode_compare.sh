#!/usr/bin/env bash
# Batch-1/8 decode through the engine in one run: cuBLAS against the tuned Triton gemv for the
# batch-1 linear layers, each with synchronous and async scheduling. The gemv sweep writes its
# table to $OUT/configs first; the cuBLAS runs go before it is installed into the package.
# Usage (repo root): OUT=/dir scripts/gpu_decode_compare.sh   (budgets: STEP_TIMEOUT_<STEP>)
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/fuselm-gpu}
mkdir -p "$OUT/configs"
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/build/torch_extensions}
status=0
# shellcheck source=scripts/lib_steps.sh
source scripts/lib_steps.sh

run_step gemv 300 python -m fuselm.bench.kernels_gemv --output-dir "$OUT" \
  --configs-dir "$OUT/configs"
decode() {  # $1 = tag
  for mode in sync async; do
    local flag=--no-async-scheduling
    [ "$mode" = async ] && flag=--async-scheduling
    run_step "decode-$1-$mode" 150 python scripts/bench_engine.py --decode-only --skip-hf \
      --skip-startup --out "$OUT" --tag="-$1-$mode" $flag
  done
}
rm -f src/fuselm/kernels/configs/gemv.json
decode cublas
if [ -f "$OUT/configs/gemv.json" ]; then
  cp "$OUT/configs/gemv.json" src/fuselm/kernels/configs/gemv.json
  decode gemv
fi
exit $status
