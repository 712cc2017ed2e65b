#!/usr/bin/env bash
# Two Ray nodes on one machine, each in its own network namespace (its own IP, joined by a veth pair), and
# tokenmill TP=2 across them through the Ray executor: greedy tokens must equal TP=1 in one process.
# Needs root (ip netns) and Ray (pip install 'tokenmill[ray]'). Everything it starts lives in the two
# namespaces and is stopped by PID (ip netns pids) at the end; the namespaces are deleted.
#
#   sudo PYTHON=.venv/bin/python bash bench/ray_two_nodes.sh
set -euo pipefail
PY=${PYTHON:-python}
RAY="$(dirname "$PY")/ray"
A=tmray_a; B=tmray_b; IPA=10.77.0.1; IPB=10.77.0.2
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d /tmp/tokenmill-ray2-XXXX)
# a throw-away cluster on a private veth link: Ray's token authentication off (its own setting)
RAYENV="RAY_AUTH_MODE=disabled"

cleanup() {
  for ns in $A $B; do
    for pid in $(ip netns pids $ns 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
    ip netns del $ns 2>/dev/null || true
  done
  rm -rf "$WORK"
}
trap cleanup EXIT

ip netns add $A; ip netns add $B
ip link add ${A}_v type veth peer name ${B}_v
ip link set ${A}_v netns $A; ip link set ${B}_v netns $B
ip -n $A addr add $IPA/24 dev ${A}_v; ip -n $B addr add $IPB/24 dev ${B}_v
for ns in $A $B; do ip -n $ns link set lo up; ip -n $ns link set ${ns}_v up; done

# gloo binds to the interface named here (the hostname resolves to 127.0.0.1 in a namespace); the raylet's
# environment reaches its workers. On real hosts: GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME = the cluster NIC.
ip netns exec $A env $RAYENV GLOO_SOCKET_IFNAME=${A}_v "$RAY" start --head --node-ip-address $IPA --port 6379 \
  --num-cpus 1 --include-dashboard false --disable-usage-stats --temp-dir "$WORK/a" > "$WORK/a.log" 2>&1
ip netns exec $B env $RAYENV GLOO_SOCKET_IFNAME=${B}_v "$RAY" start --address $IPA:6379 --node-ip-address $IPB \
  --num-cpus 1 --disable-usage-stats > "$WORK/b.log" 2>&1 || { cat "$WORK/b.log"; exit 1; }

cd "$ROOT"
ip netns exec $A env $RAYENV PYTHONPATH="$ROOT" GLOO_SOCKET_IFNAME=${A}_v "$PY" - "$IPA" <<'PYEOF'
import sys, tempfile
import ray
from tests.model.tiny_models import save_tiny_model
from tests.distributed.test_tensor_parallel import _generate, _prompts
from tokenmill.model.loader import default_model_path

ip = sys.argv[1]
path = save_tiny_model("llama", tempfile.mkdtemp())
tok = default_model_path()  # the GGUF's tokenizer (prompts are token ids)
prompts = _prompts(5)
ref, _ = _generate(path, tok, prompts)
ray.init(address=f"{ip}:6379", log_to_driver=False)
nodes = [n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]]
print("ray nodes:", nodes)
assert len(nodes) == 2, nodes
got, stats = _generate(path, tok, prompts, tensor_parallel_size=2, distributed_executor_backend="ray")
print("executor:", stats["executor"].__name__, "preemptions:", stats["preemptions"], "prefix hits:", stats["prefix_hits"])
print("TP=2 over two Ray nodes == TP=1:", got == ref)
sys.exit(0 if got == ref else 1)
PYEOF
