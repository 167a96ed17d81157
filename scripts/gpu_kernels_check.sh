#!/usr/bin/env bash
# Kernel part of the one GPU call (scripts/gpu_check.sh runs it): build the CUDA extension, run
# tests/kernels on the GPU (bf16 full sizes, launch counts, opcheck, and the CPU suite's small
# shapes on CUDA), run `fuselm bench kernels`.
#
# Usage, from the repo root:  OUT=/some/dir scripts/gpu_kernels_check.sh
# Every step has a timeout; a failed step does not stop the later ones. Writes two files under
# $OUT: kernels.log (every step's full output) and kernels_results.tar.gz (bench .md/.json,
# tuning tables, pytest junit xml). Prints a short summary last. Exit status 1 if a step failed.
# Knobs: KERNELS_BENCH_PRESET (full|quick, default full), KERNELS_BENCH_ARGS (extra flags),
# MAX_JOBS (default 16), PYTHON (default python3).
set -u

OUT=${OUT:-out}
mkdir -p "$OUT"
LOG="$OUT/kernels.log"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export MAX_JOBS=${MAX_JOBS:-16}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$WORK/torch_extensions}
SUMMARY=()
FAILED=0

# step NAME SECONDS CMD...: runs CMD under timeout, output appended to the log.
step() {
  local name=$1 limit=$2
  shift 2
  echo "=== [$name] $(date +%T) timeout ${limit}s: $*" >>"$LOG"
  local start=$SECONDS
  timeout --kill-after=15 "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  local verdict="ok"
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then verdict="TIMEOUT"; elif [ "$rc" -ne 0 ]; then verdict="FAILED rc=$rc"; fi
  [ "$verdict" = "ok" ] || FAILED=1
  echo "=== [$name] $verdict after $((SECONDS - start))s" >>"$LOG"
  SUMMARY+=("$(printf '%-14s %-14s %4ss' "$name" "$verdict" "$((SECONDS - start))")")
  return "$rc"
}

: >"$LOG"
step env 60 bash -c "nvidia-smi; $PY -c 'import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__, torch.cuda.get_device_name())'; nvcc --version | tail -1; $PY -c 'import ninja; print(\"ninja\", ninja.__version__)'"

# Ahead-of-time build (sm_80, sm_89, sm_90a) into src/fuselm/_C*.so; if it fails, the loader
# falls back to a just-in-time build for this GPU only, which the next step reports.
step build_aot 420 "$PY" setup.py build_ext --inplace
step extension 420 "$PY" -c "
from fuselm.kernels import _extension, available_backends
print('extension:', _extension.extension_status())
for op in ('rms_norm', 'fused_add_rms_norm', 'silu_and_mul', 'rotary_store_kv'):
    print(op, available_backends(op))
assert _extension.load_extension() is not None, 'CUDA extension unavailable'
"

step pytest 540 "$PY" -m pytest tests/kernels -q -rfEs -p no:cacheprovider \
  --junitxml="$WORK/kernels-junit.xml"
PYTEST_LINE=$(grep -E "^(=+ )?[0-9]+ (passed|failed).* in [0-9.]+s" "$LOG" | tail -1)

mkdir -p "$WORK/perf"
# shellcheck disable=SC2086
step bench 540 "$PY" -m fuselm.bench.kernels --preset "${KERNELS_BENCH_PRESET:-full}" \
  --output-dir "$WORK/perf" ${KERNELS_BENCH_ARGS:-}

cp src/fuselm/kernels/configs/*.json "$WORK/perf/" 2>/dev/null
tar -czf "$OUT/kernels_results.tar.gz" -C "$WORK" perf $(cd "$WORK" && ls kernels-junit.xml 2>/dev/null) \
  >>"$LOG" 2>&1

echo "---- kernels check summary (full log: $LOG) ----"
printf '%s\n' "${SUMMARY[@]}"
echo "extension: $(grep -m1 '^extension:' "$LOG" | cut -d' ' -f2-)"
echo "pytest: ${PYTEST_LINE:-no summary line}"
grep -E "^FAILED|^ERROR" "$LOG" | head -20
# the bench's targets table (printed last by the bench) and where its files went
awk '/^op +shape +backend +metric/{p=1} p' "$LOG" | head -20
exit "$FAILED"
