#!/usr/bin/env bash
# The one GPU entry script: environment, CUDA extension build, every `gpu` test, the kernel
# benchmarks, the engine benchmark; an A/B of the engine benchmark on two trees; the 2-GPU runs.
# Each step runs under its own `timeout`, logs to $OUT/<step>.log and prints its tail; a failed
# step does not stop the later ones, and the script exits 1 if any failed.
#
# Usage (repo root or anywhere):  OUT=/dir scripts/gpu/run.sh [steps...]
#   steps: wheels env build tests kbench abench gemv kquant kgguf ncu latency gap engine structured quant profile fp8e2e ab dist pack
#   default: wheels env build tests kbench abench gemv latency gap engine pack
#     wheels   installs the wheels in .whl/ (packages the device image lacks: FastAPI, uvicorn,
#              xgrammar, gguf, jsonschema, ...; see docs/perf/README.md) into /tmp/site, on
#              PYTHONPATH for the later steps; nothing when there is no .whl/
#     env      GPU, driver, torch/triton/transformers versions, commit
#     build    the CUDA extension (JIT, this GPU's arch only)
#     tests    pytest -m gpu over $GPU_TESTS (default: tests/)
#     kbench   fuselm bench kernels (--preset quick --no-sweep; KBENCH_ARGS adds flags)
#     abench   attention kernels with their config sweep
#     gemv     batch-1 gemv against cuBLAS (tables to $OUT/configs, never into the package)
#     kquant   fuselm.bench.kernels_quant (KQUANT_ARGS, default --quick; tables to $OUT/configs)
#     kgguf    fuselm.bench.kernels_gguf (KGGUF_ARGS, default --batches 1,4,16 --budget-s 120;
#              tables to $OUT/configs): the GGUF packed matmuls, the CUDA GEMV's launches swept
#     ncu      Nsight Compute sections of the CUDA weight-only GEMV for each of NCU_CASES
#              (';'-separated argument lists of scripts/ncu_quant_gemv.py)
#     latency  fuselm bench latency, Llama-3-8B shape, dummy weights, against HF
#     gap      the CUDA graph's per-kernel gap (scripts/graph_kernel_gap.py)
#     engine   scripts/bench_engine.py (ENGINE_ARGS adds flags)
#     structured  the structured-output mask: xgrammar's fill alone, then the 8B-shape step with
#              and without masks (TOKENIZER_JSON: Llama 3's tokenizer, default build/tok/llama3.json)
#     quant    fuselm bench latency, 8B shape, dummy weights, bf16 and QUANT_METHODS (int4 int8
#              fp8) over QUANT_BATCHES (1 4 16 64 256): $OUT/quant-<method>.json; then dummy
#              GGUF files of the QUANT_GGUF types (e.g. Q4_K Q8_0), kept packed: $OUT/quant-gguf-<type>.json
#     profile  fuselm profile, 8B shape, dummy weights, PROFILE_BATCH (1) rows, for each of
#              PROFILE_METHODS (none int8 int4 fp8): $OUT/profile-<q>.json (top kernels, idle)
#     fp8e2e   8B shape, dummy weights, FP8E2E_METHODS (none fp8; fp8kv: fp8 weights and KV
#              cache, throughput only): fuselm bench throughput (FP8E2E_PROMPTS,
#              default 2000, 256 in / 256 out) and the time to first token of one 4096-token
#              prompt (fuselm bench latency): $OUT/tput-<q>.json, $OUT/ttft-<q>.json
#     ab       scripts/bench_engine.py on the baseline AB_BASE (a commit, default HEAD, checked out
#              with `git worktree` into a temp dir; or AB_BASE_DIR, a tree already there) and on
#              this tree, interleaved for AB_ROUNDS (2) rounds in one call; prints the medians of
#              AB_KEYS (b1_ms b8_ms b1_gbs) of both and work / base ($OUT/ab.txt).
#              AB_BENCH replaces the command (default: the engine bench, decode only);
#              AB_DRY=1 only summarises the JSON already in $OUT.
#     dist     the 2-GPU runs, sub-steps DIST_STEPS (default: tests allreduce decode decode-pp
#              tput tokens report; also: fused-table layerchain tput512 tput1024)
#     pack     (last) leaves only $OUT/results.tgz: the device returns a few files a call
#   Budgets: STEP_TIMEOUT_<STEP>=seconds (dashes as underscores, e.g. STEP_TIMEOUT_DIST_TPUT_TP1).
#   Copy kernel tuning tables from $OUT/configs into src/fuselm/kernels/configs/ only on purpose
#   (or run fuselm bench kernels --write-package-configs); FUSELM_KERNEL_CONFIGS=$OUT/configs
#   makes a run read them.
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/fuselm-gpu}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export MAX_JOBS=${MAX_JOBS:-16} NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/build/torch_extensions}
STEPS=${*:-wheels env build tests kbench abench gemv latency gap engine pack}
status=0

# shellcheck source=scripts/gpu/lib_steps.sh
source scripts/gpu/lib_steps.sh

ab() {  # the engine benchmark on the baseline tree and on this one, round after round
  local tree=${AB_BASE_DIR:-} wt="" k side dir
  local bench=${AB_BENCH:-python scripts/bench_engine.py --decode-only --skip-hf --skip-startup}
  if [ -z "${AB_DRY:-}" ]; then
    if [ -z "$tree" ]; then
      wt=$(mktemp -d)
      if ! git worktree add --detach "$wt/base" "${AB_BASE:-HEAD}" >"$OUT/ab-worktree.log" 2>&1
      then
        echo "=== ab: git worktree add ${AB_BASE:-HEAD} failed (no .git here? set AB_BASE_DIR)"
        cat "$OUT/ab-worktree.log"
        status=1
        return
      fi
      tree=$wt/base
    fi
    tree=$(cd "$tree" && pwd)
    echo "=== ab: base $tree ($(git -C "$tree" log -1 --format=%h 2>/dev/null || echo tree))," \
      "work $PWD"
    for k in $(seq 1 "${AB_ROUNDS:-2}"); do
      for side in base work; do
        dir=$PWD
        [ "$side" = base ] && dir=$tree
        mkdir -p "$OUT/ab-$side-r$k"
        # shellcheck disable=SC2086  # AB_BENCH is a command line
        run_step "ab-$side-r$k" 300 env -C "$dir" PYTHONPATH="$dir/src" \
          TORCH_EXTENSIONS_DIR="$dir/build/torch_extensions" $bench --out "$OUT/ab-$side-r$k"
      done
    done
    if [ -n "$wt" ]; then
      git worktree remove --force "$wt/base" && rmdir "$wt"
    fi
  fi
  # shellcheck disable=SC2086
  ab_summary "$OUT" ${AB_KEYS:-b1_ms b8_ms b1_gbs}
}

dist() {  # 2 GPUs: Llama-3-8B shape, bf16, dummy weights; TP=1 in the same run
  local BENCH="python scripts/bench_distributed.py" s
  local RUN2="python -m torch.distributed.run --nproc-per-node 2 scripts/bench_distributed.py"
  for s in ${DIST_STEPS:-tests allreduce decode decode-pp tput tokens report}; do
    case $s in
      tests) run_step dist-tests 600 env OMP_NUM_THREADS=1 python -m pytest -q \
        -p no:cacheprovider -rfE -m gpu --durations=8 tests/distributed \
        tests/kernels/test_all_reduce.py ;;
      fused-table)  # the fused batch-1 projections' table, used by the later sub-steps
        run_step dist-fused-table 300 python -m fuselm.bench.kernels_gemv --shapes fused \
          --output-dir "$OUT" --configs-dir "$OUT/configs"
        export FUSELM_KERNEL_CONFIGS="$OUT/configs" ;;
      allreduce) run_step dist-allreduce 300 $RUN2 allreduce --out "$OUT" ;;
      layerchain) run_step dist-layerchain 300 $RUN2 layerchain --out "$OUT" \
        --write-configs "$OUT/configs" ;;
      decode)
        run_step dist-decode-tp1 420 $BENCH decode --tp 1 --profile --out "$OUT"
        run_step dist-decode-tp2 420 $BENCH decode --tp 2 --profile --out "$OUT"
        run_step dist-decode-tp2-oneshot 420 $BENCH decode --tp 2 --one-shot --profile \
          --out "$OUT" ;;
      decode-pp) run_step dist-decode-pp2 420 $BENCH decode --pp 2 --out "$OUT" ;;
      tput)
        run_step dist-tput-tp1 600 $BENCH throughput --tp 1 --out "$OUT"
        run_step dist-tput-pp2 600 $BENCH throughput --pp 2 --out "$OUT"
        run_step dist-tput-pp2-mb3 600 $BENCH throughput --pp 2 --micro-batches 3 --out "$OUT" ;;
      tput512)  # a stage holds half the weights: room for twice the sequences
        run_step dist-tput-tp1-512 600 $BENCH throughput --tp 1 --max-num-seqs 512 --out "$OUT"
        run_step dist-tput-pp2-512 600 $BENCH throughput --pp 2 --max-num-seqs 512 \
          --out "$OUT" ;;
      tput1024)  # every request admitted at once
        run_step dist-tput-tp1-1024 600 $BENCH throughput --tp 1 --max-num-seqs 1024 \
          --out "$OUT"
        run_step dist-tput-pp2-1024 600 $BENCH throughput --pp 2 --max-num-seqs 1024 \
          --out "$OUT" ;;
      tokens) run_step dist-tokens 600 $BENCH tokens --out "$OUT" ;;
      report) run_step dist-report 60 $BENCH report --out "$OUT" ;;
      *) echo "=== dist: unknown sub-step $s"; status=1 ;;
    esac
  done
}

install_wheels() {  # the carried wheels (.whl/) into /tmp/site, ahead on PYTHONPATH
  compgen -G ".whl/*.whl" > /dev/null || return 0
  run_step wheels 120 python3 -m pip install -q --no-index --no-deps --no-compile \
    --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PYTHONPATH"
}

for step in $STEPS; do
  case $step in
    wheels) install_wheels ;;
    env) run_step env 60 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version \
      --format=csv; nvidia-smi topo -m; python -c 'import torch, triton, transformers; \
      print(torch.__version__, torch.version.cuda, triton.__version__, \
      transformers.__version__, torch.cuda.device_count(), torch.cuda.get_device_name())'; \
      git log -1 --format=%H 2>/dev/null || true" ;;
    build) run_step build 300 python -c "from fuselm.kernels import extension as e; \
      e.load_extension(); print(e.extension_status())" ;;
    tests) run_step tests 600 python -m pytest -m gpu -q -p no:cacheprovider -rfE \
      --continue-on-collection-errors --junitxml="$OUT/junit.xml" \
      --durations=10 ${GPU_TESTS:-tests} ;;
    kbench) run_step kbench 300 python -m fuselm.bench.kernels --preset quick --no-sweep \
      --output-dir "$OUT" --configs-dir "$OUT/configs" ${KBENCH_ARGS:-} ;;
    abench) run_step abench 300 python -m fuselm.bench.kernels_attention --preset full \
      --output-dir "$OUT" --configs-dir "$OUT/configs" ;;
    gemv) run_step gemv 240 python -m fuselm.bench.kernels_gemv --output-dir "$OUT" \
      --configs-dir "$OUT/configs" ;;
    kquant) run_step kquant 400 python -m fuselm.bench.kernels_quant --output-dir "$OUT" \
      --configs-dir "$OUT/configs" ${KQUANT_ARGS:---quick} ;;
    kgguf) run_step kgguf 300 python -m fuselm.bench.kernels_gguf --output-dir "$OUT" \
      --configs-dir "$OUT/configs" ${KGGUF_ARGS:---batches 1,4,16 --budget-s 120} ;;
    ncu) IFS=';' read -ra cases <<< "${NCU_CASES:-int4 28672 4096 1 8 1;int4 28672 4096 1 8 4}"
      for c in "${cases[@]}"; do
        # shellcheck disable=SC2086  # a case is the script's argument list
        run_step "ncu-${c// /_}" 120 ncu --clock-control none -k regex:quant_gemv \
          --launch-skip 1 --launch-count 1 --section SpeedOfLight --section Occupancy \
          --section LaunchStats --section WarpStateStats --section MemoryWorkloadAnalysis \
          --section SchedulerStats python scripts/ncu_quant_gemv.py $c
      done ;;
    latency) run_step latency 240 bash -c "python -c 'from fuselm.bench.dummy_model import \
      write_dummy_checkpoint as w; w(\"llama-3-8b\", __import__(\"pathlib\").Path(\"build/l8b\"))' \
      && python -m fuselm bench latency --model build/l8b --load-format dummy --batch-size 1 8 \
      --input-len 128 --output-len 32 --num-iters-warmup 1 --num-iters 2 --compare hf \
      --disable-detokenize --max-model-len 4096 --output-json $OUT/latency.json \
      --plot $OUT/latency.png --disable-tqdm" ;;
    gap) run_step gap 60 python scripts/graph_kernel_gap.py ;;
    engine) run_step engine 480 python scripts/bench_engine.py --out "$OUT" ${ENGINE_ARGS:-} ;;
    structured) run_step structured 420 bash -c "python scripts/bench_structured.py fill \
      --tokenizer-json ${TOKENIZER_JSON:-build/tok/llama3.json} --threads 1 8 15 && \
      python scripts/bench_structured.py step --shape llama-3-8b --batch-size 64 \
      --max-tokens 64 --content text --tokenizer-json ${TOKENIZER_JSON:-build/tok/llama3.json}" ;;
    quant) run_step quant 540 bash -c "python -c 'from fuselm.bench.dummy_model import \
      write_dummy_checkpoint as w; w(\"llama-3-8b\", __import__(\"pathlib\").Path(\"build/l8b\"))' \
      && for q in none ${QUANT_METHODS:-int4 int8 fp8}; do echo \"== quantization \$q\"; \
      python -m fuselm bench latency --model build/l8b --load-format dummy \
      \$([ \$q = none ] || echo --quantization \$q) --batch-size ${QUANT_BATCHES:-1 4 16 64 256} \
      --input-len 128 --output-len 32 --num-iters-warmup 1 --num-iters 2 --disable-detokenize \
      --max-model-len 4096 --output-json $OUT/quant-\$q.json --disable-tqdm || exit 1; done; \
      for t in ${QUANT_GGUF:-}; do echo \"== gguf \$t\"; python -m fuselm.bench.dummy_gguf \
      --shape llama-3-8b --type \$t --out build/l8b-\$t.gguf && python -m fuselm bench latency \
      --model build/l8b-\$t.gguf --quantization gguf --batch-size ${QUANT_BATCHES:-1 4 16 64 256} --input-len 128 \
      --output-len 32 --num-iters-warmup 1 --num-iters 2 --disable-detokenize \
      --max-model-len 4096 --output-json $OUT/quant-gguf-\$t.json --disable-tqdm || exit 1; \
      rm -f build/l8b-\$t.gguf; done" ;;
    profile) run_step profile 480 bash -c "python -c 'from fuselm.bench.dummy_model import \
      write_dummy_checkpoint as w; w(\"llama-3-8b\", __import__(\"pathlib\").Path(\"build/l8b\"))' \
      && for q in ${PROFILE_METHODS:-none int8 int4 fp8}; do echo \"== quantization \$q\"; \
      python -m fuselm profile --model build/l8b --load-format dummy \
      \$([ \$q = none ] || echo --quantization \$q) --batch-size ${PROFILE_BATCH:-1} \
      --input-len 128 --output-len 32 --max-model-len 4096 --top 30 --no-profile-memory \
      --output-dir $OUT/profile-\$q --output-json $OUT/profile-\$q.json --disable-tqdm \
      || exit 1; rm -f $OUT/profile-\$q/trace.json; rm -rf $OUT/profile-\$q/tensorboard; done" ;;
    fp8e2e) run_step fp8e2e 480 bash -c "python -c 'from fuselm.bench.dummy_model import \
      write_dummy_checkpoint as w; w(\"llama-3-8b\", __import__(\"pathlib\").Path(\"build/l8b\"))' \
      && for q in ${FP8E2E_METHODS:-none fp8}; do echo \"== quantization \$q\"; \
      python -m fuselm bench throughput --model build/l8b --load-format dummy \
      \$(case \$q in none) ;; fp8kv) echo --quantization fp8 --kv-cache-dtype fp8 ;; \
      *) echo --quantization \$q ;; esac) --num-prompts ${FP8E2E_PROMPTS:-2000} \
      --input-len 256 --output-len 256 --disable-detokenize --max-model-len 4096 \
      --output-json $OUT/tput-\$q.json --disable-tqdm || exit 1; \
      [ \$q = fp8kv ] && continue; python -m fuselm bench latency --model build/l8b --load-format dummy \
      \$([ \$q = none ] || echo --quantization \$q) --batch-size 1 --input-len 4096 \
      --output-len 2 --num-iters-warmup 1 --num-iters 3 --disable-detokenize \
      --max-model-len 8192 --output-json $OUT/ttft-\$q.json --disable-tqdm || exit 1; done" ;;
    ab) ab ;;
    dist) dist ;;
    pack) pack_out || status=1 ;;  # last: only $OUT/results.tgz remains
    *) echo "=== unknown step $step (see the usage in $0)"; status=1 ;;
  esac
done
exit $status
