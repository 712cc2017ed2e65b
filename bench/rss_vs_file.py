"""The memory check of the GGUF peer benchmarks (bench/kquant_dense.sh, bench/moe_cpu_peers.sh): each engine's
resident set after load, from the peer harness's JSON results, against the model file's size.
    usage: python bench/rss_vs_file.py MODEL.gguf RESULTS_DIR"""
import glob
import json
import os
import sys

size = os.path.getsize(sys.argv[1])
print(f"\nfile {size / 2**20:.1f} MiB")
for f in sorted(glob.glob(os.path.join(sys.argv[2], "*.json"))):
    r = json.load(open(f))
    if "engine" not in r:
        continue
    mem = r.get("memory", {})
    before = (mem.get("before_load") or {}).get("rss_bytes") or 0
    after = (mem.get("after_load") or {}).get("rss_bytes") or 0
    print(f"{r['engine']}: rss after load {after / 2**20:.0f} MiB (+{(after - before) / 2**20:.0f} MiB over the "
          f"process before loading; {after / size:.2f}x the file), peak {r.get('peak_rss_bytes', 0) / 2**20:.0f} "
          f"MiB, kv_blocks {r.get('engine_info', {}).get('kv_blocks')}")
