#!/usr/bin/env bash
# usage: prof.sh TREE OUTDIR CONC [pyspy]   -- serve TREE's tokenmill with a step trace, bench at CONC
set -uo pipefail
TREE=$1; OUT=$2; C=$3; SPY=${4:-}
mkdir -p $OUT; rm -f $OUT/trace.jsonl $OUT/*.txt
export OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 PYTHONPATH=$TREE
cd $TREE
PORT=8124
/work/main/.venv/bin/tokenmill serve --port $PORT --num-threads 2 --no-enable-prefix-caching --max-num-seqs 64 --step-trace $OUT/trace.jsonl > $OUT/server.log 2>&1 &
pid=$!
for i in $(seq 1 200); do curl -sf http://127.0.0.1:$PORT/health >/dev/null && break; sleep 1; done
eng=$(pgrep -P $pid -f spawn | head -1)
echo "api $pid engine $eng $(/work/main/.venv/bin/python -c 'import tokenmill; print(tokenmill.__file__)')"
for t in /proc/$eng/task/*; do [ -n "${ENICE:-}" ] && renice -n $ENICE -p $(basename $t) >/dev/null; done
for t in /proc/$pid/task/*; do [ -n "${ANICE:-}" ] && renice -n $ANICE -p $(basename $t) >/dev/null; done
echo "engine threads $(ls /proc/$eng/task | wc -l) nice $(ps -o nice= -p $eng) api threads $(ls /proc/$pid/task | wc -l) nice $(ps -o nice= -p $pid)"
cpu() { awk '{print $14+$15}' /proc/$1/stat; }
busy() { awk '/^cpu /{print $2+$3+$4+$7+$8+$9}' /proc/stat; }
a0=$(cpu $pid); e0=$(cpu $eng); b0=$(busy); t0=$(date +%s.%N)
n=$((C*3))
if [ -n "$SPY" ]; then
  ( sleep 10; /tmp/pyspy/bin/py-spy record -p $pid -d 15 -r 250 -f raw -o $OUT/api.txt --nonblocking >/dev/null 2>&1 ) &
  true
fi
/usr/bin/time -f "client cpu user %U sys %S" /work/main/.venv/bin/tokenmill bench serve --base-url http://127.0.0.1:$PORT --endpoint completions --workload fixed:200:96 \
  --rate inf --max-concurrency $C --num-requests $n --tokenizer /tmp/vllmcpu/smollm2-hf --no-progress \
  --model SmolLM2-135M-Instruct --out $OUT/bench-c$C.json > $OUT/bench-c$C.txt 2>&1
t1=$(date +%s.%N); a1=$(cpu $pid); e1=$(cpu $eng); b1=$(busy)
echo "wall $(echo "$t1 - $t0" | bc) s; api cpu $(( a1 - a0 )) ticks, engine cpu $(( e1 - e0 )) ticks, machine busy $(( b1 - b0 )) ticks (100/s)"
grep -E "^ inf|client cpu" $OUT/bench-c$C.txt
sleep 1
kill $pid; for i in $(seq 1 30); do kill -0 $pid 2>/dev/null || break; sleep 0.5; done; kill -9 $pid 2>/dev/null
/work/main/.venv/bin/python /tmp/sp/trace.py $OUT/trace.jsonl
