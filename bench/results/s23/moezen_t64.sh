#!/usr/bin/env bash
# moezen: the 64-concurrent scenario of the peer harness, one engine per locked command (each < 10 min): this branch,
# llama-server, main; then one table.   bash moezen_t64.sh OUTDIR
set -uo pipefail
O=${1:-/tmp/moezen/t64}; S=/work/wt-moezen/bench/results/s23/moezen_peers.sh
L() { flock -x /work/cpu.lock timeout 590 "$@"; echo "rc=$? $(date -u +%T)"; }
L env TREE=/work/wt-moezen SCEN=tput64 OUT=$O/new bash $S tokenmill
L env TREE=/work/wt-moezen SCEN=tput64 OUT=$O/server bash $S server
L env TREE=/tmp/moezen/base SCEN=tput64 OUT=$O/main bash $S tokenmill
/work/main/.venv/bin/python /work/shared/bench/cpu_peers/peers_bench.py table $O/new/tokenmill.json $O/server/llama-server.json $O/main/tokenmill.json
