"""KV cache manager: per-request block lists over the block pool, with prefix-cache lookups.

The manager answers with block ids or None; the scheduler owns the policy (wait, preempt, reject).
"""
from __future__ import annotations

from typing import Optional

from tokenmill.core.block_pool import BlockPool, KVBlock
from tokenmill.core.offload import KVOffloadManager
from tokenmill.core.prefix_cache import extend_block_keys
from tokenmill.core.streaming import StreamingTracker, is_streaming
from tokenmill.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True, num_host_blocks: int = 0):
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks, enable_caching)
        # the CPU offload tier (host blocks), or None
        self.offload = KVOffloadManager(num_host_blocks, block_size, enable_caching) if num_host_blocks else None
        if self.offload is not None:
            self.pool.on_evict = self.offload.on_device_evict
        self.req_blocks: dict[str, list[KVBlock]] = {}
        self.streaming: Optional[StreamingTracker] = None  # set by the scheduler: kv_eviction="streaming"
        # prefix cache statistics, in tokens
        self.prefix_queries = 0
        self.prefix_hits = 0

    # ---- queries -------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def num_total_blocks(self) -> int:
        return self.pool.num_usable_blocks

    @property
    def num_used_blocks(self) -> int:
        return self.pool.num_usable_blocks - self.pool.num_free_blocks

    def usage(self) -> float:
        return self.pool.usage()

    def block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_blocks.get(request_id, ())]

    def _extra(self, request: Request):
        salt, lora = request.sampling_params.cache_salt, getattr(request, "lora_int_id", 0)
        return (salt, "lora", lora) if lora else salt  # an adapter's KV differs from the base model's

    # ---- prefix cache --------------------------------------------------------------------------
    def get_computed_blocks(self, request: Request) -> tuple[list[KVBlock], int]:
        """Longest cached prefix of the request's tokens, in whole blocks. The last token is never
        taken from the cache (its logits must be computed). A request that wants prompt logprobs takes
        nothing from the cache: every prompt token's logits must be computed. Does not take references."""
        if not self.enable_caching or request.sampling_params.prompt_logprobs is not None:
            return [], 0
        # at most (num_tokens - 1) tokens may come from the cache
        max_blocks = (request.num_tokens - 1) // self.block_size
        if self.streaming is not None and is_streaming(request):  # only its sinks may be shared
            max_blocks = min(max_blocks, self.streaming.spec.sink_blocks)
        extend_block_keys(request.block_hashes, request.all_token_ids, self.block_size, self._extra(request))
        hits: list[KVBlock] = []
        for key in request.block_hashes[:max_blocks]:
            blk = self.pool.lookup(key)
            if blk is None:
                break
            hits.append(blk)
        return hits, len(hits) * self.block_size

    def get_offloaded_hit_tokens(self, request: Request, num_device_hit_blocks: int) -> int:
        """Tokens after the device hits the host tier restores by copy (0 without it). Pass them to
        allocate_slots as num_offloaded_tokens."""
        if request.sampling_params.prompt_logprobs is not None:
            return 0  # every prompt token is computed (see get_computed_blocks)
        if self.offload is None or (self.streaming is not None and is_streaming(request)):
            return 0  # a streaming request shares only its sink blocks (device prefix cache)
        return self.offload.num_hit_tokens(request, num_device_hit_blocks)

    def record_prefix_lookup(self, num_tokens: int, num_hit: int) -> None:
        """Count one admitted request's lookup (for the hit-rate metric)."""
        if self.enable_caching:
            self.prefix_queries += num_tokens
            self.prefix_hits += num_hit

    def can_fit(self, num_tokens: int) -> bool:
        """Whether a sequence of num_tokens could ever fit in the whole cache."""
        return cdiv(num_tokens, self.block_size) <= self.pool.num_usable_blocks

    # ---- allocation ----------------------------------------------------------------------------
    def allocate_slots(self, request: Request, num_new_tokens: int,
                       new_computed_blocks: Optional[list[KVBlock]] = None,
                       num_lookahead_tokens: int = 0, num_offloaded_tokens: int = 0,
                       cache: bool = True) -> Optional[list[int]]:
        """Make room for num_new_tokens more tokens (after request.num_computed_tokens, the prefix hits
        and the num_offloaded_tokens the host tier restores into the first new blocks). Returns the ids
        of newly added blocks (hits first), or None if they do not fit (nothing changes then). cache=False: do
        not enter the new blocks in the prefix cache (their KV arrives later: cache_blocks() then)."""
        computed = new_computed_blocks or []
        blocks = self.req_blocks.setdefault(request.request_id, [])
        num_computed = self._cache_len(request) + len(computed) * self.block_size + num_offloaded_tokens
        need_total = cdiv(num_computed + num_new_tokens + num_lookahead_tokens, self.block_size)
        num_new_blocks = max(0, need_total - len(blocks) - len(computed))
        # cached hits that sit in the free queue are taken out of it by touch()
        num_evictable_hits = sum(1 for b in computed if b.ref_cnt == 0)
        if num_new_blocks > self.pool.num_free_blocks - num_evictable_hits:
            if not blocks:
                del self.req_blocks[request.request_id]
            return None
        self.pool.touch(computed)
        host = self.offload.acquire(request, len(computed), num_offloaded_tokens) if self.offload else []
        new_blocks = self.pool.allocate(num_new_blocks)  # evictions may save blocks to the host tier
        if host:
            self.offload.swap_in(host, [b.block_id for b in new_blocks[:len(host)]])
        blocks.extend(computed)
        blocks.extend(new_blocks)
        if self.enable_caching and cache:
            # cache the blocks that are full of known (non-speculative) tokens after this step
            num_known = min(num_computed + num_new_tokens, request.num_tokens)
            if self.streaming is not None and is_streaming(request):  # register the sinks only
                num_known = min(num_known, self.streaming.spec.sink_tokens)
            self._cache_full_blocks(request, blocks, num_known)
        return [b.block_id for b in computed] + [b.block_id for b in new_blocks]

    def _cache_len(self, request: Request) -> int:
        """Tokens of the request in its blocks (a streaming request's evicted ones excluded)."""
        if self.streaming is not None and is_streaming(request):
            return self.streaming.cache_len(request)
        return request.num_computed_tokens

    def cache_blocks(self, request: Request, num_tokens: int) -> None:
        """Enter the request's blocks full of its first num_tokens tokens in the prefix cache (KV now present)."""
        if self.enable_caching:
            self._cache_full_blocks(request, self.req_blocks.get(request.request_id, []), num_tokens)

    def _cache_full_blocks(self, request: Request, blocks: list[KVBlock], num_tokens: int) -> None:
        n_full = num_tokens // self.block_size
        keys = request.block_hashes
        extend_block_keys(keys, request.all_token_ids, self.block_size, self._extra(request), n_full)
        for i in range(n_full):
            if blocks[i].key is None:
                self.pool.cache(blocks[i], keys[i])

    def free(self, request: Request) -> None:
        """Release the request's blocks (tail first, so its prefix stays cached longest)."""
        blocks = self.req_blocks.pop(request.request_id, None)
        if blocks:
            self.pool.free(list(reversed(blocks)))
        if self.offload is not None:
            self.offload.release(request.request_id)

    def preempt(self, request: Request) -> bool:
        """Free a preempted request's device blocks; with the host tier and room in it, its computed
        KV is first swapped out (True: it resumes by swap-in, else it is recomputed)."""
        swapped = False
        # a streaming request resumes by recomputing its sink + window (core/streaming.py), never by swap-in
        if self.offload is not None and not (self.streaming is not None and is_streaming(request)):
            swapped = self.offload.swap_out(request, self.block_ids(request.request_id),
                                            request.num_computed_tokens)
        blocks = self.req_blocks.pop(request.request_id, None)
        if blocks:
            self.pool.free(list(reversed(blocks)))
        return swapped

    def reset_prefix_cache(self) -> bool:
        ok = self.pool.reset_prefix_cache()
        return ok and (self.offload is None or self.offload.reset_prefix_cache())
