#!/usr/bin/env bash
# Same-machine A/B of batch-1 decode across source trees (Llama-3-8B shape, bf16, dummy weights):
# the variants run interleaved, round after round, in one device call, so that every ratio
# compares numbers of one machine.
#
#   scripts/ab_decode.sh prepare REV...      (here) exports each commit's src/ to build/ab/REV/
#   OUT=/dir scripts/ab_decode.sh run VARIANT...   (on the device, carry build/ab)
#       VARIANT: "work" (this working tree's src/), a prepared REV, or NAME=REV:ENV=VALUE,... to
#       run REV (or work) with extra environment (e.g. fusion=work:FUSELM_KERNEL_CONFIGS=/x).
#       TPS="1 2" (tensor-parallel sizes), ROUNDS=2, STEP_TIMEOUT=240; TP=2 uses --one-shot;
#       AB_PROFILE=1 adds the per-kernel profile (--profile) to the first round.
#       Writes $OUT/ab-<name>-tp<n>-r<k>.json and $OUT/ab.txt (median of the rounds per
#       variant and TP size, and each variant's TP=2 / TP=1), then packs $OUT into
#       $OUT/results.tgz (lib_steps.sh pack_out). AB_DRY=1: summarise the JSON
#       already in $OUT without running anything (the script's test).
set -u
cd "$(dirname "$0")/.."
mode=${1:-}
shift || true
case $mode in
  prepare)
    for rev in "$@"; do
      rm -rf "build/ab/$rev" && mkdir -p "build/ab/$rev"
      git archive "$rev" src | tar x -C "build/ab/$rev" || exit 1
      echo "build/ab/$rev"
    done ;;
  run)
    OUT=${OUT:?set OUT}
    mkdir -p "$OUT"
    export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
    for round in $(seq 1 "${ROUNDS:-2}"); do
      for tp in ${TPS:-1 2}; do
        for variant in "$@"; do
          name=${variant%%=*}
          spec=${variant#*=}
          rev=${spec%%:*}
          envs=()
          [ "$spec" != "$rev" ] && IFS=, read -r -a envs <<< "${spec#*:}"
          src=$PWD/src
          [ "$rev" != work ] && src=$PWD/build/ab/$rev/src
          extra=()
          [ "$tp" -gt 1 ] && extra=(--one-shot)
          [ -n "${AB_PROFILE:-}" ] && [ "$round" = 1 ] && extra+=(--profile)
          json=$OUT/ab-$name-tp$tp-r$round.json
          timeout -k 10 "${STEP_TIMEOUT:-240}" ${AB_DRY:+true} env PYTHONPATH="$src" "${envs[@]}" \
            python scripts/bench_distributed.py decode --tp "$tp" "${extra[@]}" --out "$OUT" \
            --json "$json" > "$OUT/ab-$name-tp$tp-r$round.log" 2>&1
          echo "=== $name tp=$tp round $round rc=$?"
        done
      done
    done
    python - "$OUT" "$@" <<'PY' | tee "$OUT/ab.txt"
import json, statistics, sys
from pathlib import Path
out, variants = Path(sys.argv[1]), [v.split("=")[0] for v in sys.argv[2:]]
rows = {}
for name in variants:
    for f in sorted(out.glob(f"ab-{name}-tp*-r*.json")):
        tp = int(f.stem.split("-tp")[1].split("-")[0])
        rows.setdefault(name, {}).setdefault(tp, []).append(
            json.loads(f.read_text())["decode_ms_per_token"])
print(f"{'variant':<16} {'TP':>3} {'median ms':>10}  rounds")
for name, by_tp in rows.items():
    for tp, runs in sorted(by_tp.items()):
        print(f"{name:<16} {tp:>3} {statistics.median(runs):>10.4f}  "
              + " ".join(f"{r:.4f}" for r in runs))
    if 1 in by_tp and 2 in by_tp:
        print(f"{name:<16} TP=2 / TP=1 = "
              f"{statistics.median(by_tp[2]) / statistics.median(by_tp[1]):.4f}")
PY
    if [ -z "${AB_DRY:-}" ]; then
      # shellcheck source=scripts/lib_steps.sh
      source scripts/lib_steps.sh && pack_out
    fi ;;
  *) echo "usage: $0 prepare REV... | run VARIANT..." >&2; exit 2 ;;
esac
