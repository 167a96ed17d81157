#!/usr/bin/env bash
# One device call: the CUDA extension build, every `gpu` test, and the structured-output step
# with word-like content; each under its own timeout, logs in $OUT.
# Usage: OUT=/dir scripts/gpu/round_validate.sh
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/fuselm-gpu}; mkdir -p "$OUT"
export PYTHONPATH="/tmp/site:$PWD/src:$PWD" PYTHONUNBUFFERED=1 MAX_JOBS=16
export TORCH_EXTENSIONS_DIR=/tmp/torch_ext NCCL_NVLS_ENABLE=0
step() { local name=$1 t=$2; shift 2; echo "=== $name ($(date +%T))"; \
  timeout "$t" "$@" > "$OUT/$name.log" 2>&1; echo "=== $name rc=$? ($(date +%T))"; \
  tail -c "${TAIL:-1500}" "$OUT/$name.log"; }
step wheels 60 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
  --target /tmp/site .whl/*.whl
step build "${T_BUILD:-180}" python -c "from fuselm.kernels import extension as e; \
  e.load_extension(); print(e.extension_status())"
TAIL=5000 step tests "${T_TESTS:-270}" python -m pytest -m gpu -q -p no:cacheprovider -rfE \
  --continue-on-collection-errors --junitxml="$OUT/junit.xml" --durations=15 tests
step structured-text "${T_STRUCT:-80}" python scripts/bench_structured.py step \
  --shape llama-3-8b --batch-size 64 --max-tokens 64 --content text \
  --tokenizer-json build/tok/llama3.json
