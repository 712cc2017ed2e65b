#!/usr/bin/env bash
# The whole test suite as several pytest processes (same tests; each test file runs in one process with its
# module fixtures).
# - One process per group: memory the engines of a group leave in the allocator (glibc keeps freed heap; many
#   models are built and dropped) goes back when the process ends. One process for the suite peaked near 20 GB
#   on a 23 GB machine and was killed.
# - One group at a time by default: two at once (LANES=2) oversubscribe a 2-core machine (every engine runs its
#   own 2 OpenMP threads) and took longer than running them in turn.
# Groups are listed heaviest first (longest-processing-time order); tests/ entries not named below form one
# more group, so a new test folder always runs.
# Usage: scripts/run_tests.sh [pytest args...]; exits non-zero if any group fails.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
LANES=${LANES:-1}
GROUPS_LIST=(
  "server"
  "bench disagg"
  "router structured"
  "engine gpu"
  "distributed core"
  "lora finetune executor perf"
  "model ops"
  "sample tools worker test_cli.py"
)
mapfile -t entries < <(cd tests && ls -d */ test_*.py 2>/dev/null | sed 's#/$##' | grep -v '^__pycache__$' | sort)
named=" ${GROUPS_LIST[*]} "
rest=""
for e in "${entries[@]}"; do [[ $named == *" $e "* ]] || rest+="$e "; done
[ -n "$rest" ] && GROUPS_LIST+=("$rest")

LOGS=$(mktemp -d "${TMPDIR:-/tmp}/tokenmill-tests-XXXXXX")
trap 'rm -rf "$LOGS"' EXIT
PYTEST_ARGS=""  # this script's pytest arguments, for every group (printf with no arguments would give '')
[ $# -gt 0 ] && PYTEST_ARGS=$(printf '%q ' "$@")
export PY LOGS PYTEST_ARGS
run_group() {  # index, entries: one pytest process; its output is printed when it ends (lanes do not interleave)
  local i=$1 words=() args=() extra=() e
  read -r -a words <<< "$2"
  eval "extra=($PYTEST_ARGS)"
  for e in "${words[@]}"; do [ -e "tests/$e" ] && args+=("tests/$e"); done
  [ ${#args[@]} -eq 0 ] && return 0
  "$PY" -m pytest "${args[@]}" -q -p no:cacheprovider "${extra[@]}" > "$LOGS/$i.log" 2>&1
  local code=$?
  { echo "== pytest ${args[*]} (exit $code)"; cat "$LOGS/$i.log"; echo; }
  if [ $code -ne 0 ] && [ $code -ne 5 ]; then touch "$LOGS/failed.$i"; fi  # 5: no tests collected
  return 0
}
export -f run_group
for i in "${!GROUPS_LIST[@]}"; do printf '%s\0%s\0' "$i" "${GROUPS_LIST[$i]}"; done |
  xargs -0 -n 2 -P "$LANES" bash -c 'run_group "$@"' run_group
if ls "$LOGS"/failed.* > /dev/null 2>&1; then
  echo "FAILED groups: $(cd "$LOGS" && ls failed.* | sed 's/failed\.//' | while read -r i; do echo -n "[${GROUPS_LIST[$i]}] "; done)"
  exit 1
fi
echo "all groups passed"
exit 0
