#!/bin/bash
# In-process A/B of the AVX512-BF16 prefill attention kernel (branch cattn) against main (d054943, git archive in
# /tmp/cattn_base), alternating, each run under flock -x. Usage: cattn_ab_steps.sh PAIRS
for r in $(seq 1 ${1:-3}); do
  for model in gguf hf; do
    args=""; [ $model = hf ] && args="--model /tmp/vllmcpu/smollm2-hf --dtype bfloat16"
    for side in base cattn; do
      d=$([ $side = base ] && echo /tmp/cattn_base || echo /work/wt-cattn)
      echo "=== pair $r $model $side $(date -u +%H:%M:%S) $d"
      (cd $d && flock -x /work/cpu.lock timeout 590 env PYTHONPATH=$d:$d/bench .venv/bin/python bench/cpu_batch_steps.py \
        --decodes 16,64 --prefill 10 --repeats 3 --steps 30 $args 2>&1 | grep -E "decodes a step|prefill step")
    done
  done
done
