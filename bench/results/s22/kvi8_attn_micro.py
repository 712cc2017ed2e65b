"""kvi8: one SmolLM2 layer's decode attention (9 q heads, 3 KV heads, head dim 64), 64 requests of ~200-300 cached
tokens in a 2048-block pool (blocks shuffled), 2 threads: the C kernel over bf16 vs int8 vs fp8 caches, and the
PyTorch int8 path (kv_quant.quantized_paged_attention), interleaved, p50 of 5 x 60 calls each. Each call reads the next
of 30 pools (one per layer, as a model's step does: 30 x 25 MB of bf16, out of the 32 MiB L3's reach).
PYTHONPATH=. python bench/results/s22/kvi8_attn_micro.py"""
import random
import statistics
import time

import torch

from tests.ops.paged_batch import random_paged_batch
from tokenmill.ops.attention import kv_quant as KQ
from tokenmill.ops.cpu.attention import cpu_paged_attention

torch.set_num_threads(2)
rng = random.Random(0)
reqs = [(rng.randrange(200, 300), 1) for _ in range(64)]
nb, bs, h, hkv, d = 2048, 16, 9, 3, 64
batch = random_paged_batch(reqs, bs, nb, seed=0)
L = 30
bf16, i8, f8 = [], [], []
for _ in range(L):
    x = torch.randn(2, nb, bs, hkv, d)
    bf16.append(x.bfloat16())
    c = KQ.allocate_quantized_kv_cache(1, nb, bs, hkv, d, "int8", "cpu")[0]
    c.data, c.scale = KQ.quantize_int8(x)
    i8.append(c)
    c = KQ.allocate_quantized_kv_cache(1, nb, bs, hkv, d, "fp8", "cpu")[0]
    for i in range(2):
        c.data[i] = KQ.quantize_fp8(x[i], c.scale[i])
    f8.append(c)
q = torch.randn(64, h, d)
it = iter(range(1 << 40))
cases = {"C bf16": lambda: cpu_paged_attention(q, bf16[next(it) % L], batch),
         "C int8": lambda: cpu_paged_attention(q, i8[next(it) % L], batch),
         "C fp8": lambda: cpu_paged_attention(q, f8[next(it) % L], batch),
         "PyTorch int8 (main's path)": lambda: KQ.quantized_paged_attention(q, i8[next(it) % L], batch)}
times = {k: [] for k in cases}
for _ in range(5):
    for k, f in cases.items():
        n = 60 if k.startswith("C") else 5
        f()
        t0 = time.perf_counter()
        for _ in range(n):
            f()
        times[k].append((time.perf_counter() - t0) / n * 1e3)
kv_bytes = {"C bf16": 2 * 64 * 250 * hkv * d * 2, "C int8": 2 * 64 * 250 * hkv * (d + 4), "C fp8": 2 * 64 * 250 * hkv * d}
for k, v in times.items():
    extra = f", ~{kv_bytes[k] / statistics.median(v) / 1e6:.1f} GB/s of K/V (+scales)" if k in kv_bytes else ""
    print(f"{k:28s} p50 {statistics.median(v):7.3f} ms  min {min(v):7.3f} ms{extra}")
