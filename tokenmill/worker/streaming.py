"""Runner side of kv_eviction="streaming" (StreamingLLM; the scheduler side is core/streaming.py).

Before a step's forward: drop the evicted blocks from the requests' block tables and re-rotate the keys of
their kept non-sink blocks by the shift (every layer). While building the batch: a streaming request's
tokens sit at cache positions (text index - evicted tokens, for text indices past the sinks), which are
also their RoPE positions and what seq_lens count.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch

from tokenmill.core.outputs import SchedulerOutput
from tokenmill.model.layers.rotary import RotaryEmbedding, shift_cached_keys_, shift_cos_sin

if TYPE_CHECKING:
    from tokenmill.worker.input_batch import RunnerRequestState


def find_rotary(model: Optional[torch.nn.Module]) -> Optional[RotaryEmbedding]:
    """The model's (shared) rotary embedding, or None."""
    if model is None:
        return None
    return next((m for m in model.modules() if isinstance(m, RotaryEmbedding)), None)


def apply_kv_streaming(states: dict[str, "RunnerRequestState"], sched: SchedulerOutput, kv_caches: list,
                       rotary: RotaryEmbedding, block_size: int) -> None:
    """Apply the step's evictions: block tables, cache-position offsets, K-shift of kept keys."""
    by_shift: dict[int, list[int]] = {}
    for rid, step in sched.kv_streaming.items():
        st = states[rid]
        st.num_sink_tokens = step.num_sink_tokens
        st.num_evicted_tokens = step.num_evicted_tokens
        if step.num_evicted_blocks:
            sb = step.num_sink_tokens // block_size
            del st.block_ids[sb:sb + step.num_evicted_blocks]
        if step.shift and step.shift_block_ids:
            by_shift.setdefault(step.shift, []).extend(step.shift_block_ids)
    for shift, ids in by_shift.items():
        cos, sin = shift_cos_sin(rotary.inv_freq, shift)
        idx = torch.tensor(ids, dtype=torch.long, device=kv_caches[0].device)
        for kv in kv_caches:  # [2, NB, BS, Hkv, D] per layer
            shift_cached_keys_(kv, idx, cos, sin)


def cache_span(st: "RunnerRequestState", start: int, n: int) -> tuple[int, list[int], int]:
    """For n tokens from text index `start`: (cache position of the first, their token ids, text index after
    them). The identity for requests without evictions."""
    s, e = st.num_sink_tokens, st.num_evicted_tokens
    if not e:
        return start, st.token_ids[start:start + n], start + n
    c0 = start if start <= s else start - e
    toks = [st.token_ids[c if c < s else c + e] for c in range(c0, c0 + n)]
    end = c0 + n if c0 + n < s else c0 + n + e
    return c0, toks, end
