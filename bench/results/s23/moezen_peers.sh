#!/usr/bin/env bash
# moezen: OLMoE-shaped Q4_K_M (or MODEL_KIND=dense: SmolLM2 Q4_K_M), tokenmill from TREE vs llama-server, one engine
# at a time in ONE locked run; run by scenario group so each locked command stays under 10 minutes.
#   flock -x /work/cpu.lock timeout 590 env TREE=/work/wt-moezen SCEN=latency,tput16 OUT=... bash moezen_peers.sh [engines]
set -uo pipefail
TREE=${TREE:-/work/wt-moezen}
export RUNS=${RUNS:-1} SCEN=${SCEN:-latency,tput16}
echo "start $(date -u +%FT%TZ) tree=$TREE commit=$(git -C "$TREE" rev-parse --short HEAD) scen=$SCEN load=$(cut -d' ' -f1-3 /proc/loadavg)"
if [ "${MODEL_KIND:-moe}" = dense ]; then
  bash "$TREE/bench/kquant_dense.sh" ${*:-tokenmill server}
else
  bash "$TREE/bench/moe_cpu_peers.sh" ${*:-tokenmill server}
fi
echo "end $(date -u +%FT%TZ)"
