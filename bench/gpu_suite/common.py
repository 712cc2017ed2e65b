"""What every step shares: the step context, result rows, model shapes (full and tiny), engine timing loops.

A step builds a `Step`, measures inside `with step.guard("what"):` blocks (an exception there becomes an
error row and the step goes on), and `step.save()` writes WORK/<name>.json. Rows carry a value, a
reference (a roofline, a peer) with the ratio, and the issue's target with whether it was met (never judged
in a dry run: tiny CPU models say nothing about an H100).
"""
from __future__ import annotations

import contextlib
import gc
import json
import os
import random
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = os.path.join(ROOT, "bench", "configs")
CONFIG_8B = os.path.join(CONFIGS, "llama-3-8b.json")
CONFIG_1B = os.path.join(CONFIGS, "llama-3.2-1b.json")

# H100 figures measured in earlier sessions (../shared/design/ANCHORS.md): the fallback ceilings when the
# device step did not run, and transformers' 8B numbers the suite does not rerun by default.
NOMINAL_BANDWIDTH = 3.0e12  # device-to-device copy, bytes read + written per second
NOMINAL_MATMUL = 802e12  # bf16 GEMM FLOP/s
HF_8B_ANCHORS = {  # transformers generate (sdpa, eager), Llama-3-8B shape, bf16, H100
    "batch1_128_128": 30.4,
    "offline_512x512_256_batch128": 2667.0,
    "offline_512x512_256_batch256": 3435.0,
    "static_cache_batch1_128_256": 83.3,
}
SKIPPED_NO_CUDA = "skipped: no CUDA"

# tiny shapes of the dry run (CPU, float32): "8b" and "1b" roles with the same structure as the real configs
TINY_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
           "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "vocab_size": 512, "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
           "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
           "torch_dtype": "float32"}
TINY_1B = dict(TINY_8B, tie_word_embeddings=True, head_dim=32, num_hidden_layers=2,
               rope_scaling={"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                             "original_max_position_embeddings": 64, "rope_type": "llama3"})


class StepTimeout(BaseException):
    """Raised in a step when the driver's `timeout` sends SIGTERM: the step saves what it has and exits."""


@dataclass
class Ctx:
    """What a step knows about its run: dry or real, CUDA or not, where results go, when it was launched."""

    dry: bool
    cuda: bool
    work: str
    t0: float  # epoch seconds at which the driver launched this step's process
    seed: int = 0

    @property
    def device(self) -> str:
        return "cuda" if self.cuda else "cpu"

    @property
    def dtype(self) -> str:
        return "float32" if self.dry else "bfloat16"

    def ceilings(self) -> tuple[float, float, str]:
        """(copy bandwidth, matmul FLOP/s, source) from the device step, else the nominal H100 figures."""
        path = os.path.join(self.work, "device.json")
        try:
            with open(path) as f:
                d = json.load(f)["details"]
            return float(d["bandwidth"]), float(d["matmul_flops"]), "measured"
        except (OSError, KeyError, ValueError, TypeError):
            return NOMINAL_BANDWIDTH, NOMINAL_MATMUL, "nominal H100"


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


# ---------------------------------------------------------------------------------------------------
# rows and steps
# ---------------------------------------------------------------------------------------------------


def row(metric: str, value: Optional[float], unit: str = "", ref: Optional[float] = None, ref_label: str = "",
        target: Optional[float] = None, note: str = "", higher_is_better: bool = True) -> dict[str, Any]:
    """One table row. target: the ratio value/ref the issue asks for (or the bound on value when ref is None)."""
    ratio = value / ref if value is not None and ref else None
    return {"metric": metric, "value": value, "unit": unit, "ref": ref, "ref_label": ref_label, "ratio": ratio,
            "target": target, "higher_is_better": higher_is_better, "met": None, "note": note}


def num(x: Optional[float], fmt: str = ".2f", scale: float = 1.0) -> str:
    """x * scale formatted for a note, "-" when missing."""
    return "-" if x is None else format(x * scale, fmt)


def judge(r: dict[str, Any]) -> Optional[bool]:
    """Whether a row meets its target (None when it has none or no value)."""
    if r.get("target") is None:
        return None
    x = r["ratio"] if r.get("ref") else r.get("value")
    if x is None:
        return None
    return x >= r["target"] if r.get("higher_is_better", True) else x <= r["target"]


class Step:
    """Rows of one step, written to WORK/<name>.json by save()."""

    def __init__(self, name: str, ctx: Ctx):
        self.name = name
        self.ctx = ctx
        self.rows: list[dict[str, Any]] = []
        self.details: dict[str, Any] = {}
        self.errors: list[str] = []
        self.skipped: Optional[str] = None
        self.started = time.time()

    def add(self, r: dict[str, Any]) -> dict[str, Any]:
        r["met"] = None if self.ctx.dry else judge(r)
        self.rows.append(r)
        return r

    @contextlib.contextmanager
    def guard(self, what: str) -> Iterator[None]:
        """Run one measurement; an exception becomes an error row (with the traceback in the log). The rows
        so far are saved after each measurement, so a step stopped at its time limit keeps them."""
        try:
            yield
        except StepTimeout:
            self.rows.append(row(what, None, note="stopped at the step's time limit"))
            raise
        except Exception as e:  # a measurement failing must not stop the step's other measurements
            traceback.print_exc()
            msg = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
            self.errors.append(f"{what}: {msg}")
            self.rows.append(row(what, None, note=f"error: {msg}"))
            release()
        finally:
            self.save()

    def skip(self, reason: str) -> None:
        self.skipped = reason

    @property
    def status(self) -> str:
        if self.skipped:
            return self.skipped
        if self.errors:
            return f"error: {len(self.errors)} failed ({self.errors[0]})"[:300]
        return "ok"

    def save(self) -> dict[str, Any]:
        out = {"name": self.name, "status": self.status, "seconds": time.time() - self.ctx.t0,
               "rows": self.rows, "details": self.details, "errors": self.errors}
        path = os.path.join(self.ctx.work, f"{self.name}.json")
        with open(path + ".tmp", "w") as f:
            json.dump(out, f, indent=1, default=str)
        os.replace(path + ".tmp", path)
        return out


# ---------------------------------------------------------------------------------------------------
# shapes and model folders
# ---------------------------------------------------------------------------------------------------


def load_config(role: str, dry: bool) -> dict[str, Any]:
    """The config dict of a role ("8b" or "1b"): the real shape, or its tiny stand-in in a dry run."""
    if dry:
        return dict(TINY_8B if role == "8b" else TINY_1B)
    with open(CONFIG_8B if role == "8b" else CONFIG_1B) as f:
        return json.load(f)


def model_folder(cfg: dict[str, Any], **overrides: Any) -> str:
    """A temporary folder holding cfg (with overrides) as config.json: what LLM(model=...) reads."""
    folder = tempfile.mkdtemp(prefix="tokenmill-suite-")
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({**cfg, **overrides}, f)
    return folder


def shape_of(cfg: dict[str, Any]):
    from bench.gpu_roofline import ModelShape

    return ModelShape.from_config(cfg)


def random_prompts(num: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """Random token ids away from the special ids at both ends of the vocabulary."""
    rng = random.Random(seed)
    lo, hi = max(3, vocab // 64), vocab - max(3, vocab // 64)
    return [[rng.randrange(lo, hi) for _ in range(length)] for _ in range(num)]


# ---------------------------------------------------------------------------------------------------
# engine helpers
# ---------------------------------------------------------------------------------------------------


def make_llm(ctx: Ctx, folder: str, **engine_args: Any):
    """tokenmill's LLM on random (dummy) weights, token-id prompts only (no tokenizer is loaded)."""
    from tokenmill import LLM

    args = dict(load_format="dummy", dtype=ctx.dtype, device=ctx.device, skip_tokenizer_init=True, seed=ctx.seed)
    args.update(engine_args)
    return LLM(model=folder, **args)


def build_llm(ctx: Ctx, step: Step, what: str, folder: str, **engine_args: Any) -> tuple[Any, str]:
    """make_llm; when that fails on CUDA with CUDA graphs on, record the error and build once more eagerly
    (numbers without graphs beat no numbers). Returns (llm, a note suffix naming the fallback)."""
    try:
        return make_llm(ctx, folder, **engine_args), ""
    except StepTimeout:
        raise
    except Exception as e:
        if not ctx.cuda or engine_args.get("enforce_eager"):
            raise
        traceback.print_exc()
        msg = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
        step.errors.append(f"{what} with CUDA graphs: {msg}")
        step.rows.append(row(f"{what} with CUDA graphs", None, note=f"error: {msg}; retried with enforce_eager"))
        release()
        return make_llm(ctx, folder, enforce_eager=True, **engine_args), " [eager: the graph build failed]"


def release() -> None:
    """Collect dropped engines (or models) and give their device memory back before the next one is built:
    callers drop their references first (`llm = None`)."""
    gc.unfreeze()  # the CPU runner freezes start-up objects out of the collector's view
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
    except ImportError:
        pass


def kv_cache_bytes(llm: Any) -> int:
    """Bytes the engine's KV cache holds on the device (quantized caches: data + scales)."""
    total = 0
    for c in llm.engine.core.runner.kv_caches:
        total += c.nbytes() if callable(getattr(c, "nbytes", None)) else c.numel() * c.element_size()
    return total


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def generate_throughput(llm: Any, prompts: list[list[int]], max_tokens: int) -> dict[str, Any]:
    """All prompts at once (greedy, EOS ignored): wall time, generated tokens per second, preemptions."""
    from tokenmill import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    before = llm.engine.stats()
    sync()
    t = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    sync()
    dt = time.perf_counter() - t
    after = llm.engine.stats()
    gen = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"requests": len(prompts), "seconds": dt, "output_tokens": gen, "output_tokens_per_s": gen / dt,
            "requests_per_s": len(prompts) / dt, "prompt_tokens": sum(len(p) for p in prompts),
            "preemptions": after.num_preemptions - before.num_preemptions,
            "prefix_cache_hits": after.prefix_cache_hits - before.prefix_cache_hits,
            "errors": sum(1 for o in outs if o.error)}


def decode_timing(llm: Any, prompts: list[list[int]], max_tokens: int) -> dict[str, Any]:
    """Step the engine by hand: time to the first token of every request, then the decode steps.

    decode_tokens_per_s = tokens generated after every request had its first one / the time of those steps.
    """
    import statistics

    from tokenmill import SamplingParams

    eng = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    base = f"dt{time.monotonic_ns()}-"
    for i, p in enumerate(prompts):
        eng.add_request(f"{base}{i}", None, params, prompt_token_ids=p)
    counts: dict[str, int] = {}
    sync()
    t0 = time.perf_counter()
    first_all: Optional[float] = None
    tokens_at_first = 0
    steps: list[float] = []
    while eng.has_unfinished_requests():
        ts = time.perf_counter()
        outs = eng.step()
        te = time.perf_counter()
        for o in outs:
            counts[o.request_id] = len(o.outputs[0].token_ids)
        if first_all is None:
            if len(counts) == len(prompts) and all(counts.values()):
                first_all = te
                tokens_at_first = sum(counts.values())
        else:
            steps.append(te - ts)
    sync()
    end = time.perf_counter()
    total = sum(counts.values())
    decode_s = end - first_all if first_all is not None else None
    decode_tokens = total - tokens_at_first
    return {"requests": len(prompts), "prompt_len": len(prompts[0]), "output_tokens": total,
            "ttft_s": (first_all - t0) if first_all is not None else None, "decode_seconds": decode_s,
            "decode_tokens": decode_tokens,
            "decode_tokens_per_s": decode_tokens / decode_s if decode_s else None,
            "step_ms_p50": statistics.median(steps) * 1e3 if steps else None,
            "step_ms_min": min(steps) * 1e3 if steps else None, "decode_steps": len(steps),
            "e2e_seconds": end - t0}


def engine_facts(llm: Any) -> dict[str, Any]:
    """What the loaded engine chose: backend, graphs, KV blocks, memory plan."""
    runner = llm.engine.core.runner
    ds = runner.device_setup
    plan = ds.plan
    return {"attention_backend": ds.backend_name, "graph_sizes": ds.graphs.captured_sizes if ds.graphs else [],
            "num_blocks": runner.num_blocks, "block_size": runner.block_size, "max_model_len": runner.max_model_len,
            "load_time_s": runner.load_time_s, "kv_cache_bytes": kv_cache_bytes(llm),
            "plan": plan.table() if plan is not None else None}


def graph_replays(llm: Any) -> int:
    return llm.engine.core.runner.device_setup.num_graph_replays
