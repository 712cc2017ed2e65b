#!/bin/bash
# Served A/B on the kvi8 base: base = main 6009130 (kvi8 merged, before bf16zen; its tokenmill/ exported by git
# archive to /tmp/bf16zen_base6009), new = main 7ba1ef4 (bf16zen merged via dotq4) = this worktree after the rebase.
side=$1; tag=${2:-1}
tree=/tmp/bf16zen_base6009; [ "$side" = new ] && tree=/work/wt-bf16zen
out=/tmp/bf16zen_sp2_${side}_$tag; rm -rf "$out"
cd /work/wt-bf16zen
echo "== $side $tag $(date -u +%H:%M:%S) tree $tree"
flock -x /work/cpu.lock timeout 590 env CONC="16 64" OUTLEN=96 OUT=$out TM_VENV=/work/main/.venv PYTHONPATH=$tree \
  bash /work/shared/bench/serve_peers/run.sh tm-bf16
grep -h "packed for the CPU\|per-op\|AVX512-BF16" $out/tm-bf16.log | head -2
echo "== end $(date -u +%H:%M:%S)"
