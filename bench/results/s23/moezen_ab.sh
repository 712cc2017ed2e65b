#!/usr/bin/env bash
# moezen in-process A/B: main (BASE tree) vs this branch (NEW tree), alternating, OLMoE-shaped Q4_K_M on the Zen 4 box.
#   flock -x /work/cpu.lock timeout 590 bash moezen_ab.sh PAIRS
# Each run (this branch's bench/cpu_batch_steps.py, the tree's tokenmill): bench/cpu_batch_steps.py --model the GGUF --decodes 16 --steps 24 --prefill 3 --repeats 3 (step p50 ms).
set -uo pipefail
BASE=${BASE:-/tmp/moezen/base}; NEW=${NEW:-/work/wt-moezen}; PAIRS=${1:-1}
M=${MODEL:-/tmp/tokenmill_moe/olmoe-16.Q4_K_M.gguf}
for p in $(seq 1 "$PAIRS"); do
  for tree in "$BASE" "$NEW"; do
    echo "== pair $p $(git -C "$tree" rev-parse --short HEAD) $tree $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
    (cd "$tree" && OMP_NUM_THREADS=2 PYTHONPATH="$tree:$NEW/bench" "$tree/.venv/bin/python" "$NEW/bench/cpu_batch_steps.py" \
      --model "$M" --decodes 16 --steps 24 --prefill 3 --repeats 3 2>&1 | grep -v Loading)
  done
done
