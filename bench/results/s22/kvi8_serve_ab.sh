#!/bin/bash
# kvi8: served A/B through HTTP, tokenmill (this branch, default GGUF) with the default KV cache (auto = bf16 here)
# vs --kv-cache-dtype int8, alternating, 64 streams; the client command of /work/shared/bench/serve_peers/run.sh
# (completions, fixed:200:96, ignore_eos, 192 requests). Each pair under one `flock -x /work/cpu.lock`.
# Usage: bash bench/results/s22/kvi8_serve_ab.sh OUTDIR PAIRS
set -u
OUT=$1; PAIRS=${2:-2}; mkdir -p "$OUT"
WT=/work/wt-kvi8
export OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 PYTHONPATH=$WT
TM=$WT/.venv/bin/tokenmill
PORT=8147
for p in $(seq 1 "$PAIRS"); do
  flock -x /work/cpu.lock timeout 590 bash -c "
    for kv in auto int8; do
      $TM serve --port $PORT --num-threads 2 --no-enable-prefix-caching --max-num-seqs 64 --kv-cache-dtype \$kv \
        > $OUT/server-\$kv-$p.log 2>&1 &
      pid=\$!
      for i in \$(seq 1 200); do curl -sf http://127.0.0.1:$PORT/health >/dev/null && break; sleep 1; done
      echo \"== pair $p kv \$kv \$(date -u +%H:%M:%S) load=\$(cut -d' ' -f1-3 /proc/loadavg)\"
      $TM bench serve --base-url http://127.0.0.1:$PORT --endpoint completions --workload fixed:200:96 \
        --rate inf --max-concurrency 64 --num-requests 192 --tokenizer /tmp/vllmcpu/smollm2-hf --no-progress \
        --model SmolLM2-135M-Instruct --out $OUT/\$kv-$p.json 2>&1 | tail -25
      kill \$pid; while kill -0 \$pid 2>/dev/null; do sleep 0.5; done
    done
  " >> "$OUT/log.txt" 2>&1
done
echo "== end $(date -u +%H:%M:%S)" >> "$OUT/log.txt"
