# Shared by scripts/gpu/run.sh (sourced from the repo root).
#
# run_step NAME DEFAULT_TIMEOUT CMD...: runs CMD under its own timeout (STEP_TIMEOUT_<NAME>
# overrides, dashes as underscores), logs to $OUT/NAME.log, prints the verdict and the log's last
# TAIL_LINES lines, and sets status=1 when the step failed.
run_step() {
  local name=$1 limit=$2 var="STEP_TIMEOUT_${1^^}" start rc
  var=${var//-/_}
  limit=${!var:-$limit}
  shift 2
  start=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  echo "=== $name rc=$rc $(( $(date +%s) - start ))s$([ $rc -eq 124 ] && echo ' TIMEOUT')"
  tail -n "${TAIL_LINES:-20}" "$OUT/$name.log"
  [ $rc -eq 0 ] || status=1
}

# pack_out: replaces everything under $OUT by $OUT/results.tgz (logs, JSON, plots, tables; no
# model checkpoints): the device returns only a few files a call.
pack_out() {
  local tmp
  [ -n "${OUT:-}" ] && [ -d "$OUT" ] && [ "$(cd "$OUT" && pwd)" != / ] || return 1
  tmp=$(mktemp -d)
  (cd "$OUT" && tar czf "$tmp/results.tgz" --exclude='*.safetensors' --exclude='*.bin' \
    --exclude='*.gguf' --exclude=llama-3-8b --exclude='small-random*' .) || return 1
  find "$OUT" -mindepth 1 -delete
  mv "$tmp/results.tgz" "$OUT/results.tgz" && rmdir "$tmp"
  echo "=== pack: $OUT/results.tgz $(du -h "$OUT/results.tgz" | cut -f1)"
}

# ab_summary OUT KEYS...: the median over rounds of each KEY in $OUT/ab-{base,work}-r*/*.json,
# both trees and the ratio work / base (below 1: the current tree is faster); also to
# $OUT/ab.txt.
ab_summary() {
  python3 - "$@" <<'PY' | tee "$1/ab.txt"
import json, statistics, sys
from pathlib import Path
out, keys = Path(sys.argv[1]), sys.argv[2:]
runs = {}
for tree in ("base", "work"):
    for f in sorted(out.glob(f"ab-{tree}-r*/*.json")):
        data = json.loads(f.read_text())
        for k in keys:
            if isinstance(data.get(k), (int, float)):
                runs.setdefault(k, {}).setdefault(tree, []).append(float(data[k]))
print(f"{'metric':<14} {'base':>10} {'work':>10} {'work/base':>10}  rounds (base | work)")
for k, by_tree in runs.items():
    base, work = (statistics.median(by_tree[t]) if t in by_tree else None
                  for t in ("base", "work"))
    ratio = f"{work / base:10.4f}" if base and work else f"{'-':>10}"
    fmt = lambda v: f"{v:10.4f}" if v is not None else f"{'-':>10}"  # noqa: E731
    print(f"{k:<14} {fmt(base)} {fmt(work)} {ratio}  "
          + " ".join(f"{v:.4f}" for v in by_tree.get("base", [])) + " | "
          + " ".join(f"{v:.4f}" for v in by_tree.get("work", [])))
PY
}
