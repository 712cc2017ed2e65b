#!/bin/bash
# Served A/B (tm-bf16, HTTP, 16 and 64 streams): main d054943 (/tmp/cattn_base) against branch cattn (git archive of
# the commit in /tmp/cattn_new), alternating, each server run under flock -x. Usage: cattn_serve_ab.sh PAIRS
for r in $(seq 1 ${1:-2}); do
  for side in base new; do
    d=/tmp/cattn_$side
    echo "=== served pair $r $side $(date -u +%H:%M:%S)"
    rm -rf /tmp/cattn_sp_${side}_$r
    (cd $d && flock -x /work/cpu.lock timeout 590 env CONC="16 64" OUTLEN=96 OUT=/tmp/cattn_sp_${side}_$r \
      TM_VENV=/work/main/.venv PYTHONPATH=$d bash /work/shared/bench/serve_peers/run.sh tm-bf16 > /dev/null 2>&1)
    echo "--- done $(date -u +%H:%M:%S)"; python3 /work/shared/bench/serve_peers/table.py /tmp/cattn_sp_${side}_$r
  done
done
