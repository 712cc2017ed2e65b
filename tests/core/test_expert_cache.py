"""Expert offload policy (tokenmill/core/expert_cache.py) on synthetic routing traces: the cost model's
host-or-fetch choice, score-based admission and eviction, next-layer prefetch, and the counters. No torch."""
from __future__ import annotations

import random
import subprocess
import sys

import pytest

from tokenmill.core.expert_cache import ExpertCachePolicy, ExpertCostModel

# a Mixtral-8x7B expert in bf16: 3 * 4096 * 14336 weights
MIXTRAL = ExpertCostModel(expert_bytes=3 * 4096 * 14336 * 2, flops_per_token=6 * 4096 * 14336)


def never_host() -> ExpertCostModel:
    return ExpertCostModel(expert_bytes=1000, flops_per_token=1, link_bytes_per_s=1e12, host_bytes_per_s=1.0)


def always_host() -> ExpertCostModel:
    return ExpertCostModel(expert_bytes=1000, flops_per_token=1, link_bytes_per_s=1.0, host_bytes_per_s=1e12,
                           host_flops=1e12)


def counts(experts: dict[int, int], num_experts: int = 8) -> list[int]:
    return [experts.get(e, 0) for e in range(num_experts)]


def zipf_trace(steps: int, layers: int, num_experts: int, top_k: int, tokens: int, seed: int,
               s: float = 1.2) -> list[list[list[int]]]:
    """trace[step][layer] = tokens per expert; each layer has its own skewed preference over experts."""
    rng = random.Random(seed)
    prefs = []
    for _ in range(layers):
        order = list(range(num_experts))
        rng.shuffle(order)
        prefs.append({e: 1.0 / (rank + 1) ** s for rank, e in enumerate(order)})
    trace = []
    for _ in range(steps):
        step = []
        for layer in range(layers):
            c = [0] * num_experts
            for _ in range(tokens):
                chosen: set[int] = set()
                while len(chosen) < top_k:
                    chosen.add(rng.choices(list(prefs[layer]), weights=list(prefs[layer].values()))[0])
                for e in chosen:
                    c[e] += 1
            step.append(c)
        trace.append(step)
    return trace


def test_policy_imports_without_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import tokenmill.core.expert_cache as m\n"
            "p = m.ExpertCachePolicy(2, 4, 3, m.ExpertCostModel(1000, 10))\n"
            "print(p.plan_layer(0, [1, 0, 2, 0]))\n")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_cost_model_decode_on_host_prefill_fetched():
    # decode: one token reads 352 MiB from DRAM (~6 ms) instead of pushing it over PCIe (~14 ms)
    assert MIXTRAL.prefer_host(1)
    # prefill: 4096 tokens are 1.4 TFLOP, seconds on the host, milliseconds on the device after the fetch
    assert not MIXTRAL.prefer_host(4096)
    n = MIXTRAL.host_break_even_tokens()
    assert 1 < n < 4096 and MIXTRAL.prefer_host(n - 1) and not MIXTRAL.prefer_host(n)


def test_resident_hit_miss_fetch_and_slots():
    p = ExpertCachePolicy(num_layers=2, num_experts=8, capacity=3, cost=never_host())
    assert [k for k, _ in p.warm([(0, 0), (0, 1), (0, 2), (0, 3)])] == [(0, 0), (0, 1), (0, 2)]
    plan = p.plan_layer(0, counts({0: 2, 1: 1}))
    assert plan.device == {0: 0, 1: 1} and not plan.fetch and not plan.host
    assert (p.stats.hits, p.stats.misses) == (2, 0)
    # layer 1, expert 5: a miss; the cache is full, the victim is the lowest score not used now: (0, 2)
    plan = p.plan_layer(1, counts({5: 4}))
    assert plan.fetch == [(5, 2)] and plan.device == {5: 2}
    assert p.slot_of == {(0, 0): 0, (0, 1): 1, (1, 5): 2}
    assert (p.stats.fetches, p.stats.evictions, p.stats.device_tokens) == (1, 1, 7)


def test_never_evicts_an_expert_the_layer_uses():
    p = ExpertCachePolicy(num_layers=1, num_experts=8, capacity=2, cost=never_host())
    p.warm([(0, 0), (0, 1)])
    plan = p.plan_layer(0, counts({0: 1, 1: 1, 2: 5}))
    # both slots hold experts this layer runs: expert 2 cannot take one and runs on the host
    assert plan.device == {0: 0, 1: 1} and plan.host == [2] and not plan.fetch
    assert p.stats.host_tokens == 5


def test_host_run_then_admitted_by_score():
    p = ExpertCachePolicy(num_layers=1, num_experts=8, capacity=1, cost=always_host(), decay=0.9)
    p.warm([(0, 0)])
    plan = p.plan_layer(0, counts({3: 1}))  # expert 3 scores 1 > expert 0's 0: admitted after the run
    assert plan.host == [3] and plan.admit == [(3, 0)] and p.slot_of == {(0, 3): 0}
    plan = p.plan_layer(0, counts({3: 1}))
    assert plan.device == {3: 0} and p.stats.hits == 1 and p.stats.admissions == 1
    # a one-off expert does not displace a hot one
    plan = p.plan_layer(0, counts({6: 1}))
    assert plan.host == [6] and not plan.admit and p.slot_of == {(0, 3): 0}


def test_zero_capacity_runs_everything_on_host():
    p = ExpertCachePolicy(num_layers=2, num_experts=4, capacity=0, cost=never_host())
    plan = p.plan_layer(1, [1, 2, 0, 3])
    assert plan.host == [3, 1, 0] and not plan.device and p.stats.host_tokens == 6


def test_prefetch_takes_free_then_lower_score_slots_only():
    p = ExpertCachePolicy(num_layers=2, num_experts=8, capacity=3, cost=never_host(), prefetch_limit=2)
    p.plan_layer(0, counts({0: 3}))  # fetch (0, 0) into a slot
    got = p.plan_prefetch(1, [(4, 1), (5, 1), (6, 1)], protect_layer=0)
    assert got == [(4, 1), (5, 2)] and p.stats.prefetches == 2  # the limit stops at two
    # (0, 0) is protected while layer 0 computes; 4 and 5 are predicted again: nothing to evict
    assert p.plan_prefetch(1, [(4, 1), (5, 1), (7, 1)], protect_layer=0) == []
    plan = p.plan_layer(1, counts({4: 1}))
    assert plan.device == {4: 1} and p.stats.prefetch_hits == 1


@pytest.mark.parametrize("seed", [0, 1])
def test_score_cache_on_skewed_trace(seed):
    """Zipf-skewed routing: the score cache keeps the hot experts, so the hit rate is well above the resident
    fraction (what a random resident set gets); every routed expert runs exactly once, on one side."""
    layers, num_experts, cap = 4, 16, 16  # a quarter of the experts fit
    trace = zipf_trace(60, layers, num_experts, top_k=2, tokens=1, seed=seed)
    p = ExpertCachePolicy(layers, num_experts, cap, cost=MIXTRAL)  # decode: misses run on the host
    for step in trace:
        for layer, c in enumerate(step):
            plan = p.plan_layer(layer, c)
            routed = {e for e, n in enumerate(c) if n}
            assert set(plan.device) | set(plan.host) == routed and not set(plan.device) & set(plan.host)
            assert len(set(plan.device.values())) == len(plan.device)  # one slot per expert
            assert len(p.slot_of) <= cap and len(set(p.slot_of.values())) == len(p.slot_of)
    s = p.stats
    assert s.hits + s.misses == sum(1 for step in trace for c in step for n in c if n)
    assert s.host_tokens + s.device_tokens == 60 * layers * 2
    assert s.fetches == 0  # one token per expert: the host always wins at decode
    assert s.hit_rate > 0.5, s  # vs 0.25 for a random resident set


def test_prefetch_with_perfect_prediction_turns_misses_into_hits():
    layers, num_experts = 4, 16
    trace = zipf_trace(40, layers, num_experts, top_k=2, tokens=1, seed=3, s=0.3)  # little skew
    base = ExpertCachePolicy(layers, num_experts, 8, cost=MIXTRAL)
    pre = ExpertCachePolicy(layers, num_experts, 8, cost=MIXTRAL)
    for step in trace:
        for layer, c in enumerate(step):
            base.plan_layer(layer, c)
            pre.plan_layer(layer, c)
            if layer + 1 < layers:
                nxt = step[layer + 1]
                pre.plan_prefetch(layer + 1, [(e, nxt[e]) for e in range(num_experts) if nxt[e]],
                                  protect_layer=layer)
    assert pre.stats.prefetch_hits > 0
    assert pre.stats.hit_rate > base.stats.hit_rate + 0.1, (pre.stats, base.stats)


def test_bad_arguments():
    with pytest.raises(ValueError):
        ExpertCachePolicy(1, 4, -1, MIXTRAL)
    with pytest.raises(ValueError):
        ExpertCachePolicy(1, 4, 2, MIXTRAL, decay=1.0)
    with pytest.raises(ValueError):
        ExpertCachePolicy(1, 4, 2, MIXTRAL).plan_layer(0, [1, 2])
