#!/usr/bin/env bash
# libgomp's wait policy vs the served workload in process (bench/cpu_mixed_profile.py: 32 requests of 200 prompt
# tokens and 64 generated, 16 at a time, 2 threads), on idle cores and beside one busy process in its own session
# (as the API process or a neighbour's job would be). Each setting is an environment the engine loads libgomp with.
#   flock /work/bench.lock bash bench/omp_wait.sh [settings...]
#   settings: default passive spin1000 spin5000 spin20000 (default: all); TIMEOUT=150 per run
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
TIMEOUT=${TIMEOUT:-150}
run() {  # label env...
  local label=$1; shift
  local r
  r=$(env -u OMP_WAIT_POLICY -u GOMP_SPINCOUNT "$@" PYTHONPATH=. timeout "$TIMEOUT" "$PY" bench/cpu_mixed_profile.py \
      --concurrency 16 --requests 32 --output 64 2>&1 | grep "generated tok/s")
  echo "$label: ${r:-no result within $TIMEOUT s}"
}
setting_env() {
  case $1 in
    default) echo "GOMP_SPINCOUNT=300000" ;;  # libgomp's own default when the user sets nothing
    passive) echo "OMP_WAIT_POLICY=passive" ;;
    spin*) echo "GOMP_SPINCOUNT=${1#spin}" ;;
    *) echo "unknown setting $1" >&2; exit 2 ;;
  esac
}
SETTINGS=${*:-default passive spin1000 spin5000 spin20000}
for busy in 0 1; do
  BUSY_PID=
  if [ "$busy" = 1 ]; then setsid bash -c 'while :; do :; done' & BUSY_PID=$!; sleep 0.5; fi
  for s in $SETTINGS; do run "busy=$busy $s" "$(setting_env "$s")"; done
  [ -n "$BUSY_PID" ] && kill "$BUSY_PID"
done
