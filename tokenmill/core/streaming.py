"""StreamingLLM eviction for requests with kv_eviction="streaming": attention sinks + a recent window.

A streaming request keeps its first S tokens (the sinks, whole blocks) and its most recent tokens. Once
its cache would hold more than S + W + one block, the oldest non-sink blocks are freed and dropped from
its block table, so it never holds more than S/bs + W/bs + 1 blocks, whatever its length.

Two index spaces. *Text* indices count the request's tokens (prompt + output); `num_computed_tokens`
stays a text index. *Cache* indices count the tokens in its cache: after E tokens were evicted, text
index t >= S + E sits at cache index t - E, and a token's RoPE position is its cache index (StreamingLLM).
The keys of the kept non-sink tokens are re-rotated by -B positions when B tokens are evicted (the
runner does it, told by `KVStreamingStep`). Sink blocks are never re-rotated, so they alone may be
shared with or registered in the prefix cache.

Preemption keeps E: the request resumes by recomputing its sink + window token ids at cache positions
0.. (text [0, S) then [S + E, ...)), which is exactly the StreamingLLM state it had. Pure Python.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

from tokenmill.core.outputs import KVStreamingStep
from tokenmill.request import Request

if TYPE_CHECKING:
    from tokenmill.core.kv_cache_manager import KVCacheManager

STREAMING = "streaming"


def is_streaming(req: Request) -> bool:
    return req.sampling_params.kv_eviction == STREAMING


@dataclass(frozen=True)
class StreamingSpec:
    """Engine-wide sizes, in whole blocks."""

    block_size: int
    sink_blocks: int
    window_blocks: int

    @classmethod
    def from_tokens(cls, sink_tokens: int, window_tokens: int, block_size: int) -> "StreamingSpec":
        """Sizes rounded up to whole blocks."""
        return cls(block_size, -(-sink_tokens // block_size), -(-window_tokens // block_size))

    @property
    def sink_tokens(self) -> int:
        return self.sink_blocks * self.block_size

    @property
    def window_tokens(self) -> int:
        return self.window_blocks * self.block_size

    @property
    def max_prompt_tokens(self) -> int:
        """The longest prompt a streaming request may have (it is prefilled without eviction)."""
        return self.sink_tokens + self.window_tokens

    @property
    def max_cache_tokens(self) -> int:
        """Most tokens a streaming request holds in its cache (its largest RoPE position + 1)."""
        return self.sink_tokens + self.window_tokens + self.block_size

    @property
    def max_blocks(self) -> int:
        return self.sink_blocks + self.window_blocks + 1


@dataclass
class StreamingTracker:
    """Evicted-token counts of streaming requests and the eviction decisions."""

    spec: StreamingSpec
    evicted: dict[str, int] = field(default_factory=dict)  # req_id -> E, text tokens evicted so far

    # ---- index maps ------------------------------------------------------------------------------
    def num_evicted(self, req: Request) -> int:
        return self.evicted.get(req.request_id, 0)

    def to_cache(self, req: Request, t: int) -> int:
        """Cache index of text index t (t outside the evicted range [S, S + E))."""
        s = self.spec.sink_tokens
        return t if t <= s else t - self.num_evicted(req)

    def to_text(self, req: Request, c: int) -> int:
        """Text index of cache index c (cache index S is text S + E: the next after the sinks)."""
        return c if c < self.spec.sink_tokens else c + self.num_evicted(req)

    def cache_len(self, req: Request) -> int:
        """Tokens in the request's cache (computed, not evicted)."""
        return self.to_cache(req, req.num_computed_tokens)

    def remaining(self, req: Request) -> int:
        """Known tokens still to compute, counted in the cache (evicted ones are never computed again)."""
        return self.to_cache(req, req.num_tokens) - self.cache_len(req)

    def cap(self, req: Request) -> int:
        """Most tokens the request may compute this step: its cache, after evicting every full non-sink
        block, stays within max_cache_tokens."""
        done = self.cache_len(req)
        evictable = max(0, done - self.spec.sink_tokens) // self.spec.block_size
        return self.spec.max_cache_tokens - done + evictable * self.spec.block_size

    def advance(self, req: Request, n: int) -> None:
        """num_computed_tokens after computing n more cache tokens (skipping the evicted text range)."""
        req.num_computed_tokens = self.to_text(req, self.cache_len(req) + n)

    # ---- eviction --------------------------------------------------------------------------------
    def evict(self, kv: "KVCacheManager", req: Request, n: int) -> KVStreamingStep:
        """Free the oldest non-sink blocks so that the cache plus n new tokens fits max_cache_tokens.
        Returns what the runner must do before this step's forward (drop + re-rotate)."""
        spec, bs = self.spec, self.spec.block_size
        done = self.cache_len(req)
        k = max(0, -(-(done + n - spec.max_cache_tokens) // bs))
        blocks = kv.req_blocks.get(req.request_id, [])
        shift_ids: list[int] = []
        if k:
            if k * bs > done - spec.sink_tokens:
                raise RuntimeError(f"{req.request_id}: cannot evict {k} blocks of {done} cached tokens")
            sb = spec.sink_blocks
            freed = blocks[sb:sb + k]
            del blocks[sb:sb + k]
            kv.pool.free(freed)  # never cached: they go to the front of the free queue
            self.evicted[req.request_id] = self.num_evicted(req) + k * bs
            # the kept non-sink blocks holding computed tokens: their keys move k*bs positions back
            n_kept = -(-(done - k * bs - spec.sink_tokens) // bs)
            shift_ids = [b.block_id for b in blocks[sb:sb + n_kept]]
        return self.step_info(req, k, shift_ids)

    def step_info(self, req: Request, num_evicted_blocks: int = 0,
                  shift_block_ids: Optional[list[int]] = None) -> KVStreamingStep:
        """The runner's view of the request this step (by default: no eviction)."""
        bs = self.spec.block_size
        return KVStreamingStep(self.spec.sink_tokens, self.num_evicted(req), num_evicted_blocks,
                               shift_block_ids or [], -num_evicted_blocks * bs)

    def drop(self, req: Request) -> None:
        """Forget a finished request."""
        self.evicted.pop(req.request_id, None)
