"""Data-parallel replicas' statistics merge into one EngineStats (the /metrics of `serve --data-parallel-size`)."""
from __future__ import annotations

from tokenmill.core.expert_cache import ExpertCacheStats, MoEStats
from tokenmill.engine.protocol import EngineStats, merge_stats


def test_counts_summed_dicts_per_key_alive_only_if_all():
    a = EngineStats(num_running=2, prompt_tokens=10, last_step_time=5.0, lora_requests={"x": 1, "y": 2},
                    moe=MoEStats({0: [1, 2]}, ExpertCacheStats(capacity=4, hits=3, misses=1)))
    b = EngineStats(num_running=1, prompt_tokens=5, last_step_time=7.0, loop_alive=False, lora_requests={"x": 4},
                    moe=MoEStats({0: [0, 5], 1: [1, 1]}, None))
    c = EngineStats(num_running=3)  # a dense replica reports no MoE stats
    t = merge_stats([a, b, c])
    assert (t.num_running, t.prompt_tokens, t.last_step_time, t.loop_alive) == (6, 15, 7.0, False)
    assert t.lora_requests == {"x": 5, "y": 2} and t.lora_generation_tokens == {}
    assert t.moe.expert_counts == {0: [1, 7], 1: [1, 1]}
    assert (t.moe.cache.capacity, t.moe.cache.hits, t.moe.cache.misses) == (4, 3, 1)
    assert merge_stats([EngineStats(), EngineStats()]).moe is None
