"""KV transfer throughput of the TCP connector (disaggregated prefill / decode) between two processes.

A producer process holds a KV cache of the model's shape (random bytes) and serves transfers of
--tokens-prompt tokens; this process (the consumer) pulls each into its own cache, through the real
connector: gather on the producer, TCP over 127.0.0.1, scatter on the consumer. Prints, per KV dtype,
MB/s and milliseconds per 1k prompt tokens (median of --repeats pulls per prompt size).

    PYTHONPATH=. flock /work/bench.lock python bench/kv_transfer.py                 # SmolLM2-135M shape
    PYTHONPATH=. flock /work/bench.lock python bench/kv_transfer.py --dtypes auto int8 --tokens 1024 4096
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import statistics
import time
from datetime import date

import torch

from tokenmill.config import KVTransferConfig
from tokenmill.core.kv_transfer import KVRecv, KVSend
from tokenmill.ops.attention.kv_quant import allocate_quantized_kv_cache
from tokenmill.ops.attention.reference import allocate_kv_cache
from tokenmill.worker.kv_connector import KVBlockIO
from tokenmill.worker.kv_tcp import TcpKVConnector

SHAPES = {"smollm2-135m": (30, 3, 64), "llama-1b": (16, 8, 64), "llama-8b": (32, 8, 128)}  # layers, kv heads, dim
PLAIN_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def make_io(shape: str, dtype: str, num_blocks: int, block_size: int, seed: int) -> KVBlockIO:
    layers, heads, dim = SHAPES[shape]
    if dtype in ("auto", *PLAIN_DTYPES):
        torch_dtype = PLAIN_DTYPES.get(dtype, torch.float32)
        kv = allocate_kv_cache(layers, num_blocks, block_size, heads, dim, torch_dtype, "cpu")
    else:
        kv = allocate_quantized_kv_cache(layers, num_blocks, block_size, heads, dim, dtype, "cpu")
    io = KVBlockIO(kv, block_size, dtype)
    g = torch.Generator().manual_seed(seed)
    for p in io.parts:
        p.copy_(torch.randint(0, 256, p.shape, generator=g, dtype=torch.uint8))
    return io


def producer(args, dtype: str, port: int, jobs: list, ready, done) -> None:
    torch.set_num_threads(1)
    io = make_io(args.shape, dtype, args.num_blocks, args.block_size, 1)
    conn = TcpKVConnector(KVTransferConfig(kv_role="producer", kv_transfer_port=port, kv_transfer_timeout=600),
                          io)
    for tid, n_blocks, tokens in jobs:
        conn.send_blocks(tid, KVSend(tid, list(range(1, n_blocks + 1)), tokens, 0))
    ready.set()
    done.wait(1200)
    conn.shutdown()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_dtype(args, dtype: str) -> list[dict]:
    bs = args.block_size
    jobs = []
    for n_tok in args.tokens:
        for r in range(args.repeats):
            jobs.append((f"{dtype}-{n_tok}-{r}", -(-n_tok // bs), list(range(n_tok))))
    port = free_port()
    ctx = mp.get_context("spawn")
    ready, done = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=producer, args=(args, dtype, port, jobs, ready, done))
    proc.start()
    try:
        assert ready.wait(300), "the producer did not start"
        io = make_io(args.shape, dtype, args.num_blocks, bs, 2)
        cons = TcpKVConnector(KVTransferConfig(kv_role="consumer", kv_transfer_timeout=600), io)
        times: dict[int, list[float]] = {}
        for tid, n_blocks, tokens in jobs:
            t0 = time.perf_counter()
            cons.recv_blocks(tid, KVRecv(tid, "127.0.0.1", port, list(range(1, n_blocks + 1)), 0, tokens))
            got: dict = {}
            while not got:
                got = cons.get_finished(1.0)[1]
            assert got == {tid: True}, got
            times.setdefault(len(tokens), []).append(time.perf_counter() - t0)
        rows = []
        for n_tok, ts in times.items():
            med = statistics.median(ts)
            nbytes = -(-n_tok // bs) * io.row_bytes
            rows.append({"kv_dtype": dtype, "prompt_tokens": n_tok, "bytes": nbytes, "seconds_median": med,
                         "MB_per_s": nbytes / med / 1e6, "ms_per_1k_tokens": med * 1000 * 1000 / n_tok,
                         "bytes_per_token": io.row_bytes / bs})
        cons.shutdown()
        return rows
    finally:
        done.set()
        proc.join(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="smollm2-135m", choices=sorted(SHAPES))
    ap.add_argument("--dtypes", nargs="+", default=["auto", "int8"], help="KV dtypes: auto (= float32), float32, bfloat16, float16, int8, fp8")
    ap.add_argument("--tokens", nargs="+", type=int, default=[1024, 4096], help="prompt lengths")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args()
    args.num_blocks = max(args.tokens) // args.block_size + 2
    rows = [r for d in args.dtypes for r in run_dtype(args, d)]
    print(f"# KV transfer, TCP connector over 127.0.0.1, {args.shape} shape, block {args.block_size}; "
          f"{date.today()} {platform.node()} ({torch.get_num_threads()} torch threads)")
    print(f"{'kv dtype':>8} {'tokens':>7} {'MB':>8} {'MB/s':>8} {'ms/1k tok':>10} {'B/token':>8}")
    for r in rows:
        print(f"{r['kv_dtype']:>8} {r['prompt_tokens']:>7} {r['bytes'] / 1e6:>8.1f} {r['MB_per_s']:>8.0f} "
              f"{r['ms_per_1k_tokens']:>10.1f} {r['bytes_per_token']:>8.0f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": str(date.today()), "shape": args.shape, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
