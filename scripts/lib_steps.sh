# Shared by the GPU check scripts: run_step NAME DEFAULT_TIMEOUT CMD... runs CMD under its own
# timeout (STEP_TIMEOUT_<NAME> overrides, dashes as underscores), logs to $OUT/NAME.log, prints
# the verdict and the log's last TAIL_LINES lines, and sets status=1 when the step failed.
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
