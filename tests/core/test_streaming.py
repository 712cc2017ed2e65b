"""kv_eviction="streaming" in the scheduler: which blocks are freed and when, bounded memory, sinks kept,
prefix-cache registration of sinks only, preemption + resume, no leaks. Scripted runner, no torch."""
from __future__ import annotations

import sys

import pytest

from tokenmill.config import CacheConfig, SchedulerConfig
from tokenmill.core.outputs import ModelRunnerOutput, SchedulerOutput
from tokenmill.core.scheduler import Scheduler
from tokenmill.core.streaming import StreamingSpec
from tokenmill.errors import ConfigError, InvalidRequestError, PromptTooLongError
from tokenmill.request import Request, RequestStatus
from tokenmill.sampling_params import SamplingParams

BS = 4
SPEC = StreamingSpec.from_tokens(4, 8, BS)  # 1 sink block, 2 window blocks: at most 16 cached tokens, 4 blocks


def make(blocks=64, max_len=256, budget=64, caching=True, spec=SPEC) -> Scheduler:
    cfg = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=budget)
    return Scheduler(cfg, blocks, BS, max_len, caching, streaming=spec)


def req(rid, n_prompt, max_tokens=8, streaming=True, t=0.0, base=None) -> Request:
    base = 1000 * sum(map(ord, rid)) if base is None else base
    sp = SamplingParams(max_tokens=max_tokens, ignore_eos=True, kv_eviction="streaming" if streaming else None)
    return Request(rid, list(range(base, base + n_prompt)), sp, (2,), arrival_time=t)


class Runner:
    """Scripted runner that mirrors the runner's block tables from the SchedulerOutput diffs."""

    def __init__(self):
        self.tables: dict[str, list[int]] = {}
        self.token = 10

    def step(self, s: Scheduler) -> SchedulerOutput:
        out = s.schedule()
        for rid in out.finished_req_ids:
            self.tables.pop(rid, None)
        for new in out.scheduled_new_reqs:
            self.tables[new.req_id] = list(new.block_ids)
        for c in out.scheduled_cached_reqs:
            self.tables[c.req_id].extend(c.new_block_ids)
        for rid, st in out.kv_streaming.items():
            sb = st.num_sink_tokens // BS
            del self.tables[rid][sb:sb + st.num_evicted_blocks]
        ids, toks = [], []
        for rid, n in out.num_scheduled_tokens.items():
            r = s.requests[rid]
            ids.append(rid)
            self.token += 1
            toks.append([self.token] if r.num_computed_tokens >= r.num_tokens else [])
        s.update_from_output(out, ModelRunnerOutput(req_ids=ids, sampled_token_ids=toks, logprobs=[None] * len(ids)))
        return out


def test_config_and_params_validation():
    assert SPEC.sink_tokens == 4 and SPEC.window_tokens == 8 and SPEC.max_cache_tokens == 16 and SPEC.max_blocks == 4
    assert StreamingSpec.from_tokens(4, 20, 16).sink_tokens == 16  # rounded up to whole blocks
    assert StreamingSpec.from_tokens(4, 20, 16).window_tokens == 32
    with pytest.raises(ConfigError, match="at least 2 blocks"):
        CacheConfig(block_size=16, streaming_window_tokens=16).validate()
    CacheConfig(block_size=16, streaming_window_tokens=17).validate()
    with pytest.raises(InvalidRequestError, match="kv_eviction"):
        SamplingParams(kv_eviction="sliding")


def test_first_eviction_frees_oldest_non_sink_block_and_shifts_the_rest():
    s, r = make(), Runner()
    s.add_request(req("a", 6, max_tokens=30))
    out = r.step(s)  # prefill 6 tokens: blocks 1, 2
    assert s.kv.block_ids("a") == [1, 2]
    assert out.kv_streaming["a"].num_evicted_blocks == 0
    a = s.requests["a"]
    while a.num_computed_tokens < 16:  # no eviction while the cache holds <= 16 tokens
        out = r.step(s)
        assert out.kv_streaming["a"].num_evicted_blocks == 0
    assert s.kv.block_ids("a") == [1, 2, 3, 4]
    out = r.step(s)  # computing text token 16 would make 17 cached: evict block 2 (text 4..7)
    st = out.kv_streaming["a"]
    assert (st.num_sink_tokens, st.num_evicted_tokens, st.num_evicted_blocks, st.shift) == (4, 4, 1, -4)
    assert st.shift_block_ids == [3, 4]  # the kept non-sink blocks, re-rotated by -4 positions
    assert out.scheduled_cached_reqs[0].new_block_ids == [2]  # the freed block is reused at the tail
    assert s.kv.block_ids("a") == r.tables["a"] == [1, 3, 4, 2]
    assert out.scheduled_cached_reqs[0].num_computed_tokens == 16  # text index; cache position 12
    assert s.streaming.cache_len(a) == 13
    for _ in range(3):
        assert r.step(s).kv_streaming["a"].num_evicted_blocks == 0
    out = r.step(s)  # cache full again (16): evict block 3 (text 8..11)
    st = out.kv_streaming["a"]
    assert (st.num_evicted_tokens, st.num_evicted_blocks, st.shift_block_ids) == (8, 1, [4, 2])
    assert s.kv.block_ids("a") == r.tables["a"] == [1, 4, 2, 3]


def test_long_run_bounded_blocks_sinks_kept_no_leak():
    s, r = make(max_len=32), Runner()  # max_model_len does not cap a streaming request
    s.add_request(req("a", 10, max_tokens=300))
    s.add_request(req("b", 5, max_tokens=40, streaming=False))
    sink = None
    finished = False
    for _ in range(400):
        r.step(s)
        a = s.requests.get("a")
        if a is None:
            finished = True
            break
        ids = s.kv.block_ids("a")
        sink = sink or ids[0]
        assert ids[0] == sink  # the sink block is never evicted
        assert len(ids) <= SPEC.max_blocks
        assert ids == r.tables["a"]  # the runner's mirrored table agrees
        assert s.streaming.cache_len(a) == a.num_computed_tokens - s.streaming.num_evicted(a) <= 16
        assert s.kv.num_used_blocks <= SPEC.max_blocks + 8
    assert finished and a is None
    assert s.kv.num_used_blocks == 0 and not s.streaming.evicted
    assert not s.has_unfinished_requests()


def test_finish_reasons_and_lengths():
    s, r = make(max_len=32), Runner()
    a, b = req("a", 3, max_tokens=100), req("b", 3, max_tokens=100, streaming=False)
    s.add_request(a)
    s.add_request(b)
    while s.has_unfinished_requests():
        r.step(s)
    assert a.status == RequestStatus.FINISHED_LENGTH and a.num_output_tokens == 100
    assert b.status == RequestStatus.FINISHED_LENGTH and b.num_tokens == 32


def test_bad_requests():
    s = make()
    with pytest.raises(PromptTooLongError, match="streaming"):
        s.add_request(req("a", 13))  # sinks + window = 12
    s.add_request(req("b", 12))
    with pytest.raises(InvalidRequestError, match="max_model_len"):
        make(max_len=15).add_request(req("c", 5))  # needs 16 cache positions


def test_prefix_cache_registers_and_shares_only_sinks():
    s, r = make(), Runner()
    s.add_request(req("a", 11, max_tokens=1, base=100))
    r.step(s)
    pool = s.kv.pool
    assert pool.num_cached_blocks == 1 and pool.blocks[1].key is not None and pool.blocks[2].key is None
    s.add_request(req("b", 11, max_tokens=1, streaming=False, base=100))  # same prompt, normal request
    out = r.step(s)
    assert out.scheduled_new_reqs[0].num_computed_tokens == 4  # only the sink block was registered
    assert pool.num_cached_blocks == 2  # the normal request registers its own full blocks
    s.add_request(req("c", 11, max_tokens=1, base=100))  # streaming: may take only the sink from the cache
    out = r.step(s)
    assert out.scheduled_new_reqs[0].num_computed_tokens == 4
    assert out.scheduled_new_reqs[0].block_ids[0] == 1
    assert s.kv.num_used_blocks == 0


def test_preempted_after_evictions_resumes_from_sinks_and_window():
    # 8 usable blocks: b (normal, growing to 8 blocks) and a (streaming, 4 blocks); a arrived later: the victim
    s, r = make(blocks=9, caching=False), Runner()
    b, a = req("b", 1, max_tokens=30, streaming=False, t=0.0), req("a", 12, max_tokens=60, t=1.0)
    s.add_request(b)
    s.add_request(a)
    while "a" not in (out := r.step(s)).preempted_req_ids:
        assert len(s.kv.block_ids("a")) <= SPEC.max_blocks
    e = s.streaming.num_evicted(a)  # kept across preemption
    assert e > 0 and a.status == RequestStatus.PREEMPTED and a.num_computed_tokens == 0
    assert "a" not in out.kv_streaming  # nothing for the runner to shift: a's blocks are gone
    new = []
    while not new:
        out = r.step(s)
        new = [n for n in out.scheduled_new_reqs if n.req_id == "a"]
    # recompute: sinks (text 0..3) + the window (text 4 + e ..) at cache positions 0.., the evicted gap skipped
    assert new[0].num_computed_tokens == 0 and new[0].block_ids == s.kv.block_ids("a")
    assert out.num_scheduled_tokens["a"] == a.num_tokens - 1 - e  # a sampled one token this step
    assert out.kv_streaming["a"].num_evicted_tokens == e and out.kv_streaming["a"].num_evicted_blocks == 0
    assert s.streaming.cache_len(a) == a.num_tokens - 1 - e <= SPEC.max_cache_tokens
    while s.has_unfinished_requests():
        r.step(s)
        assert len(s.kv.block_ids("a")) <= SPEC.max_blocks
        if "a" in s.requests:
            assert s.kv.block_ids("a") == r.tables["a"]
    assert a.num_output_tokens == 60 and b.num_output_tokens == 30
    assert s.kv.num_used_blocks == 0 and not s.streaming.evicted


def test_core_streaming_imports_no_torch():
    saved = {k: sys.modules.pop(k) for k in list(sys.modules) if k.startswith("tokenmill.core")}
    sys.modules["torch"], real = None, sys.modules.get("torch")
    try:
        import tokenmill.core.scheduler  # noqa: F401
        import tokenmill.core.streaming  # noqa: F401
    finally:
        if real is not None:
            sys.modules["torch"] = real
        else:
            del sys.modules["torch"]
        for k in [k for k in sys.modules if k.startswith("tokenmill.core")]:
            del sys.modules[k]
        sys.modules.update(saved)
