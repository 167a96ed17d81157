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
