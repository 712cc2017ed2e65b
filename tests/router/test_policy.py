"""Routing policies: pure Python, no torch (imported with torch blocked), milliseconds."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tokenmill.core.prefix_cache import extend_block_keys
from tokenmill.errors import ConfigError
from tokenmill.router.policy import BackendLoad, PrefixAware, make_policy, prompt_block_hashes


def loads(*scores):
    return [BackendLoad(running=s) for s in scores]


def test_no_torch_import():
    code = ("import sys; sys.modules['torch'] = None; import tokenmill.router.policy as p; "
            "print(p.make_policy('prefix').name)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "prefix"


def test_hashes_are_the_engines_block_keys():
    ids = list(range(100, 140))
    keys: list = []
    extend_block_keys(keys, ids, 16, "salt")
    assert prompt_block_hashes(ids, 16, "salt") == [hash(k) for k in keys]
    assert len(prompt_block_hashes(ids, 16)) == 2  # 40 tokens: 2 full blocks
    assert prompt_block_hashes(ids, 16, max_blocks=1) == prompt_block_hashes(ids, 16)[:1]
    # chained: a different first block changes every later hash
    other = prompt_block_hashes([1] + ids[1:], 16)
    assert other[0] != prompt_block_hashes(ids, 16)[0] and other[1] != prompt_block_hashes(ids, 16)[1]
    assert prompt_block_hashes(ids, 16, "a") != prompt_block_hashes(ids, 16, "b")


def test_round_robin_skips_down_backends():
    p = make_policy("round-robin")
    ls = loads(0, 0, 0)
    assert [p.choose([0, 1, 2], ls).backend for _ in range(4)] == [0, 1, 2, 0]
    assert [p.choose([0, 2], ls).backend for _ in range(3)] == [2, 0, 2]
    with pytest.raises(ValueError):
        p.choose([], ls)


def test_least_load_uses_running_waiting_and_in_flight():
    p = make_policy("least-load")
    assert p.choose([0, 1], loads(3, 1)).backend == 1
    ls = [BackendLoad(running=1), BackendLoad(running=1, waiting=1)]
    assert p.choose([0, 1], ls).backend == 0
    ls = [BackendLoad(in_flight=5), BackendLoad(running=2)]  # the router knows of 5 not yet reported
    assert p.choose([0, 1], ls).backend == 1
    ls = [BackendLoad(kv_usage=0.9), BackendLoad(kv_usage=0.1)]
    assert p.choose([0, 1], ls).backend == 1


def test_prefix_routes_to_longest_match():
    p = PrefixAware()
    sys_a = list(range(1000, 1064))
    a = prompt_block_hashes(sys_a + [1, 2, 3] * 10, 16)
    b = prompt_block_hashes(sys_a + [7, 8, 9] * 10, 16)
    ls = loads(0, 0)
    d = p.choose([0, 1], ls, a)
    assert d.matched_blocks == 0
    p.routed(d.backend, a)
    ls[d.backend].in_flight = 1  # the other backend is now less loaded; the prefix still wins
    d2 = p.choose([0, 1], ls, b)
    assert d2.backend == d.backend and d2.matched_blocks == 4  # the 64-token system prompt
    # longest match among several owners
    p.routed(1 - d.backend, b[:2])
    assert p.choose([0, 1], loads(0, 0), b).backend == d.backend
    # the owner is down: least-load among the rest, no match
    assert p.choose([1 - d.backend], ls, a) == type(d)(1 - d.backend, 2)


def test_prefix_falls_back_when_overloaded():
    p = PrefixAware(balance_abs=4, balance_rel=1.5)
    h = prompt_block_hashes(list(range(64)), 16)
    p.routed(0, h)
    assert p.choose([0, 1], loads(4, 0), h).backend == 0  # 4 - 0 is not > 4
    d = p.choose([0, 1], loads(9, 2), h)
    assert d.backend == 1 and d.overloaded_fallback
    assert p.choose([0, 1], [BackendLoad(kv_usage=0.97), BackendLoad()], h).backend == 1


def test_prefix_lru_is_bounded_and_forgets_down_backends():
    p = PrefixAware(capacity=4)
    h1 = prompt_block_hashes(list(range(64)), 16)
    h2 = prompt_block_hashes(list(range(500, 564)), 16)
    p.routed(0, h1)
    p.routed(1, h2)
    assert len(p) == 4
    assert p.longest_match([0, 1], h1) == ([], 0)  # evicted, oldest first
    assert p.longest_match([0, 1], h2) == ([1], 4)
    p.forget_backend(1)
    assert len(p) == 0


def test_bad_settings():
    with pytest.raises(ConfigError, match="unknown routing policy"):
        make_policy("random")
    with pytest.raises(ConfigError):
        PrefixAware(capacity=0)
    with pytest.raises(ConfigError):
        PrefixAware(balance_rel=0.5)


def test_ties_go_round_the_backends():
    for name in ("least-load", "prefix"):
        p = make_policy(name)
        picks = {p.choose([0, 1, 2], loads(0, 0, 0), prompt_block_hashes(list(range(k, k + 32)), 16)).backend
                 for k in range(3)}
        assert picks == {0, 1, 2}, name
