"""GPU roofline: measure the device, compute what the workloads could reach, time transformers (and tokenmill).

Run on a GPU machine (results go in a bench/results/ folder with date, device and command, and the GPU table of docs/PERFORMANCE.md):

    python bench/gpu_roofline.py --config bench/configs/llama-3-8b.json --measure --hf --out roofline.json
    python bench/gpu_roofline.py --config bench/configs/llama-3-8b.json --tokenmill   # once the engine runs

Roofline models (pure functions below, unit-tested on CPU in tests/gpu/test_roofline_math.py):
- batch-1 decode: one step reads every weight once -> weight bytes / copy bandwidth per token.
- offline batch (512 requests x 512 prompt / 256 output, all resident): prefill FLOPs / matmul rate
  + for each of the 256 decode steps, (weights + the KV of every request) / bandwidth.
- long-context decode (batch 1 at 32k): (weights + 32k tokens of KV) / bandwidth per token.
Copy bandwidth counts bytes read + bytes written; matmul rate is a square bf16 GEMM.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional

# ---------------------------------------------------------------------------------------------------
# model shape and roofline math (pure Python)
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a decoder-only transformer config that cost bytes and FLOPs."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    qkv_bias: bool = False

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> "ModelShape":
        heads = cfg["num_attention_heads"]
        return cls(hidden=cfg["hidden_size"], layers=cfg["num_hidden_layers"], heads=heads,
                   kv_heads=cfg.get("num_key_value_heads", heads),
                   head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
                   intermediate=cfg["intermediate_size"], vocab=cfg["vocab_size"],
                   tied=bool(cfg.get("tie_word_embeddings", False)),
                   qkv_bias=cfg.get("model_type") == "qwen2" or bool(cfg.get("attention_bias", False)))

    def layer_params(self) -> int:
        q = self.heads * self.head_dim
        kv = self.kv_heads * self.head_dim
        attn = self.hidden * (q + 2 * kv) + q * self.hidden + ((q + 2 * kv) if self.qkv_bias else 0)
        mlp = 3 * self.hidden * self.intermediate  # gate, up, down
        return attn + mlp + 2 * self.hidden  # + two RMSNorm weights

    def params(self) -> int:
        """All parameters (embedding counted once when tied)."""
        emb = self.vocab * self.hidden
        return self.layers * self.layer_params() + emb + (0 if self.tied else emb) + self.hidden

    def matmul_params(self) -> int:
        """Parameters every token multiplies through: layers + the LM head (not the embedding lookup)."""
        return self.layers * self.layer_params() + self.vocab * self.hidden + self.hidden

    def weight_bytes(self, dtype_bytes: int = 2) -> int:
        return self.params() * dtype_bytes

    def step_weight_bytes(self, dtype_bytes: int = 2) -> int:
        """Weight bytes one decode step reads: every matrix once; an untied embedding only row-wise (~0)."""
        return self.matmul_params() * dtype_bytes

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        return self.layers * 2 * self.kv_heads * self.head_dim * dtype_bytes

    def attention_flops(self, query_pos: int) -> int:
        """QK^T and PV FLOPs of one token at 0-based position query_pos (it sees query_pos + 1 keys)."""
        return 4 * self.layers * self.heads * self.head_dim * (query_pos + 1)

    def prefill_flops(self, prompt_len: int, logits_rows: int = 1) -> int:
        """One prompt: linear layers for every token, causal attention, LM head only for logits_rows."""
        linear = 2 * self.layers * self.layer_params() * prompt_len
        attn = 4 * self.layers * self.heads * self.head_dim * prompt_len * (prompt_len + 1) // 2
        head = 2 * self.vocab * self.hidden * logits_rows
        return linear + attn + head


@dataclass(frozen=True)
class Roofline:
    name: str
    seconds: float  # lower bound on the workload's time
    output_tokens: int

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds

    @property
    def ms_per_step(self) -> float:
        return self.seconds * 1e3


def decode_step_seconds(shape: ModelShape, context_lens: list[int], bandwidth: float, dtype_bytes: int = 2,
                        full_weights: bool = False) -> float:
    """One decode step of len(context_lens) requests: weights once + every request's KV, over bandwidth.

    full_weights: count all parameter bytes (the issue's headline model) instead of the bytes a step reads.
    """
    weights = shape.weight_bytes(dtype_bytes) if full_weights else shape.step_weight_bytes(dtype_bytes)
    kv = sum(context_lens) * shape.kv_bytes_per_token(dtype_bytes)
    return (weights + kv) / bandwidth


def batch1_decode_roofline(shape: ModelShape, bandwidth: float, dtype_bytes: int = 2, context: int = 0,
                           full_weights: bool = True) -> Roofline:
    """Batch-1 decode: weight bytes (and the KV of `context` tokens) / bandwidth per token."""
    s = decode_step_seconds(shape, [context] if context else [], bandwidth, dtype_bytes, full_weights)
    return Roofline(f"batch-1 decode @ ctx {context}", s, 1)


def offline_roofline(shape: ModelShape, bandwidth: float, matmul_flops: float, num_requests: int = 512,
                     prompt_len: int = 512, output_len: int = 256, dtype_bytes: int = 2,
                     full_weights: bool = True) -> Roofline:
    """All requests resident: prefill FLOPs / matmul rate + each decode step's weights and KV / bandwidth.

    The first output token comes from the prefill; step i (1 .. output_len-1) attends over prompt_len + i
    tokens per request.
    """
    prefill = num_requests * shape.prefill_flops(prompt_len) / matmul_flops
    decode = sum(decode_step_seconds(shape, [prompt_len + i] * num_requests, bandwidth, dtype_bytes, full_weights)
                 for i in range(1, output_len))
    return Roofline(f"offline {num_requests} x ({prompt_len} in, {output_len} out)", prefill + decode,
                    num_requests * output_len)


def long_context_roofline(shape: ModelShape, bandwidth: float, context: int = 32768, batch: int = 1,
                          dtype_bytes: int = 2, full_weights: bool = True) -> Roofline:
    """Decode at a long context: (weights + batch * context tokens of KV) / bandwidth per step."""
    s = decode_step_seconds(shape, [context] * batch, bandwidth, dtype_bytes, full_weights)
    return Roofline(f"decode batch {batch} @ ctx {context}", s, batch)


def rooflines(shape: ModelShape, bandwidth: float, matmul_flops: float) -> list[Roofline]:
    return [batch1_decode_roofline(shape, bandwidth), offline_roofline(shape, bandwidth, matmul_flops),
            long_context_roofline(shape, bandwidth)]


def format_table(rows: list[Roofline], measured: Optional[dict[str, float]] = None) -> str:
    """Markdown table: roofline tok/s and ms per unit, and measured tok/s with its share of the roofline."""
    measured = measured or {}
    out = ["| workload | roofline tok/s | roofline time | measured tok/s | % of roofline |", "|---|---|---|---|---|"]
    for r in rows:
        m = measured.get(r.name)
        pct = f"{100 * m / r.tokens_per_s:.0f}%" if m else ""
        out.append(f"| {r.name} | {r.tokens_per_s:,.0f} | {r.seconds * 1e3:,.2f} ms | "
                   f"{f'{m:,.1f}' if m else ''} | {pct} |")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------
# device measurements (torch, CUDA)
# ---------------------------------------------------------------------------------------------------


def _cuda_time(fn: Callable[[], Any], iters: int, warmup: int = 3) -> float:
    """Mean seconds per call, timed with CUDA events."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def measure_copy_bandwidth(nbytes: int = 1 << 30, iters: int = 20) -> float:
    """Device-to-device copy, bytes read + written per second."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    s = _cuda_time(lambda: dst.copy_(src), iters)
    return 2 * nbytes / s


def measure_matmul_flops(n: int = 8192, iters: int = 20) -> float:
    """bf16 square GEMM FLOP/s."""
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    s = _cuda_time(lambda: a @ b, iters)
    return 2 * n ** 3 / s


def _model_folder(cfg_path: str) -> str:
    """A temporary folder holding cfg_path as config.json (what LLM(model=...) and transformers read)."""
    folder = tempfile.mkdtemp(prefix="tokenmill-shape-")
    shutil.copy(cfg_path, os.path.join(folder, "config.json"))
    return folder


def _random_prompts(num: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[rng.randrange(100, vocab) for _ in range(length)] for _ in range(num)]


def run_transformers(cfg_path: str, num_prompts: int, prompt_len: int, max_tokens: int, batch_size: int,
                     dtype: str = "bfloat16") -> dict[str, float]:
    """transformers `generate` (sdpa, greedy, EOS ignored) on random weights of the config's shape."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(_model_folder(cfg_path))
    model = AutoModelForCausalLM.from_config(cfg, torch_dtype=getattr(torch, dtype),
                                             attn_implementation="sdpa").cuda().eval()
    prompts = _random_prompts(num_prompts, prompt_len, cfg.vocab_size)
    gen = dict(max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        model.generate(torch.tensor(prompts[:1], device="cuda"), **{**gen, "max_new_tokens": 4,
                                                                    "min_new_tokens": 4})  # warm-up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        generated = 0
        for i in range(0, num_prompts, batch_size):
            ids = torch.tensor(prompts[i:i + batch_size], device="cuda")
            out = model.generate(ids, attention_mask=torch.ones_like(ids), **gen)
            generated += (out.shape[1] - ids.shape[1]) * ids.shape[0]
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 1e9
    del model
    torch.cuda.empty_cache()
    return {"seconds": dt, "output_tokens": generated, "tokens_per_s": generated / dt, "peak_gb": peak}


def run_tokenmill(cfg_path: str, num_prompts: int, prompt_len: int, max_tokens: int,
                  **engine_args: Any) -> dict[str, float]:
    """tokenmill's LLM on random (dummy) weights of the config's shape; engine_args go to LLM(...)
    (e.g. max_num_seqs=256, max_model_len=33000); prompts are token ids, so no tokenizer is loaded."""
    from tokenmill import LLM, SamplingParams

    args = {"load_format": "dummy", "dtype": "bfloat16", "skip_tokenizer_init": True, **engine_args}
    llm = LLM(model=_model_folder(cfg_path), **args)
    with open(cfg_path) as f:
        vocab = json.load(f)["vocab_size"]
    prompts = [{"prompt_token_ids": p} for p in _random_prompts(num_prompts, prompt_len, vocab)]
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    llm.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    dt = time.perf_counter() - t0
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"seconds": dt, "output_tokens": generated, "tokens_per_s": generated / dt}


# ---------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------

WORKLOADS = {  # name -> (num_prompts, prompt_len, max_tokens, transformers batch size)
    "batch1": (1, 128, 256, 1),
    "offline": (512, 512, 256, 128),
    "long": (1, 32768, 128, 1),
}


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="bench/configs/llama-3-8b.json")
    ap.add_argument("--measure", action="store_true", help="measure copy bandwidth and bf16 matmul rate")
    ap.add_argument("--bandwidth", type=float, default=3.0e12, help="bytes/s when not measured (H100: ~3.0e12)")
    ap.add_argument("--matmul", type=float, default=802e12, help="FLOP/s when not measured (H100: ~802e12)")
    ap.add_argument("--hf", action="store_true", help="time transformers generate")
    ap.add_argument("--tokenmill", action="store_true", help="time tokenmill LLM.generate")
    ap.add_argument("--workloads", default="batch1,offline,long")
    ap.add_argument("--hf-batch", type=int, default=None, help="transformers batch size for the offline run")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    a = ap.parse_args(argv)
    with open(a.config) as f:
        shape = ModelShape.from_config(json.load(f))
    bw, mm = a.bandwidth, a.matmul
    result: dict[str, Any] = {"config": a.config, "shape": asdict(shape), "params": shape.params()}
    if a.measure:
        import torch

        bw, mm = measure_copy_bandwidth(), measure_matmul_flops()
        result["device"] = torch.cuda.get_device_name()
    result.update(bandwidth=bw, matmul_flops=mm)
    rows = rooflines(shape, bw, mm)
    names = dict(zip(WORKLOADS, (r.name for r in rows)))
    measured: dict[str, float] = {}
    for w in a.workloads.split(","):
        n, p, m, b = WORKLOADS[w]
        if w == "offline" and a.hf_batch:
            b = a.hf_batch
        if a.hf:
            r = run_transformers(a.config, n, p, m, b)
            result[f"transformers/{w}"] = r
            measured[names[w]] = r["tokens_per_s"]
        if a.tokenmill:
            result[f"tokenmill/{w}"] = run_tokenmill(a.config, n, p, m, max_model_len=p + m + 16)
    result["rooflines"] = [dict(asdict(r), tokens_per_s=r.tokens_per_s) for r in rows]
    print(f"{a.config}: {shape.params() / 1e9:.2f} B params, {shape.weight_bytes() / 1e9:.2f} GB bf16, "
          f"bandwidth {bw / 1e12:.2f} TB/s, matmul {mm / 1e12:.0f} TFLOP/s")
    print(format_table(rows, measured))
    for key, r in result.items():
        if key.startswith(("transformers/", "tokenmill/")):
            print(f"{key}: {r['tokens_per_s']:,.1f} tok/s ({r['output_tokens']} tokens in {r['seconds']:.2f} s)")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
