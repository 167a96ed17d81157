#!/usr/bin/env bash
# One device call: the quantization kernels' benchmarks (issue #18), each under its own timeout.
# Usage: OUT=/dir scripts/gpu/round_quant_kernels.sh
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/fuselm-gpu}; mkdir -p "$OUT"
export PYTHONPATH="/tmp/site:$PWD/src:$PWD" PYTHONUNBUFFERED=1 MAX_JOBS=16
export TORCH_EXTENSIONS_DIR=/tmp/torch_ext NCCL_NVLS_ENABLE=0
step() { local name=$1 t=$2; shift 2; echo "=== $name ($(date +%T))"; \
  timeout "$t" "$@" > "$OUT/$name.log" 2>&1; echo "=== $name rc=$? ($(date +%T))"; tail -c 6000 "$OUT/$name.log"; }
step wheels 100 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
step env 30 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; git log -1 --format=%H; git status --short | head -30"
step kquant ${T_KQ:-230} python -m fuselm.bench.kernels_quant --output-dir "$OUT/kq" --configs-dir "$OUT/kq/configs" --budget-s ${KQ_BUDGET:-150}
step kfp8 ${T_FP8:-200} python -m fuselm.bench.kernels_fp8 --output-dir "$OUT/fp8" --configs-dir "$OUT/fp8/configs"
step kvfp8 ${T_KV:-90} python scripts/bench_kv_fp8.py --quick --json "$OUT/kv_fp8.json"
