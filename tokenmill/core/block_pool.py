"""Block pool: KV blocks with reference counts. The free queue doubles as the LRU eviction order.

A block with ref_cnt 0 sits in the free queue. If it holds a cached prefix (block.key set), it stays
findable by its key until it is handed out again (evicted), oldest-freed first. Block 0 is the null
block: never handed out, used as padding by device code.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Hashable, Optional


class KVBlock:
    __slots__ = ("block_id", "ref_cnt", "key")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_cnt = 0
        self.key: Optional[Hashable] = None  # prefix-cache key when the block is full and cached

    def __repr__(self) -> str:
        return f"KVBlock({self.block_id}, ref={self.ref_cnt}, cached={self.key is not None})"


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True):
        if num_blocks < 2:
            raise ValueError(f"need at least 2 KV blocks, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        # block_id -> block; the first entry is evicted first
        self._free: OrderedDict[int, KVBlock] = OrderedDict((b.block_id, b) for b in self.blocks[1:])
        self._cached: dict[Hashable, KVBlock] = {}
        self.null_block = self.blocks[0]
        self.null_block.ref_cnt = 1
        # called with (block_id, key) when a cached free block is handed out again (the CPU offload tier)
        self.on_evict: Optional[Callable[[int, Hashable], None]] = None

    # ---- queries -------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now (free, including evictable cached ones)."""
        return len(self._free)

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_usable_blocks

    def lookup(self, key: Hashable) -> Optional[KVBlock]:
        return self._cached.get(key)

    # ---- mutations -----------------------------------------------------------------------------
    def allocate(self, n: int) -> list[KVBlock]:
        """Hand out n blocks (evicting cached ones in LRU order). Caller checks num_free_blocks first."""
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} blocks, {len(self._free)} free")
        out = []
        for _ in range(n):
            _, blk = self._free.popitem(last=False)
            if blk.key is not None:
                if self.on_evict is not None:
                    self.on_evict(blk.block_id, blk.key)
                del self._cached[blk.key]
                blk.key = None
            blk.ref_cnt = 1
            out.append(blk)
        return out

    def touch(self, blocks: list[KVBlock]) -> None:
        """Take a reference on (cached) blocks; free ones leave the free queue."""
        for blk in blocks:
            if blk.ref_cnt == 0:
                del self._free[blk.block_id]
            blk.ref_cnt += 1

    def free(self, blocks: list[KVBlock]) -> None:
        """Drop one reference each. Pass blocks tail-first: earlier-freed blocks are evicted earlier.
        Uncached blocks go to the front of the queue (they hold nothing worth keeping)."""
        for blk in blocks:
            blk.ref_cnt -= 1
            if blk.ref_cnt < 0:
                raise RuntimeError(f"block {blk.block_id} freed twice")
            if blk.ref_cnt == 0:
                self._free[blk.block_id] = blk
                if blk.key is None:
                    self._free.move_to_end(blk.block_id, last=False)

    def cache(self, blk: KVBlock, key: Hashable) -> None:
        """Register a full block under its prefix key (first writer wins on duplicates)."""
        if not self.enable_caching or blk.key is not None or key in self._cached:
            return
        blk.key = key
        self._cached[key] = blk

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix; only possible when no block is in use."""
        if self.num_free_blocks != self.num_usable_blocks:
            return False
        for blk in self._cached.values():
            blk.key = None
        self._cached.clear()
        return True

    def free_block_ids(self) -> list[int]:
        """Free queue in eviction order (for tests)."""
        return list(self._free)
