#!/usr/bin/env bash
# Distributed inference on 2 GPUs (issue 7), one device call: environment, the distributed tests,
# then scripts/bench_distributed.py (Llama-3-8B shape, bf16, dummy weights, TP=1 in the same run):
# custom one-shot (+ add + RMSNorm) vs NCCL all-reduce, TP=1/TP=2 (NCCL; custom)/PP=2 batch-1
# decode (with the all-reduce share),
# PP=2 vs TP=1 offline throughput, TP=1 vs TP=2 greedy tokens, and the report.
# Each step runs under `timeout`; logs and JSON go to $OUT.
# Usage (repo root): OUT=/dir scripts/gpu_distributed_check.sh [steps...]
#   steps: env fused-table tests allreduce layerchain decode decode-chained decode-pp tput tput512
#   tput1024 tokens report (default: all but fused-table, layerchain, decode-chained, tput512
#   and tput1024;
#   pack (last) leaves only $OUT/results.tgz (the device returns a few files a call);
#   fused-table times the fused batch-1 projections on this GPU and writes the package's gemv
#   table on the device, so that later steps of the call use them; $OUT/gemv.json to commit)
#   budgets: STEP_TIMEOUT_<STEP>=seconds
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/fuselm-distributed}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
STEPS=${*:-env tests allreduce decode decode-pp tput tokens report}
BENCH="python scripts/bench_distributed.py"
status=0

# shellcheck source=scripts/lib_steps.sh
source scripts/lib_steps.sh  # run from the repo root (cd above)

for step in $STEPS; do
  case $step in
    env) run_step env 60 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version \
      --format=csv; nvidia-smi topo -m; python -c 'import torch; print(torch.__version__, \
      torch.version.cuda, torch.cuda.device_count(), torch.cuda.get_device_name())'; \
      git log -1 --format=%H 2>/dev/null || true" ;;
    fused-table)
      run_step fused-table 300 python -m fuselm.bench.kernels_gemv --shapes fused \
        --output-dir "$OUT"
      cp src/fuselm/kernels/configs/gemv.json "$OUT/gemv.json" ;;
    tests) run_step tests 600 env OMP_NUM_THREADS=1 python -m pytest -q -p no:cacheprovider \
      -rfE -m gpu --durations=8 tests/distributed tests/kernels/test_all_reduce.py ;;
    allreduce) run_step allreduce 300 python -m torch.distributed.run --nproc-per-node 2 \
      scripts/bench_distributed.py allreduce --out "$OUT" ;;
    decode)
      run_step decode-tp1 420 $BENCH decode --tp 1 --profile --out "$OUT"
      run_step decode-tp2 420 $BENCH decode --tp 2 --profile --out "$OUT"
      run_step decode-tp2-oneshot 420 $BENCH decode --tp 2 --one-shot --profile --out "$OUT" ;;
    layerchain) run_step layerchain 300 python -m torch.distributed.run --nproc-per-node 2 \
      scripts/bench_distributed.py layerchain --out "$OUT" --write-configs "$OUT/configs" ;;
    decode-chained)  # TP=1 and TP=2 with the gemv configs layerchain picked
      run_step decode-tp1-chained 420 env FUSELM_KERNEL_CONFIGS="$OUT/configs" $BENCH decode \
        --tp 1 --out "$OUT" --json "$OUT/decode-tp1-chained.json"
      run_step decode-tp2-chained 420 env FUSELM_KERNEL_CONFIGS="$OUT/configs" $BENCH decode \
        --tp 2 --one-shot --profile --out "$OUT" --json "$OUT/decode-tp2-chained.json" ;;
    decode-pp) run_step decode-pp2 420 $BENCH decode --pp 2 --out "$OUT" ;;
    tput)
      run_step tput-tp1 600 $BENCH throughput --tp 1 --out "$OUT"
      run_step tput-pp2 600 $BENCH throughput --pp 2 --out "$OUT"
      run_step tput-pp2-mb3 600 $BENCH throughput --pp 2 --micro-batches 3 --out "$OUT" ;;
    tput512)  # a stage holds half the weights: room for twice the sequences
      run_step tput-tp1-512 600 $BENCH throughput --tp 1 --max-num-seqs 512 --out "$OUT"
      run_step tput-pp2-512 600 $BENCH throughput --pp 2 --max-num-seqs 512 --out "$OUT" ;;
    tput1024)  # every request admitted at once (vLLM's offline default on 80+ GB GPUs)
      run_step tput-tp1-1024 600 $BENCH throughput --tp 1 --max-num-seqs 1024 --out "$OUT"
      run_step tput-pp2-1024 600 $BENCH throughput --pp 2 --max-num-seqs 1024 --out "$OUT" ;;
    tokens) run_step tokens 600 $BENCH tokens --out "$OUT" ;;
    report) run_step report 60 $BENCH report --out "$OUT" ;;
    pack) pack_out || status=1 ;;
  esac
done
exit $status
