"""Tensor parallelism on the CPU: TP=2 against TP=1 on the same cores, and what one all-reduce costs.

On a CPU the ranks share the machine's cores (each rank gets cores / N torch threads), so TP cannot be
faster there; the point of TP on the CPU is correctness (tests/distributed/). This measures the price:

  engine   a model of a real shape with random weights (default Llama-3.2-1B: 32 heads, 8 KV heads; the
           default SmolLM2's 9 heads do not split over 2 ranks), float32, N requests of IN prompt + OUT
           output tokens, offline: tok/s of the batch and single-stream TPOT for TP=1 (uni executor, all
           cores) and TP=2 (mp executor, two ranks of cores / 2 threads). Random weights differ per split, so
           tokens are not compared here (tests/distributed/ compare them on real weights).
  comm     gloo all-reduce of a [T, hidden] float32 tensor between two processes (T tokens in a step), the
           median of many; a step does 2 per layer + 1 (embedding), plus one all-gather of the logits

    PYTHONPATH=. python bench/tp_cpu.py [--config bench/configs/llama-3.2-1b.json] [--requests 8 --in-len 64
        --out-len 32] [--out bench/results/exec/tp_cpu.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time



def _model_folder(cfg_path: str) -> str:
    import shutil
    import tempfile

    folder = tempfile.mkdtemp(prefix="tokenmill-shape-")
    shutil.copy(cfg_path, os.path.join(folder, "config.json"))
    return folder


def engine_run(tp: int, args) -> dict:
    from tokenmill import LLM, SamplingParams

    llm = LLM(_model_folder(args.config), load_format="dummy", skip_tokenizer_init=True, dtype="float32",
              tensor_parallel_size=tp, max_model_len=1024, kv_cache_memory=0.5)
    try:
        params = SamplingParams(temperature=0, max_tokens=args.out_len, ignore_eos=True)
        prompt = list(range(1000, 1000 + args.in_len))
        llm.generate([{"prompt_token_ids": prompt}], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
        t0 = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": [t + i for t in prompt]} for i in range(args.requests)], params,
                            use_tqdm=False)
        batch_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        llm.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
        prefill_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
        single_s = time.perf_counter() - t0
        assert all(len(o.outputs[0].token_ids) == args.out_len for o in outs)
        return {"tp": tp, "batch_tok_s": args.requests * args.out_len / batch_s,
                "single_tpot_ms": 1000 * (single_s - prefill_s) / (args.out_len - 1)}
    finally:
        llm.shutdown()


def _comm_rank(rank: int, port: int, sizes: list[int], reps: int, hidden: int, q) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    res = {}
    for t in sizes:
        x = torch.randn(t, hidden)
        for _ in range(10):
            dist.all_reduce(x)
        times = []
        for _ in range(reps):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(x)
            times.append(time.perf_counter() - t0)
        res[t] = 1e6 * statistics.median(times)
    dist.destroy_process_group()
    if rank == 0:
        q.put(res)


def comm_run(args, hidden: int, layers: int) -> dict:
    import multiprocessing

    from tokenmill.executor.multiproc import free_port

    mp = multiprocessing.get_context("spawn")
    q = mp.Queue()
    port = free_port()
    sizes = [1, 8, 64, 256]
    procs = [mp.Process(target=_comm_rank, args=(r, port, sizes, args.reps, hidden, q)) for r in range(2)]
    for p in procs:
        p.start()
    res = q.get(timeout=600)
    for p in procs:
        p.join(60)
    return {str(t): {"all_reduce_us": us, "per_step_ms": (2 * layers + 1) * us / 1000} for t, us in res.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="bench/configs/llama-3.2-1b.json")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--in-len", type=int, default=64)
    ap.add_argument("--out-len", type=int, default=32)
    ap.add_argument("--reps", type=int, default=300)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    with open(args.config) as f:
        cfg = json.load(f)
    runs = [engine_run(tp, args) for tp in (1, 2)]
    comm = comm_run(args, cfg["hidden_size"], cfg["num_hidden_layers"])
    print(f"{'TP':>3}{'batch tok/s':>13}{'1-stream TPOT ms':>18}")
    for r in runs:
        print(f"{r['tp']:>3}{r['batch_tok_s']:>13.1f}{r['single_tpot_ms']:>18.1f}")
    print(f"{'tokens':>7}{'all-reduce us':>15}{'x(2L+1) ms/step':>17}")
    for t, c in comm.items():
        print(f"{t:>7}{c['all_reduce_us']:>15.1f}{c['per_step_ms']:>17.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "args": vars(args),
                       "cpu_count": os.cpu_count(), "load_avg_after": os.getloadavg(), "engine": runs,
                       "comm": comm}, f, indent=2)


if __name__ == "__main__":
    main()
