#!/bin/bash
for r in 1 2; do
  for side in main dotq4; do
    d=/work/$([ $side = main ] && echo main || echo wt-dotq4)
    echo "=== $side run $r $(date -u +%H:%M:%S)"
    (cd $d && PYTHONPATH=$d:$d/bench OMP_NUM_THREADS=2 timeout 280 .venv/bin/python bench/cpu_batch_steps.py --decodes 16,64 --prefill 10 --repeats 3 --steps 30 2>&1 | grep -E "decodes a step|prefill step")
  done
done
