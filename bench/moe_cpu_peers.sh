#!/usr/bin/env bash
# A mixture-of-experts model on the CPU, tokenmill vs llama-server on the same Q4_K_M file (issue #21): an
# OLMoE-1B-7B-shaped checkpoint with random bf16 weights (bench/random_moe_checkpoint.py: 16 layers, 64 experts,
# top 8, SmolLM2's tokenizer), converted by llama.cpp's own convert_hf_to_gguf.py and quantized by its
# llama-quantize, then both engines through the CPU peer harness (bench/cpu_peers.sh: same prompts, 2 threads,
# one engine at a time), and each engine's resident set against the file size.
#   usage: bash bench/moe_cpu_peers.sh [engine ...]   engines as bench/cpu_peers.sh (default: tokenmill server)
# Env: PEERS_DIR (llama.cpp build with llama-server and llama-quantize, and its source tree, as
#      ../shared/bench/cpu_peers/setup.sh makes them, plus `cmake --build $PEERS_DIR/lcpp-build --target
#      llama-quantize`), LAYERS (default 16), QTYPE (default Q4_K_M), WORK (the checkpoint and GGUF files, ~32 GB
#      at 16 layers; default /tmp/tokenmill_moe), OUT, and those of cpu_peers.sh (RUNS, SCEN, SERVER_EXTRA,
#      TM_ARGS: default kv_cache_memory=4, the 4 GiB of KV llama-server preallocates for its 64 slots).
#      Run only on an otherwise idle machine (check `uptime`).
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export PEERS_DIR=${PEERS_DIR:-/tmp/peers}
LAYERS=${LAYERS:-16}
QTYPE=${QTYPE:-Q4_K_M}
WORK=${WORK:-/tmp/tokenmill_moe}
export OUT=${OUT:-$WORK/results}
export TM_ARGS=${TM_ARGS:-kv_cache_memory=4}
PY=${PY:-$ROOT/.venv/bin/python}
[ -x "$PY" ] || PY=/work/main/.venv/bin/python
LCPP_SRC=$(ls -d "$PEERS_DIR"/llama_cpp_python-*/vendor/llama.cpp 2>/dev/null | head -1)
Q=$PEERS_DIR/lcpp-build/bin/llama-quantize
HF=$WORK/olmoe-$LAYERS-hf
BF16=$WORK/olmoe-$LAYERS.bf16.gguf
export MODEL=$WORK/olmoe-$LAYERS.$QTYPE.gguf
mkdir -p "$WORK" "$OUT"
if [ ! -f "$MODEL" ]; then
  [ -x "$Q" ] && [ -n "$LCPP_SRC" ] || { echo "no llama.cpp build / source under $PEERS_DIR (see the header)"; exit 2; }
  [ -f "$HF/model.safetensors.index.json" ] || PYTHONPATH=$ROOT $PY "$ROOT/bench/random_moe_checkpoint.py" "$HF" \
    --layers "$LAYERS" || exit 1
  if [ ! -f "$BF16" ]; then
    PYTHONPATH=$LCPP_SRC/gguf-py $PY "$LCPP_SRC/convert_hf_to_gguf.py" "$HF" --outtype bf16 --outfile "$BF16.tmp" \
      > "$WORK/convert.log" 2>&1 || { tail "$WORK/convert.log"; exit 1; }
    mv "$BF16.tmp" "$BF16"
  fi
  "$Q" "$BF16" "$MODEL.tmp" "$QTYPE" 2 > "$WORK/quantize.log" 2>&1 || { tail "$WORK/quantize.log"; exit 1; }
  mv "$MODEL.tmp" "$MODEL"
fi
$PY "$ROOT/bench/gguf_types.py" "$MODEL"
bash "$ROOT/bench/cpu_peers.sh" ${*:-tokenmill server}
$PY "$ROOT/bench/rss_vs_file.py" "$MODEL" "$OUT"
