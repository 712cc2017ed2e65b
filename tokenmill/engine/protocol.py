"""The interface the HTTP server (and benchmarks) use to talk to an engine."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Optional, Protocol

from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import SamplingParams


@dataclass
class EngineStats:
    """A snapshot for /metrics and /health."""

    num_running: int = 0
    num_waiting: int = 0
    kv_blocks_total: int = 0
    kv_blocks_used: int = 0
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache (cumulative)
    prefix_cache_hits: int = 0  # of those, tokens found (cumulative)
    num_preemptions: int = 0  # cumulative
    kv_offload_swapped_out_blocks: int = 0  # KV blocks copied to the CPU offload tier (cumulative)
    kv_offload_swapped_in_blocks: int = 0  # KV blocks copied back from it (cumulative)
    kv_offload_prefix_hits: int = 0  # prompt tokens found in its prefix index (cumulative)
    kv_transfer_sent: int = 0  # disaggregation, producer: prefilled requests whose blocks were served or expired
    kv_transfer_recv_ok: int = 0  # consumer: requests whose prompt KV arrived (cumulative)
    kv_transfer_recv_failed: int = 0  # consumer: requests whose pull failed or was late: prompt recomputed
    prompt_tokens: int = 0  # cumulative prompt tokens computed
    generation_tokens: int = 0  # cumulative tokens generated
    steps: int = 0
    last_step_time: float = 0.0  # time.monotonic() of the last completed step (watchdog)
    loop_alive: bool = True
    moe: Optional[Any] = None  # MoE models: tokenmill.core.expert_cache.MoEStats (routing, expert cache)
    # multi-LoRA (enable_lora): adapter name -> requests added / tokens generated (cumulative)
    lora_requests: dict = field(default_factory=dict)
    lora_generation_tokens: dict = field(default_factory=dict)
    lora_unfused_steps: int = 0  # CPU steps that ran the per-op path instead of the fused C layer for LoRA rows
    lora_reloads: int = 0  # adapters read again from their folder after an LRU drop (max_cpu_loras)


def merge_stats(parts: list[EngineStats]) -> EngineStats:
    """Several engines' statistics (data-parallel replicas) as one: counts summed (per key for the per-adapter
    dicts), alive only if all are, the latest step time, MoE routing merged."""
    total = EngineStats()
    for name, value in vars(total).items():
        got = [getattr(s, name) for s in parts]
        if isinstance(value, bool):
            setattr(total, name, all(got))
        elif name == "last_step_time":
            total.last_step_time = max(got, default=0.0)
        elif isinstance(value, dict):
            merged: dict = {}
            for d in got:
                for k, v in d.items():
                    merged[k] = merged.get(k, 0) + v
            setattr(total, name, merged)
        elif name == "moe":
            from tokenmill.core.expert_cache import MoEStats

            moe = [m for m in got if m is not None]
            total.moe = MoEStats.merge(moe) if moe else None
        else:
            setattr(total, name, sum(got))
    return total


class EngineClient(Protocol):
    """What `tokenmill.engine.async_engine.AsyncEngine` offers.

    generate() yields RequestOutputs as tokens arrive; each carries cumulative fields plus the delta_*
    fields of what changed; the last has finished=True. With params.n > 1, outputs[i] is sample i and
    each update touches one or more of them. Raises TokenmillError subclasses (before the first yield)
    for bad input and EngineOverloadedError when the waiting queue is full. Cancelling the iterator
    (client disconnect) aborts the request and frees its KV blocks.
    """

    model_name: str
    max_model_len: int
    tokenizer: Any
    processor: Any  # tokenmill.engine.processor.Processor (chat template, tokenize, validate)

    def generate(self, prompt: Optional[str], params: SamplingParams, request_id: str,
                 prompt_token_ids: Optional[list[int]] = None) -> AsyncIterator[RequestOutput]: ...

    async def abort(self, request_id: str) -> None: ...

    def get_stats(self) -> EngineStats: ...

    @property
    def is_alive(self) -> bool: ...

    async def shutdown(self, grace_s: float = 5.0) -> None: ...
