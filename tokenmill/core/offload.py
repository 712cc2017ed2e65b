"""CPU offload tier of the KV cache: bookkeeping of host blocks (pure Python, no torch).

A second block pool, in (pinned) host memory, sized by `--cpu-offload-gb`. Block ids only move here; the
model runner performs the copies the scheduler output lists (`kv_swap_out`: (device, host) pairs, then
`kv_swap_in`: (host, device) pairs, then the forward). Two uses:

- Preemption by swap: the victim's computed blocks (full and partial) are copied to host blocks the request
  holds; its device blocks are freed. On resume it gets fresh device blocks and swap-ins instead of a
  recompute (leading blocks still in the device prefix cache are taken from there). With too few free host
  blocks the victim is recomputed as before.
- Prefix cache second level: a cached device block evicted from the device LRU is copied to a host block
  indexed by the same key (host LRU). A device prefix miss that hits the host index swaps the block back in
  and counts as computed. Full blocks saved by preemption are indexed too, so they are shared.

Host block ids are 0..num_host_blocks-1 (the pool below reserves its block 0, hence the -1).
A host block read or written by this step's copies is pinned until `end_step()` (called once the runner has
run the step), so it is never handed out twice in one step: the batched copies then never have two writers
of one host block, and a swap-in source is never overwritten before it is read.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable

from tokenmill.core.block_pool import BlockPool, KVBlock
from tokenmill.request import Request


@dataclass
class SwappedKV:
    """KV of a preempted request held in host blocks: `host_blocks[i]` holds its block i."""

    host_blocks: list[KVBlock]
    num_tokens: int  # tokens whose KV is held (the request's num_computed_tokens when preempted)


class KVOffloadManager:
    def __init__(self, num_host_blocks: int, block_size: int, enable_caching: bool = True):
        if num_host_blocks < 1:
            raise ValueError(f"need at least 1 host block, got {num_host_blocks}")
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_host_blocks + 1, enable_caching)
        self.swapped: dict[str, SwappedKV] = {}
        self._swap_out: list[tuple[int, int]] = []  # (device block, host id) of this step
        self._swap_in: list[tuple[int, int]] = []  # (host id, device block) of this step
        self._pinned: list[KVBlock] = []  # host blocks referenced by this step's copies
        # cumulative statistics
        self.num_swapped_out_blocks = 0
        self.num_swapped_in_blocks = 0
        self.num_prefix_hit_tokens = 0  # tokens found in the host index by prefix lookups
        self.num_swap_preemptions = 0  # preemptions that kept the KV in host memory

    # ---- queries -------------------------------------------------------------------------------
    @property
    def num_host_blocks(self) -> int:
        return self.pool.num_usable_blocks

    @property
    def num_free_host_blocks(self) -> int:
        """Host blocks not held by a swapped request or this step (cached ones included)."""
        return self.pool.num_free_blocks

    def host_id(self, blk: KVBlock) -> int:
        return blk.block_id - 1

    def lookup(self, key: Hashable) -> int | None:
        """Host id holding the cached block of `key`, or None (for tests)."""
        blk = self.pool.lookup(key)
        return None if blk is None else self.host_id(blk)

    def num_hit_tokens(self, request: Request, num_device_hit_blocks: int) -> int:
        """Tokens past the device prefix hits whose KV the host tier can restore (no side effects):
        a swapped request's own blocks, else consecutive host-index hits of its next full blocks."""
        bs = self.block_size
        swapped = self.swapped.get(request.request_id)
        if swapped is not None:
            return max(0, swapped.num_tokens - num_device_hit_blocks * bs)
        if not self.enable_caching:
            return 0
        max_blocks = (request.num_tokens - 1) // bs  # the last token is always computed
        n = 0
        for key in request.block_hashes[num_device_hit_blocks:max_blocks]:
            if self.pool.lookup(key) is None:
                break
            n += 1
        return n * bs

    # ---- admission (swap-in) -------------------------------------------------------------------
    def acquire(self, request: Request, num_device_hit_blocks: int, num_tokens: int) -> list[KVBlock]:
        """Pin the host blocks of the `num_tokens` that `num_hit_tokens` offered (call before the device
        blocks are allocated, so evictions cannot take them) and drop a swapped request's hold on its
        host blocks. Returns them in order; `swap_in` pairs them with the fresh device blocks."""
        swapped = self.swapped.pop(request.request_id, None)
        if swapped is not None:
            take = swapped.host_blocks[num_device_hit_blocks:] if num_tokens else []
            self._pin(take)
            self.pool.free(list(reversed(swapped.host_blocks)))
            return take
        if not num_tokens:
            return []
        keys = request.block_hashes[num_device_hit_blocks:num_device_hit_blocks + num_tokens // self.block_size]
        take = [self.pool.lookup(k) for k in keys]
        self._pin(take)
        self.num_prefix_hit_tokens += num_tokens
        return take

    def swap_in(self, host_blocks: list[KVBlock], device_block_ids: list[int]) -> None:
        """Schedule the copies host_blocks[i] -> device_block_ids[i] for this step."""
        assert len(host_blocks) == len(device_block_ids)
        self._swap_in.extend((self.host_id(hb), dev) for hb, dev in zip(host_blocks, device_block_ids))
        self.num_swapped_in_blocks += len(host_blocks)

    # ---- preemption (swap-out) -----------------------------------------------------------------
    def swap_out(self, request: Request, device_block_ids: list[int], num_tokens: int) -> bool:
        """Keep the KV of `num_tokens` tokens of a request being preempted: copy its blocks to host
        blocks (full blocks already in the host index are shared, not copied). False, with nothing
        changed, when the host tier has too few free blocks (the caller recomputes instead)."""
        bs = self.block_size
        k = -(-num_tokens // bs)
        if k == 0 or k > len(device_block_ids):
            return False
        n_full = num_tokens // bs
        keys = request.block_hashes if self.enable_caching else []
        known = [self.pool.lookup(keys[i]) if i < min(n_full, len(keys)) else None for i in range(k)]
        need = sum(b is None for b in known)
        evictable = sum(1 for b in known if b is not None and b.ref_cnt == 0)
        if need > self.pool.num_free_blocks - evictable:
            return False
        self.pool.touch([b for b in known if b is not None])
        fresh = iter(self.pool.allocate(need))
        held: list[KVBlock] = []
        for i, blk in enumerate(known):
            if blk is None:
                blk = next(fresh)
                self._swap_out.append((device_block_ids[i], self.host_id(blk)))
                if i < min(n_full, len(keys)):
                    self.pool.cache(blk, keys[i])
            held.append(blk)
        self.num_swapped_out_blocks += need
        self.num_swap_preemptions += 1
        self.swapped[request.request_id] = SwappedKV(held, num_tokens)
        return True

    # ---- device eviction -----------------------------------------------------------------------
    def on_device_evict(self, device_block_id: int, key: Hashable) -> None:
        """A cached device block is being handed out again: keep its content in the host index (best
        effort: dropped when every host block is held)."""
        blk = self.pool.lookup(key)
        if blk is not None:  # already on the host: refresh its LRU position only
            self.pool.touch([blk])
            self.pool.free([blk])
            return
        if self.pool.num_free_blocks == 0:
            return
        (blk,) = self.pool.allocate(1)  # may evict the least recently used host block
        self.pool.cache(blk, key)
        self._pinned.append(blk)  # its one reference is this step's pin
        self._swap_out.append((device_block_id, self.host_id(blk)))
        self.num_swapped_out_blocks += 1

    # ---- lifecycle -----------------------------------------------------------------------------
    def release(self, request_id: str) -> None:
        """Drop a swapped request's host blocks (finished or aborted while waiting)."""
        swapped = self.swapped.pop(request_id, None)
        if swapped is not None:
            self.pool.free(list(reversed(swapped.host_blocks)))

    def take_swaps(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """This step's (swap_out, swap_in) lists, for the SchedulerOutput."""
        out, inn = self._swap_out, self._swap_in
        self._swap_out, self._swap_in = [], []
        return out, inn

    def end_step(self) -> None:
        """The runner has performed this step's copies: unpin their host blocks."""
        pinned, self._pinned = self._pinned, []
        self.pool.free(pinned)

    def reset_prefix_cache(self) -> bool:
        return self.pool.reset_prefix_cache()

    def _pin(self, blocks: list[KVBlock]) -> None:
        self.pool.touch(blocks)
        self._pinned.extend(blocks)
