"""The one contract between the scheduler (pure Python) and device code.

SchedulerOutput goes in; ModelRunnerOutput comes back. Nothing else crosses. No torch here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from tokenmill.sampling_params import SamplingParams


@dataclass
class NewRequestData:
    """A request the runner has no state for: first scheduled, or resumed after preemption.

    all_token_ids = prompt + outputs so far (outputs are non-empty for a resumed request).
    """

    req_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int
    eos_token_ids: tuple[int, ...] = ()  # the request's EOS ids (the sampler bans them before min_tokens)
    lora_int_id: int = 0  # its LoRA adapter (0: the base model)


@dataclass
class CachedRequestData:
    """A request the runner already holds: only the diff since its last step."""

    req_id: str
    new_block_ids: list[int]
    num_computed_tokens: int


@dataclass
class KVStreamingStep:
    """A kv_eviction="streaming" request's cache this step (see core/streaming.py); the runner applies it
    before the forward: drop `num_evicted_blocks` block-table entries after the sinks, rotate the keys of
    `shift_block_ids` by `shift` positions, and place tokens at cache indices (text index - evicted)."""

    num_sink_tokens: int
    num_evicted_tokens: int  # text tokens evicted so far, this step's included
    num_evicted_blocks: int  # evicted this step
    shift_block_ids: list[int]  # kept non-sink blocks whose keys are re-rotated
    shift: int  # RoPE position delta (-evicted tokens this step)


@dataclass
class SchedulerOutput:
    scheduled_new_reqs: list[NewRequestData] = field(default_factory=list)
    scheduled_cached_reqs: list[CachedRequestData] = field(default_factory=list)
    # req_id -> number of tokens to compute this step (includes spec tokens)
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)
    total_num_scheduled_tokens: int = 0
    # req_id -> draft tokens to verify this step (appended after the request's last token)
    scheduled_spec_decode_tokens: dict[str, list[int]] = field(default_factory=dict)
    # requests whose runner-side state must be dropped (finished, aborted or preempted)
    finished_req_ids: set[str] = field(default_factory=set)
    preempted_req_ids: set[str] = field(default_factory=set)
    # CPU offload tier copies, done by the runner before the forward: all swap-outs, then all swap-ins
    kv_swap_out: list[tuple[int, int]] = field(default_factory=list)  # (device block, host block)
    kv_swap_in: list[tuple[int, int]] = field(default_factory=list)  # (host block, device block)
    # req_id -> eviction / cache-position info of scheduled kv_eviction="streaming" requests
    kv_streaming: dict[str, KVStreamingStep] = field(default_factory=dict)
    # constrained decoding, filled by the engine after schedule() (tokenmill/structured): an int32 numpy array
    # [rows, ceil(vocab / 32)], bit t % 32 of word t // 32 set = token t allowed; a constrained request has
    # 1 + len(its scheduled spec tokens) consecutive rows from grammar_rows[req_id], one per position it
    # samples or verifies. The runner masks those logits rows before sampling (only where it samples).
    grammar_bitmask: Optional[Any] = None
    grammar_rows: dict[str, int] = field(default_factory=dict)
    # req_id -> tokens appended to a running request outside sampling (grammar jump-forward) since the runner
    # last saw it; they are computed like prompt tokens (they are in num_scheduled_tokens)
    forced_token_ids: dict[str, list[int]] = field(default_factory=dict)
    # multi-LoRA, filled by the engine after schedule(): adapters the runner loads into a slot before this
    # step (id -> tokenmill.lora.adapter.LoRAWeights) and drops (ids), loads after drops
    lora_loads: dict[int, Any] = field(default_factory=dict)
    lora_unloads: list[int] = field(default_factory=list)
    # disaggregated prefill / decode (core/kv_transfer.py): blocks to serve, blocks to pull, pulls to cancel
    kv_transfer: Optional[Any] = None  # a KVTransferStep, or None

    @property
    def is_empty(self) -> bool:
        return self.total_num_scheduled_tokens == 0


@dataclass
class Logprob:
    """One position's log-probabilities: the chosen token first, then the top-k (descending)."""

    token_id: int
    logprob: float
    rank: int  # 1-based rank of token_id in the distribution
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class ModelRunnerOutput:
    req_ids: list[str] = field(default_factory=list)
    # per request, in req_ids order: tokens sampled this step ([] for a partial prefill chunk;
    # more than one when speculative tokens were accepted)
    sampled_token_ids: list[list[int]] = field(default_factory=list)
    # per request: one Logprob per sampled token, or None when not asked for
    logprobs: list[Optional[list[Logprob]]] = field(default_factory=list)
    # req_id -> Logprob per prompt position computed this step (position 0 has no logprob: None)
    prompt_logprobs: dict[str, list[Optional[Logprob]]] = field(default_factory=dict)
    # req_id -> draft tokens proposed for the next step
    draft_token_ids: dict[str, list[int]] = field(default_factory=dict)
    # req_id -> error message, when the step failed for that request
    errors: dict[str, str] = field(default_factory=dict)
    # MoE models: cumulative routing statistics (tokenmill.core.expert_cache.MoEStats); None for dense models
    moe_stats: Optional[Any] = None
    # disaggregated prefill / decode: requests whose blocks the KV connector has finished serving (sent or timed
    # out: the producer frees them), and pulls it has finished (req_id -> True: KV in place, False: recompute)
    kv_sent: list[str] = field(default_factory=list)
    kv_recved: dict[str, bool] = field(default_factory=dict)


@dataclass
class EngineCoreOutput:
    """What one step changed for one request (the scheduler's answer to the engine)."""

    req_id: str
    new_token_ids: list[int]
    new_logprobs: Optional[list[Logprob]] = None
    finish_reason: Optional[str] = None  # FinishReason value when the request finished this step
    stop_reason: Optional[int | str] = None
    prompt_logprobs: Optional[list[Optional[Logprob]]] = None
    error: Optional[str] = None
    # when the scheduler first gave the request a step (time.monotonic()), and its prefix-cache hit then
    first_scheduled_time: Optional[float] = None
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
