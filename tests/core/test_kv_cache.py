"""Block pool, prefix keys and KV cache manager: exact block ids, ref counts, eviction order."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tokenmill.core.block_pool import BlockPool
from tokenmill.core.kv_cache_manager import KVCacheManager
from tokenmill.core.prefix_cache import block_key, extend_block_keys
from tokenmill.request import Request
from tokenmill.sampling_params import SamplingParams


def req(rid: str, tokens: list[int], salt=None) -> Request:
    return Request(rid, tokens, SamplingParams(max_tokens=8, cache_salt=salt))


def test_core_imports_without_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import tokenmill.core.scheduler, tokenmill.core.kv_cache_manager, tokenmill.core.policies\n"
            "import tokenmill.core.outputs, tokenmill.core.block_pool, tokenmill.core.prefix_cache\n"
            "print('ok')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"


def test_block_pool_allocate_free_order():
    pool = BlockPool(6)
    assert pool.num_free_blocks == 5  # block 0 is the null block
    a = pool.allocate(3)
    assert [b.block_id for b in a] == [1, 2, 3]
    assert all(b.ref_cnt == 1 for b in a)
    pool.free(list(reversed(a)))
    # uncached blocks go to the front; freed tail-first -> 1 ends up first
    assert pool.free_block_ids() == [1, 2, 3, 4, 5]
    with pytest.raises(RuntimeError):
        pool.allocate(6)


def test_block_pool_double_free_detected():
    pool = BlockPool(4)
    (b,) = pool.allocate(1)
    pool.free([b])
    with pytest.raises(RuntimeError):
        pool.free([b])


def test_cached_blocks_evicted_in_lru_order():
    pool = BlockPool(5)
    blocks = pool.allocate(4)
    for i, b in enumerate(blocks):
        pool.cache(b, ("k", i))
    pool.free([blocks[2], blocks[0]])  # freed first -> evicted first
    pool.free([blocks[3], blocks[1]])
    assert pool.free_block_ids() == [3, 1, 4, 2]
    got = pool.allocate(1)[0]
    assert got.block_id == 3 and got.key is None
    assert pool.lookup(("k", 2)) is None
    assert pool.lookup(("k", 0)).block_id == 1


def test_prefix_keys_chain_and_guard_tokens():
    keys: list = []
    extend_block_keys(keys, list(range(10)), 4)
    assert len(keys) == 2
    assert keys[1][1] == (4, 5, 6, 7)
    assert keys[1][0] == hash(keys[0])
    # same tokens after a different prefix give a different key
    other: list = []
    extend_block_keys(other, [99, 1, 2, 3] + [4, 5, 6, 7], 4)
    assert other[1] != keys[1]
    # a salt changes every key of the chain
    salted: list = []
    extend_block_keys(salted, list(range(8)), 4, extra="tenant-a")
    assert salted[0] != keys[0] and salted[1] != keys[1]
    assert block_key(None, (1, 2)) == block_key(None, (1, 2))


def test_allocate_slots_exact_ids_and_prefix_hit():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    r1 = req("a", list(range(10)))
    hits, n = kv.get_computed_blocks(r1)
    assert (hits, n) == ([], 0)
    assert kv.allocate_slots(r1, 10) == [1, 2, 3]
    r1.num_computed_tokens = 10
    # two full blocks are cached (tokens 0..7)
    assert kv.pool.num_cached_blocks == 2
    r2 = req("b", list(range(8)) + [50, 51, 52])
    hits, n = kv.get_computed_blocks(r2)
    assert [b.block_id for b in hits] == [1, 2] and n == 8
    assert kv.allocate_slots(r2, 3, hits) == [1, 2, 4]
    assert kv.pool.blocks[1].ref_cnt == 2
    kv.free(r1)
    kv.free(r2)
    assert kv.num_used_blocks == 0
    # cached blocks stay findable after free
    r3 = req("c", list(range(9)))
    hits, n = kv.get_computed_blocks(r3)
    assert [b.block_id for b in hits] == [1, 2] and n == 8


def test_last_token_never_from_cache():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    r1 = req("a", list(range(8)))
    kv.allocate_slots(r1, 8)
    kv.free(r1)
    r2 = req("b", list(range(8)))
    hits, n = kv.get_computed_blocks(r2)
    assert n == 4, "the whole prompt may not come from the cache: its last token needs logits"


def test_salt_isolates_tenants():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    r1 = req("a", list(range(9)), salt="x")
    kv.allocate_slots(r1, 9)
    assert kv.get_computed_blocks(req("b", list(range(9)), salt="y"))[1] == 0
    assert kv.get_computed_blocks(req("c", list(range(9)), salt="x"))[1] == 8


def test_allocate_returns_none_and_changes_nothing_when_full():
    kv = KVCacheManager(num_blocks=4, block_size=4)  # 3 usable
    r1 = req("a", list(range(8)))
    assert kv.allocate_slots(r1, 8) == [1, 2]
    r2 = req("b", list(range(100, 108)))
    assert kv.allocate_slots(r2, 8) is None
    assert kv.num_free_blocks == 1 and "b" not in kv.req_blocks
    assert kv.allocate_slots(r2, 4) == [3]


def test_hit_on_free_cached_block_counts_against_free_space():
    kv = KVCacheManager(num_blocks=4, block_size=4)  # 3 usable
    r1 = req("a", list(range(8)))
    kv.allocate_slots(r1, 8)
    kv.free(r1)  # blocks 1,2 cached and free; 3 free
    r2 = req("b", list(range(8)) + [9] * 9)  # 17 tokens: 5 blocks, 2 of them hits
    hits, n = kv.get_computed_blocks(r2)
    assert n == 8
    assert kv.allocate_slots(r2, 9, hits) is None  # needs 5 blocks > 3
    assert kv.num_free_blocks == 3 and kv.pool.blocks[1].ref_cnt == 0
