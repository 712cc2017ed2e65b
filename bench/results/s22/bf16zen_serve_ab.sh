#!/bin/bash
# Served A/B of the bf16 folder (tm-bf16), main vs bf16zen, each under its own exclusive lock; the server is
# /work/main/.venv/bin/tokenmill with PYTHONPATH choosing the tree (checked in tm-bf16.log: bf16zen logs
# "AMX or AVX512-BF16"). usage: bash bench/results/s22/bf16zen_serve_ab.sh base|new [tag]
side=$1; tag=${2:-1}
tree=/work/main; [ "$side" = new ] && tree=/work/wt-bf16zen
out=/tmp/bf16zen_sp_${side}_$tag; rm -rf "$out"
cd /work/wt-bf16zen
echo "== $side $tag $(date -u +%H:%M:%S) tree $tree $(git -C $tree rev-parse --short HEAD)"
flock -x /work/cpu.lock timeout 590 env CONC="16 64" OUTLEN=96 OUT=$out TM_VENV=/work/main/.venv PYTHONPATH=$tree \
  bash /work/shared/bench/serve_peers/run.sh tm-bf16
grep -h "packed for the CPU\|AVX512-BF16" $out/tm-bf16.log | head -2
echo "== end $(date -u +%H:%M:%S)"
