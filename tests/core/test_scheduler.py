"""Scheduler decisions with a scripted runner: no torch, simulated clock."""
from __future__ import annotations

import pytest

from tokenmill.config import SchedulerConfig
from tokenmill.core.outputs import ModelRunnerOutput, SchedulerOutput
from tokenmill.errors import SLO_REJECTED_MESSAGE
from tokenmill.core.policies import FairPolicy, PriorityPolicy, SLOPolicy
from tokenmill.core.scheduler import Scheduler
from tokenmill.errors import EngineOverloadedError, PromptTooLongError
from tokenmill.request import Request, RequestStatus
from tokenmill.sampling_params import SLO, SamplingParams

EOS = 2


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def make(max_seqs=8, budget=32, blocks=64, bs=4, max_len=256, policy=None, clock=None, **kw):
    cfg = SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget, **kw)
    return Scheduler(cfg, blocks, bs, max_len, policy=policy, clock=clock or Clock())


def req(rid, n_prompt, max_tokens=4, t=0.0, **sp):
    base = 1000 * sum(map(ord, rid))  # distinct prompts: no accidental prefix-cache hits
    return Request(rid, list(range(base, base + n_prompt)), SamplingParams(max_tokens=max_tokens, **sp), (EOS,),
                   arrival_time=t)


def run_step(s: Scheduler, token=7, drafts=None) -> SchedulerOutput:
    """One step with a scripted runner: every request that reached its last token samples `token`."""
    out = s.schedule()
    ids, toks = [], []
    for rid, n in out.num_scheduled_tokens.items():
        r = s.requests[rid]
        ids.append(rid)
        spec = out.scheduled_spec_decode_tokens.get(rid, [])
        done = r.num_computed_tokens - len(spec) >= r.num_tokens  # computed advanced at schedule time
        toks.append(([token] + ([] if not spec else [])) if done else [])
    s.update_from_output(out, ModelRunnerOutput(req_ids=ids, sampled_token_ids=toks, logprobs=[None] * len(ids),
                                                draft_token_ids=drafts or {}))
    return out


def test_mixed_chunked_prefill_and_decode_under_budget():
    s = make(budget=10)
    s.add_request(req("a", 6))
    out = run_step(s)
    assert out.num_scheduled_tokens == {"a": 6}
    s.add_request(req("b", 20))
    out = run_step(s)
    # a decodes 1 token, b gets the remaining 9 as a prefill chunk
    assert out.num_scheduled_tokens == {"a": 1, "b": 9}
    assert [n.req_id for n in out.scheduled_new_reqs] == ["b"]
    assert [c.req_id for c in out.scheduled_cached_reqs] == ["a"]
    out = run_step(s)
    assert out.num_scheduled_tokens == {"a": 1, "b": 9}
    assert out.scheduled_cached_reqs[1].num_computed_tokens == 9
    out = run_step(s)
    assert out.num_scheduled_tokens == {"a": 1, "b": 2}  # b finishes its prompt and samples
    assert s.requests["b"].num_output_tokens == 1


def test_max_num_seqs_limits_admission():
    s = make(max_seqs=2)
    for i in range(3):
        s.add_request(req(f"r{i}", 4))
    out = run_step(s)
    assert set(out.num_scheduled_tokens) == {"r0", "r1"}
    assert s.num_waiting == 1


def test_finish_by_length_and_eos_frees_blocks():
    s = make()
    s.add_request(req("a", 5, max_tokens=3))
    s.add_request(req("b", 5, max_tokens=10))
    run_step(s)
    run_step(s)
    run_step(s, token=EOS)
    assert "a" not in s.requests and "b" not in s.requests
    assert s.kv.num_used_blocks == 0
    out = s.schedule()
    assert out.finished_req_ids == {"a", "b"}


def test_min_tokens_defers_eos():
    s = make()
    s.add_request(req("a", 3, max_tokens=10, min_tokens=2))
    run_step(s, token=EOS)
    assert "a" in s.requests  # 1 output < min_tokens: EOS does not stop
    run_step(s, token=EOS)
    assert "a" in s.requests
    run_step(s, token=EOS)
    assert "a" not in s.requests


def test_preemption_newest_first_and_resume_with_outputs():
    # 5 usable blocks of 4 tokens
    s = make(blocks=6, bs=4, budget=64)
    s.add_request(req("old", 7, max_tokens=10, t=0.0))
    s.add_request(req("new", 7, max_tokens=10, t=1.0))
    run_step(s)  # both prefilled: 2 blocks each, 1 free
    run_step(s)  # 9 tokens each after append... old takes the last block
    out = run_step(s)
    assert out.preempted_req_ids == {"new"}
    new = s.requests["new"]
    assert new.status == RequestStatus.PREEMPTED and new.num_computed_tokens == 0
    assert new.num_preemptions == 1 and s.num_preemptions == 1
    # "old" runs on its own until it finishes; then "new" resumes with prompt + its outputs
    while "old" in s.requests:
        out = run_step(s)
    out = run_step(s)
    resumed = [n for n in out.scheduled_new_reqs if n.req_id == "new"]
    assert resumed and resumed[0].output_token_ids == [7, 7]
    assert s.kv.num_used_blocks > 0
    while s.has_unfinished_requests():
        run_step(s)
    assert s.kv.num_used_blocks == 0


def test_max_waiting_requests_overload():
    s = make(max_seqs=1, max_waiting_requests=2)
    for rid in "abc":  # one takes the free seat, two queue
        s.add_request(req(rid, 3))
    with pytest.raises(EngineOverloadedError):
        s.add_request(req("d", 3))


def test_max_waiting_requests_counts_only_requests_without_a_seat():
    """Requests that the next schedule() will admit (free seats under max_num_seqs) are not 'waiting'."""
    s = make(max_seqs=8, budget=64, max_waiting_requests=4)
    for i in range(12):  # 8 fill the free seats, 4 queue: none rejected
        s.add_request(req(f"r{i}", 3))
    with pytest.raises(EngineOverloadedError):
        s.add_request(req("r12", 3))
    run_step(s)
    assert s.num_running == 8 and s.num_waiting == 4
    with pytest.raises(EngineOverloadedError):  # no free seat: the queue is full
        s.add_request(req("late", 3))


def test_max_waiting_requests_idle_server_takes_a_full_batch():
    s = make(max_seqs=8, budget=64, max_waiting_requests=4)
    for i in range(8):
        s.add_request(req(f"r{i}", 3))
    assert len(run_step(s).scheduled_new_reqs) == 8


@pytest.mark.parametrize("bad", [0, -1])
def test_max_waiting_requests_must_be_positive(bad):
    from tokenmill.config import EngineConfig
    with pytest.raises(ValueError, match="max_waiting_requests"):
        EngineConfig.from_kwargs(max_waiting_requests=bad)


def test_prompt_larger_than_cache_rejected():
    s = make(blocks=3, bs=4)
    with pytest.raises(PromptTooLongError):
        s.add_request(req("a", 9))


def test_abort_frees_blocks_and_tells_runner():
    s = make()
    s.add_request(req("a", 9))
    run_step(s)
    assert s.kv.num_used_blocks == 3
    s.abort_requests(["a"])
    assert s.kv.num_used_blocks == 0
    assert s.schedule().finished_req_ids == {"a"}


def test_spec_tokens_scheduled_and_rejected_ones_rolled_back():
    s = make(budget=64)
    s.add_request(req("a", 4, max_tokens=20))
    run_step(s, drafts={"a": [8, 9, 10]})
    assert s.requests["a"].spec_token_ids == [8, 9, 10]
    out = s.schedule()
    assert out.num_scheduled_tokens == {"a": 4}
    assert out.scheduled_spec_decode_tokens == {"a": [8, 9, 10]}
    r = s.requests["a"]
    assert r.num_computed_tokens == 8  # 4 computed + 1 known + 3 drafts, advanced at schedule time
    # the runner accepted one draft and sampled a bonus token
    s.update_from_output(out, ModelRunnerOutput(req_ids=["a"], sampled_token_ids=[[8, 11]], logprobs=[None]))
    assert r.output_token_ids == [7, 8, 11]
    assert r.num_computed_tokens == 6 and r.num_tokens == 7  # the bonus token is not computed yet


def test_priority_policy_admits_and_preempts_by_priority():
    s = make(max_seqs=1, policy=PriorityPolicy())
    s.add_request(req("low", 3, priority=5, t=0.0))
    s.add_request(req("high", 3, priority=0, t=1.0))
    out = run_step(s)
    assert list(out.num_scheduled_tokens) == ["high"]


def test_slo_policy_orders_by_deadline():
    s = make(max_seqs=1, policy=SLOPolicy())
    s.add_request(req("relaxed", 3, t=0.0, slo=SLO(ttft_ms=5000)))
    s.add_request(req("tight", 3, t=0.5, slo=SLO(ttft_ms=100)))
    out = run_step(s)
    assert list(out.num_scheduled_tokens) == ["tight"]


def test_slo_reject_drops_hopeless_requests():
    clock = Clock()
    s = make(max_seqs=1, policy=SLOPolicy(reject=True), clock=clock)
    s.add_request(req("a", 3, max_tokens=50, t=0.0, slo=SLO(ttft_ms=100)))
    s.add_request(req("b", 3, t=0.0, slo=SLO(ttft_ms=100)))
    run_step(s)
    clock.t = 1.0  # b has waited 10x its target
    out = s.schedule()
    assert "b" not in s.requests
    assert s.requests["a"].status == RequestStatus.RUNNING
    # the rejection reaches the caller as a finished output (the server answers 429), not silence
    outs = s.update_from_output(out, ModelRunnerOutput(req_ids=["a"], sampled_token_ids=[[7]], logprobs=[None]))
    rej = [o for o in outs if o.req_id == "b"]
    assert len(rej) == 1 and rej[0].finished and rej[0].error == SLO_REJECTED_MESSAGE
    assert s.kv.num_used_blocks == len(s.kv.block_ids("a"))


def test_fair_policy_interleaves_heavy_and_light_user():
    s = make(max_seqs=1, policy=FairPolicy(), budget=64)
    for i in range(6):
        s.add_request(req(f"heavy-{i}", 8, max_tokens=2, t=0.0 + i * 1e-3, user="heavy"))
    for i in range(2):
        s.add_request(req(f"light-{i}", 8, max_tokens=2, t=0.1 + i * 1e-3, user="light"))
    order = []
    while s.has_unfinished_requests():
        out = run_step(s)
        order += [n.req_id for n in out.scheduled_new_reqs]
    # FCFS would serve all six heavy requests first; VTC lets the light user in right away
    assert order.index("light-0") <= 2 and order.index("light-1") <= 4, order


def test_long_prefill_cap_lets_short_requests_through():
    s = make(budget=64, long_prefill_token_threshold=16, max_long_partial_prefills=1)
    s.add_request(req("long1", 100, t=0.0))
    s.add_request(req("long2", 100, t=0.1))
    s.add_request(req("short", 5, t=0.2))
    out = run_step(s)
    assert out.num_scheduled_tokens == {"long1": 16, "short": 5}


def test_request_larger_than_whole_cache_ends_with_length_not_livelock():
    s = make(blocks=4, bs=4, budget=64, max_len=256)  # 12 tokens of cache in all
    s.add_request(req("a", 6, max_tokens=50))
    finished = None
    for _ in range(20):
        out = s.schedule()
        ids = list(out.num_scheduled_tokens)
        res = s.update_from_output(out, ModelRunnerOutput(req_ids=ids, sampled_token_ids=[[7] for _ in ids],
                                                          logprobs=[None] * len(ids)))
        finished = [o for o in res if o.finished] or finished
        if not s.has_unfinished_requests():
            break
    assert not s.has_unfinished_requests()
    assert finished and finished[0].finish_reason == "length"
    assert s.kv.num_used_blocks == 0


def _fill_cache(s: Scheduler, rid: str, tokens: list[int]) -> None:
    s.add_request(Request(rid, tokens, SamplingParams(max_tokens=1), (EOS,), arrival_time=-1.0))
    while s.has_unfinished_requests():
        run_step(s)


def test_prefix_aware_admission_prefers_cached_prefix():
    s = make(max_seqs=1, bs=4, budget=64)
    shared = list(range(500, 516))
    _fill_cache(s, "warm", shared + [1])
    s.add_request(Request("cold", list(range(900, 917)), SamplingParams(max_tokens=1), (EOS,), arrival_time=0.0))
    s.add_request(Request("hit", shared + [2], SamplingParams(max_tokens=1), (EOS,), arrival_time=1.0))
    out = s.schedule()
    assert [n.req_id for n in out.scheduled_new_reqs] == ["hit"]
    assert out.scheduled_new_reqs[0].num_computed_tokens == 16


def test_prefix_aware_admission_bounded_no_starvation():
    s = make(max_seqs=1, bs=4, budget=64, prefix_aware_max_skips=2)
    shared = list(range(500, 516))
    _fill_cache(s, "warm", shared + [1])
    s.add_request(Request("cold", list(range(900, 917)), SamplingParams(max_tokens=1), (EOS,), arrival_time=0.0))
    for i in range(5):
        s.add_request(Request(f"hit{i}", shared + [10 + i], SamplingParams(max_tokens=1), (EOS,),
                              arrival_time=1.0 + i))
    order = []
    while s.has_unfinished_requests():
        order += [n.req_id for n in run_step(s).scheduled_new_reqs]
    assert order.index("cold") == 2, order  # passed over twice, then admitted


def test_strict_fcfs_when_window_is_one():
    s = make(max_seqs=1, bs=4, budget=64, prefix_aware_window=1)
    shared = list(range(500, 516))
    _fill_cache(s, "warm", shared + [1])
    s.add_request(Request("cold", list(range(900, 917)), SamplingParams(max_tokens=1), (EOS,), arrival_time=0.0))
    s.add_request(Request("hit", shared + [2], SamplingParams(max_tokens=1), (EOS,), arrival_time=1.0))
    assert [n.req_id for n in s.schedule().scheduled_new_reqs] == ["cold"]


def test_policy_interface_replaces_type_checks():
    """The scheduler reads hooks and attributes of any Policy, not its type or name: a new policy gets the
    arrival / finish hooks, and prefix-aware admission where it asks for it (priority does not)."""
    from tokenmill.core.policies import Policy

    class Recording(Policy):
        name = "recording"
        prefix_aware_admission = True

        def __init__(self):
            self.events = []

        def on_arrival(self, req):
            self.events.append(("arrive", req.request_id))

        def on_finish(self, req):
            self.events.append(("finish", req.request_id))

    def first_admitted(policy):
        s = make(max_seqs=1, bs=4, budget=64, policy=policy)
        shared = list(range(500, 516))
        _fill_cache(s, "warm", shared + [1])
        s.add_request(Request("cold", list(range(900, 917)), SamplingParams(max_tokens=1), (EOS,), arrival_time=0.0))
        s.add_request(Request("hit", shared + [2], SamplingParams(max_tokens=1), (EOS,), arrival_time=1.0))
        first = [n.req_id for n in s.schedule().scheduled_new_reqs]
        s.abort_requests(["cold", "hit"])
        return first

    rec = Recording()
    assert first_admitted(rec) == ["hit"]
    assert first_admitted(PriorityPolicy()) == ["cold"]
    assert ("arrive", "cold") in rec.events and ("finish", "cold") in rec.events
    assert rec.events.index(("arrive", "hit")) < rec.events.index(("finish", "hit"))


def test_policy_factory_by_name():
    from tokenmill.core.policies import FCFSPolicy, make_policy, policy_class

    assert [policy_class(n) for n in ("fcfs", "priority", "slo", "fair")] == [FCFSPolicy, PriorityPolicy, SLOPolicy,
                                                                            FairPolicy]
    pol = make_policy("slo", slo_reject=True, default_ttft_ms=300.0)
    assert isinstance(pol, SLOPolicy) and pol.rejects_requests and pol.default_ttft_ms == 300.0
    assert not make_policy("slo").rejects_requests and not make_policy("fair").rejects_requests
    with pytest.raises(ValueError, match="choose fcfs, priority, slo or fair"):
        policy_class("random")
