#!/bin/bash
# A/B of the int8 legacy route (i8dense) against main, alternating, each run under the exclusive CPU lock.
OUT=/work/wt-i8dense/bench/results/s22/i8dense_ab_steps.txt
for pair in 1 2 3; do
  for tree in main wt-i8dense; do
    echo "=== pair $pair tree $tree $(cd /work/$tree && git rev-parse --short HEAD) start $(date -u +%FT%TZ)" >> $OUT
    (cd /work/$tree && flock -x /work/cpu.lock timeout 590 env PYTHONPATH=/work/$tree:/work/$tree/bench \
      .venv/bin/python bench/cpu_batch_steps.py --decodes 16,64 --steps 40 --prefill 10 --repeats 4 2>&1 \
      | grep -E "decodes a step|prefill step|tiles") >> $OUT
  done
done
echo "=== done $(date -u +%FT%TZ)" >> $OUT
