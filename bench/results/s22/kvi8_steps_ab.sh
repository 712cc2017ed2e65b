#!/bin/bash
# kvi8: in-process step times, bf16 KV vs int8 KV (this branch, C kernel) vs int8 KV on main (PyTorch attention
# path), alternating, 3 rounds; each round one `flock -x /work/cpu.lock` (under 10 minutes).
# Usage: bash bench/results/s22/kvi8_steps_ab.sh OUTFILE
set -u
OUT=$1
WT=/work/wt-kvi8
PY=$WT/.venv/bin/python
ARGS="--decodes 64 --steps 40 --prefill 10 --repeats 4"
for round in 1 2 3; do
  flock -x /work/cpu.lock timeout 590 bash -c "
    cd $WT
    echo \"== round $round branch bf16 (auto) \$(date -u +%H:%M:%S)\"
    PYTHONPATH=$WT:$WT/bench $PY bench/cpu_batch_steps.py $ARGS --kv-cache-dtype auto 2>&1 | grep -v Loading
    echo \"== round $round branch int8 \$(date -u +%H:%M:%S)\"
    PYTHONPATH=$WT:$WT/bench $PY bench/cpu_batch_steps.py $ARGS --kv-cache-dtype int8 2>&1 | grep -v Loading
    echo \"== round $round main int8 (PyTorch attention) \$(date -u +%H:%M:%S)\"
    PYTHONPATH=/work/main:$WT/bench $PY bench/cpu_batch_steps.py $ARGS --kv-cache-dtype int8 2>&1 | grep -v Loading
  " >> "$OUT" 2>&1
done
echo "== end $(date -u +%H:%M:%S)" >> "$OUT"
