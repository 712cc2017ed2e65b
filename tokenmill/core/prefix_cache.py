"""Chained block keys for automatic prefix caching.

The key of full block i is (hash of block i-1's key, the block's token ids, extra), where extra
carries what else changes the KV (cache salt, LoRA id) and goes into the first block only, since every
later key chains onto it. Keys are compared whole by the cache dict, so equal hashes with different
tokens never match (collisions are guarded by the token comparison).
"""
from __future__ import annotations

from typing import Hashable, Optional

BlockKey = tuple  # (parent_hash, tuple[int, ...], extra)

_ROOT = 0x7_0C_E5_31_11


def block_key(parent: Optional[BlockKey], tokens: tuple[int, ...], extra: Hashable = None) -> BlockKey:
    parent_hash = hash(parent) if parent is not None else _ROOT
    return (parent_hash, tokens, extra if parent is None else None)


def extend_block_keys(keys: list[BlockKey], token_ids: list[int], block_size: int, extra: Hashable = None,
                      max_blocks: Optional[int] = None) -> None:
    """Append the keys of the full blocks of token_ids not yet in keys (in place)."""
    n_full = len(token_ids) // block_size
    if max_blocks is not None:
        n_full = min(n_full, max_blocks)
    for i in range(len(keys), n_full):
        parent = keys[i - 1] if i else None
        keys.append(block_key(parent, tuple(token_ids[i * block_size:(i + 1) * block_size]), extra))
