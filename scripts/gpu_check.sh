#!/usr/bin/env bash
# The one GPU call: environment, CUDA extension (JIT, this GPU's arch only), every `gpu` test,
# the kernel benchmarks and the engine benchmark. Each step has its own timeout; logs go to $OUT.
# Usage (repo root): OUT=/dir scripts/gpu_check.sh [steps...]   steps: env build tests kbench
#                    abench gemv latency gap engine pack (default: all; pack, last, leaves only
#                    $OUT/results.tgz: the device returns a few files). Budgets: STEP_TIMEOUT_<STEP>.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/fuselm-gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export MAX_JOBS=${MAX_JOBS:-16} NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/build/torch_extensions}
STEPS=${*:-env build tests kbench abench gemv latency gap engine pack}
status=0

# shellcheck source=scripts/lib_steps.sh
source scripts/lib_steps.sh  # run from the repo root (cd above)

for step in $STEPS; do
  case $step in
    env) run_step env 60 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version \
      --format=csv; python -c 'import torch, triton, transformers; print(torch.__version__, \
      torch.version.cuda, triton.__version__, transformers.__version__, \
      torch.cuda.get_device_name())'; git log -1 --format=%H 2>/dev/null || true" ;;
    build) run_step build 300 python -c "from fuselm.kernels import _extension as e; \
      e.load_extension(); print(e.extension_status())" ;;
    tests) run_step tests 420 python -m pytest -m gpu -q -p no:cacheprovider -rfE \
      --continue-on-collection-errors \
      --durations=10 ${GPU_TESTS:-tests/kernels tests/engine tests/models} ;;
    kbench) run_step kbench 300 python -m fuselm.bench.kernels --preset quick --no-sweep \
      --output-dir "$OUT" ${KBENCH_ARGS:-} ;;
    abench) run_step abench 300 python -m fuselm.bench.kernels_attention --preset full \
      --output-dir "$OUT" --configs-dir "$OUT/configs" ;;
    gemv) run_step gemv 240 python -m fuselm.bench.kernels_gemv --output-dir "$OUT" \
      --configs-dir "$OUT/configs" ;;
    latency) run_step latency 240 bash -c "python -c 'from fuselm.bench.dummy_model import \
      write_dummy_checkpoint as w; w(\"llama-3-8b\", __import__(\"pathlib\").Path(\"build/l8b\"))' \
      && python -m fuselm bench latency --model build/l8b --load-format dummy --batch-size 1 8 \
      --input-len 128 --output-len 32 --num-iters-warmup 1 --num-iters 2 --compare hf \
      --disable-detokenize --max-model-len 4096 --output-json $OUT/latency.json \
      --plot $OUT/latency.png --disable-tqdm" ;;
    gap) run_step gap 60 python scripts/graph_kernel_gap.py ;;
    engine) run_step engine 480 python scripts/bench_engine.py --out "$OUT" ${ENGINE_ARGS:-} ;;
    pack) pack_out || status=1 ;;  # last: only $OUT/results.tgz remains
  esac
done
exit $status
