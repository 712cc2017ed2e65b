#!/bin/bash
# In-process A/B on the kvi8 base (main 6009130 exported to /tmp/bf16zen_base6009) vs main 7ba1ef4 (bf16zen merged), alternating, each run under its own exclusive lock (bench/cpu_batch_steps.py of
# this branch: --model/--dtype; tokenmill from PYTHONPATH: /work/main or /work/wt-bf16zen).
# usage: bash bench/results/s22/bf16zen_ab.sh PAIRS OUTDIR
cd /work/wt-bf16zen
pairs=${1:-3}; out=${2:-/tmp/bf16zen_ab}; mkdir -p "$out"
for i in $(seq 1 "$pairs"); do
  for side in base new; do
    tree=/tmp/bf16zen_base6009; [ "$side" = new ] && tree=/work/wt-bf16zen
    { echo "== $side pair $i $(date -u +%H:%M:%S) tree $tree $( [ $side = new ] && git -C $tree rev-parse --short HEAD || echo 6009130)";
      flock -x /work/cpu.lock timeout 590 env PYTHONPATH=$tree:bench .venv/bin/python bench/cpu_batch_steps.py \
        --model /tmp/vllmcpu/smollm2-hf --dtype bfloat16 --decodes 16,64 --steps 40 --prefill 10 --repeats 3 2>&1 \
        | grep -E "decodes a step|prefill step|Error|error" ; } >> "$out/ab.txt"
  done
done
