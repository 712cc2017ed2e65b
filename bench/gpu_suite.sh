#!/usr/bin/env bash
# tokenmill GPU suite: correctness and speed on one GPU, one command, one table last (docs/GPU_SUITE.md).
#
#   bash bench/gpu_suite.sh [--out DIR] [--dry-run] [--budget SECONDS] [--steps a,b,...] [--python PY]
#
# Each step is one process (python -m bench.gpu_suite STEP) under `timeout` with its own limit; a step that
# fails or runs out of time does not stop the others. The limits add up to under 9 minutes; the optional
# steps (hf_8b, moe_offload) run only when their limit still fits in --budget. Writes DIR/gpu_suite.json (every step's rows),
# DIR/gpu_suite.md (the table) and DIR/gpu_suite.log (every step's output); prints the table last.
# --dry-run: tiny shapes on the CPU; the CUDA-only steps report "skipped: no CUDA".
# Exit status: 0 when every step is ok (or skipped for want of CUDA), else 1; 2 on a bad argument.
set -u

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=""
DRY=0
BUDGET=540
PY=python3
ONLY=""

# name:limit in seconds, in order (sum 530 s); the optional steps run only if time is left
STEPS="device:25 gpu_tests:95 hf_equal:70 llama8b:120 long32k:50 fp8kv:65 prefix:50 hf_peer:55"
OPTIONAL="hf_8b:60 moe_offload:90"

usage() { sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
die() { echo "gpu_suite.sh: error: $*" >&2; exit 2; }

while [ $# -gt 0 ]; do
  case "$1" in
    --out) [ $# -ge 2 ] || die "--out needs a folder"; OUT=$2; shift 2 ;;
    --out=*) OUT=${1#--out=}; shift ;;
    --dry-run) DRY=1; shift ;;
    --budget) [ $# -ge 2 ] || die "--budget needs seconds"; BUDGET=$2; shift 2 ;;
    --steps) [ $# -ge 2 ] || die "--steps needs a list"; ONLY=$2; shift 2 ;;
    --python) [ $# -ge 2 ] || die "--python needs an interpreter"; PY=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done
case "$BUDGET" in ''|*[!0-9]*) die "--budget must be a whole number of seconds, got '$BUDGET'" ;; esac
command -v "$PY" >/dev/null 2>&1 || die "python interpreter not found: $PY"
command -v timeout >/dev/null 2>&1 || die "the 'timeout' command (coreutils) is needed"
[ -n "$OUT" ] || OUT="$ROOT/bench/results/gpu/$(date -u +%Y-%m-%d)"
mkdir -p "$OUT" || die "cannot create $OUT"
OUT=$(cd "$OUT" && pwd)

if [ -n "$ONLY" ]; then  # keep the listed steps, with their limits
  sel=""
  for want in ${ONLY//,/ }; do
    hit=""
    for s in $STEPS $OPTIONAL; do [ "${s%%:*}" = "$want" ] && hit=$s; done
    [ -n "$hit" ] || die "unknown step '$want' (steps: $(for s in $STEPS $OPTIONAL; do printf '%s ' "${s%%:*}"; done))"
    sel="$sel $hit"
  done
  STEPS=$sel
  OPTIONAL=""
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_suite.XXXXXX") || die "cannot create a work folder"
trap 'rm -rf "$WORK"' EXIT
LOG="$OUT/gpu_suite.log"
: > "$LOG"
START=$(date +%s)
DRYFLAG=""
[ "$DRY" = 1 ] && DRYFLAG="--dry-run"
NAMES=""
for s in $STEPS $OPTIONAL; do NAMES="$NAMES${NAMES:+,}${s%%:*}"; done

report() {  # merge what the steps wrote so far into gpu_suite.json / gpu_suite.md
  (cd "$ROOT" && "$PY" -m bench.gpu_suite report --work "$WORK" --out "$OUT" --steps "$NAMES" \
     --started "$START" $DRYFLAG "$@")
}

run_step() {  # name limit optional
  local name=$1 limit=$2 optional=$3 now left lim t0 rc t1
  now=$(date +%s)
  left=$((START + BUDGET - now))
  if [ "$optional" = 1 ] && [ "$left" -lt $((limit + 10)) ]; then
    echo "skipped: not enough time left (optional)" > "$WORK/$name.status"
    echo "[gpu_suite] $name: skipped (optional; ${left}s left)"
    return
  fi
  if [ "$left" -lt 20 ]; then
    echo "skipped: out of time (${left} s of the ${BUDGET} s budget left)" > "$WORK/$name.status"
    echo "[gpu_suite] $name: skipped, out of time"
    return
  fi
  lim=$limit
  [ "$lim" -gt $((left - 10)) ] && lim=$((left - 10))
  echo "$lim" > "$WORK/$name.limit"
  echo "[gpu_suite] $name: running (limit ${lim}s)"
  t0=$(date +%s.%N)
  # TMPDIR inside $WORK: the steps' temporary model folders go when the trap removes $WORK
  (cd "$ROOT" && mkdir -p "$WORK/tmp" && TMPDIR="$WORK/tmp" exec timeout -k 10 "$lim" "$PY" -u -m bench.gpu_suite "$name" --work "$WORK" --t0 "$t0" \
     --limit "$lim" $DRYFLAG) > "$WORK/$name.log" 2>&1
  rc=$?
  t1=$(date +%s.%N)
  awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f\n", b - a }' > "$WORK/$name.secs"
  case $rc in
    0) ;;
    124|137) echo "timeout after ${lim} s" > "$WORK/$name.status" ;;
    *) [ -f "$WORK/$name.json" ] || echo "failed: exit $rc" > "$WORK/$name.status" ;;
  esac
  { echo "===== $name (exit $rc, $(cat "$WORK/$name.secs") s, limit ${lim} s) ====="; cat "$WORK/$name.log"; } >> "$LOG"
  echo "[gpu_suite] $name: exit $rc after $(cat "$WORK/$name.secs") s: $(tail -n 1 "$WORK/$name.log" | cut -c1-200)"
  report --quiet || true
}

echo "[gpu_suite] $( [ "$DRY" = 1 ] && echo "dry run, " )out: $OUT, budget ${BUDGET}s"
for s in $STEPS; do run_step "${s%%:*}" "${s##*:}" 0; done
for s in $OPTIONAL; do run_step "${s%%:*}" "${s##*:}" 1; done
echo
report
