"""Fine-tuning co-served with inference: what a running job costs the chat workload's TPOT SLO attainment, and
what training throughput it gets beside the traffic against the same job alone.

One `tokenmill serve` (policy fcfs, --slo-tpot-ms given so the fine-tuner knows what a step may take, weights
dequantized: training needs float weights, so every phase runs on them) and three phases:
  1. the job alone (no traffic): training tokens/s;
  2. the chat workload at --rate, no job: SLO attainment (TPOT only), TTFT / TPOT percentiles;
  3. the same workload (same seed) with a long job running: attainment, and the job's tokens/s over that time.

  PYTHONPATH=. flock /work/bench.lock python bench/coserve.py --rate 0.5 --num-requests 40 --slo-tpot 100 \
      --out bench/results/coserve.json [-- extra serve flags]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tokenmill.bench.launch import server_process  # noqa: E402
from tokenmill.bench.serve import run_serve_benchmark  # noqa: E402

TOPICS = ["rivers", "stars", "bread", "chess", "rain", "copper", "owls", "maps", "glass", "tides", "moss", "kites"]


def training_file(n: int) -> bytes:
    """n short chat examples (~50 tokens each with SmolLM2's template)."""
    lines = []
    for i in range(n):
        t = TOPICS[i % len(TOPICS)]
        lines.append(json.dumps({"messages": [
            {"role": "user", "content": f"Give me one fact about {t}."},
            {"role": "assistant", "content": f"Fact {i}: {t} are more interesting than they look."}]}))
    return ("\n".join(lines) + "\n").encode()


def _post_job(client, model: str, file_id: str, epochs: int):
    return client.fine_tuning.jobs.create(model=model, training_file=file_id,
                                          hyperparameters={"n_epochs": epochs, "batch_size": 4},
                                          extra_body={"lora_rank": 8, "target_modules": "all"})


def _summary(r) -> dict:
    s = r.summary
    return {k: s[k] for k in ("slo_attainment", "goodput", "output_throughput", "ttft_ms", "tpot_ms", "completed",
                              "failed", "duration_s")}


def main(argv: list[str]) -> int:
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", default="chat:in_median=100,out_median=48,out_max=128")
    p.add_argument("--rate", type=float, default=0.5)
    p.add_argument("--num-requests", type=int, default=40)
    p.add_argument("--slo-tpot", type=float, default=100.0)
    p.add_argument("--examples", type=int, default=24, help="training examples of the job")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    import openai

    from goodput_compare import default_tokenizer  # noqa: E402 - bench/ is on sys.path as the script's folder

    tokenizer = None if "--model" in extra else default_tokenizer()
    cmd = [sys.executable, "-m", "tokenmill.cli", "serve", "--policy", "fcfs", "--slo-tpot-ms", str(args.slo_tpot),
           "--quantization", "none", "--port", "{port}", *extra]
    res: dict = {"workload": args.workload, "rate": args.rate, "num_requests": args.num_requests,
                 "slo_tpot_ms": args.slo_tpot, "serve_args": cmd[3:], "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                                           time.gmtime())}
    with server_process(cmd, log_path="/tmp/coserve_server.log", env={"PYTHONPATH": str(ROOT)}) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
        model = client.models.list().data[0].id
        f = client.files.create(file=("train.jsonl", training_file(args.examples)), purpose="fine-tune")

        # 1. the job alone
        t0 = time.monotonic()
        job = _post_job(client, model, f.id, epochs=2)
        while (j := client.fine_tuning.jobs.retrieve(job.id)).status not in ("succeeded", "failed", "cancelled"):
            time.sleep(0.1)
        alone_s = time.monotonic() - t0
        assert j.status == "succeeded", j.error
        res["alone"] = {"trained_tokens": j.trained_tokens, "seconds": round(alone_s, 2),
                        "tokens_per_s": round(j.trained_tokens / alone_s, 1)}
        print(f"job alone: {j.trained_tokens} tokens in {alone_s:.1f} s = {j.trained_tokens / alone_s:.1f} tok/s",
              flush=True)

        def bench():
            return run_serve_benchmark(base, args.workload, [args.rate], num_requests=args.num_requests,
                                       slo_tpot_ms=args.slo_tpot, seed=args.seed, progress=False,
                                       tokenizer=tokenizer)[0]

        # 2. traffic alone
        r = bench()
        res["traffic_alone"] = _summary(r)
        # 3. traffic with a long job running
        long = _post_job(client, model, f.id, epochs=100)
        while client.fine_tuning.jobs.retrieve(long.id).status != "running":
            time.sleep(0.05)
        tok0 = client.fine_tuning.jobs.retrieve(long.id).trained_tokens or 0
        t0 = time.monotonic()
        r2 = bench()
        dt = time.monotonic() - t0
        tok1 = client.fine_tuning.jobs.retrieve(long.id).trained_tokens or 0
        client.fine_tuning.jobs.cancel(long.id)
        res["traffic_with_job"] = _summary(r2)
        res["with_traffic"] = {"trained_tokens": tok1 - tok0, "seconds": round(dt, 2),
                               "tokens_per_s": round((tok1 - tok0) / dt, 1)}
    a, b = res["traffic_alone"], res["traffic_with_job"]
    res["attainment_drop_points"] = round(100 * (a["slo_attainment"] - b["slo_attainment"]), 1)
    res["training_share"] = round(res["with_traffic"]["tokens_per_s"] / res["alone"]["tokens_per_s"], 3)
    for name, s in (("no job", a), ("with job", b)):
        print(f"{name:>8}: attainment {s['slo_attainment']:.2f}, TTFT p50 {s['ttft_ms']['p50']:.0f} ms p90 "
              f"{s['ttft_ms']['p90']:.0f} ms, TPOT p50 {s['tpot_ms']['p50']:.1f} ms p90 {s['tpot_ms']['p90']:.1f} ms, "
              f"{s['output_throughput']:.1f} tok/s", flush=True)
    print(f"attainment drop: {res['attainment_drop_points']} points; training {res['with_traffic']['tokens_per_s']} "
          f"tok/s beside traffic vs {res['alone']['tokens_per_s']} alone ({100 * res['training_share']:.0f}%)")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
