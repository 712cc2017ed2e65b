#!/bin/bash
# alternate base (main 7a3068e) and new (prefattn) step timings
for r in 1 2 3; do
  for side in base new; do
    if [ $side = base ]; then d=/work/wt-prefattn-base; else d=/work/wt-prefattn; fi
    echo "=== $side run $r $(date -u +%H:%M:%S)"
    (cd $d && PYTHONPATH=$d:$d/bench timeout 150 .venv/bin/python bench/cpu_batch_steps.py --decodes "$DEC" --prefill 10 --repeats 5 --steps 40 2>&1 | grep -E "decodes a step|prefill step")
  done
done
