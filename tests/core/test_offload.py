"""CPU offload tier bookkeeping (tokenmill/core/offload.py) through the scheduler, with a scripted runner:
exact device/host block ids of swap-outs and swap-ins, fallback to recompute, host prefix hits, host LRU
eviction, no leaked blocks. No torch."""
from __future__ import annotations

import subprocess
import sys

from tokenmill.config import SchedulerConfig
from tokenmill.core.outputs import ModelRunnerOutput, SchedulerOutput
from tokenmill.core.scheduler import Scheduler
from tokenmill.request import Request, RequestStatus
from tokenmill.sampling_params import SamplingParams

EOS = 2


def make(blocks: int, host: int, bs: int = 4, caching: bool = True, budget: int = 64) -> Scheduler:
    cfg = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=budget, prefix_aware_window=1)
    return Scheduler(cfg, blocks, bs, 256, caching, clock=lambda: 0.0, num_host_blocks=host)


def req(rid: str, tokens: list[int], max_tokens: int, t: float = 0.0) -> Request:
    return Request(rid, tokens, SamplingParams(max_tokens=max_tokens), (EOS,), arrival_time=t)


def run_step(s: Scheduler, token: int = 7) -> SchedulerOutput:
    out = s.schedule()
    ids = list(out.num_scheduled_tokens)
    toks = [[token] if s.requests[r].num_computed_tokens >= s.requests[r].num_tokens else [] for r in ids]
    s.update_from_output(out, ModelRunnerOutput(req_ids=ids, sampled_token_ids=toks, logprobs=[None] * len(ids)))
    return out


def assert_no_leaks(s: Scheduler) -> None:
    kv, off = s.kv, s.kv.offload
    assert kv.num_used_blocks == 0
    assert off.num_free_host_blocks == off.num_host_blocks
    assert not off.swapped and not off._pinned


def test_offload_module_imports_without_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import tokenmill.core.offload, tokenmill.core.scheduler\nprint('ok')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


def _preempt_new(s: Scheduler) -> SchedulerOutput:
    """old (7 tokens, 3 outputs) and new (7 tokens) fill 5 usable blocks of 4; new is preempted in step 3."""
    s.add_request(req("old", list(range(100, 107)), 3, t=0.0))
    s.add_request(req("new", list(range(200, 207)), 3, t=1.0))
    out = run_step(s)
    assert s.kv.block_ids("old") == [1, 2] and s.kv.block_ids("new") == [3, 4]
    assert not out.kv_swap_out and not out.kv_swap_in
    run_step(s)  # both at 9 tokens, 8 computed
    out = run_step(s)  # old needs a 3rd block (5); new needs one too: none left -> new is preempted
    assert out.preempted_req_ids == {"new"}
    return out


def test_preemption_swaps_out_and_resume_swaps_in_without_recompute():
    s = make(blocks=6, host=8, caching=False)
    out = _preempt_new(s)
    # new's 8 computed tokens = its 2 blocks (3, 4) -> host blocks 0, 1
    assert out.kv_swap_out == [(3, 0), (4, 1)] and out.kv_swap_in == []
    new = s.requests["new"]
    assert new.status == RequestStatus.PREEMPTED
    assert s.kv.offload.swapped["new"].num_tokens == 8
    assert s.kv.offload.num_free_host_blocks == 6
    assert "old" not in s.requests  # old finished in step 3: blocks 1, 2, 5 free (in that order)
    out = run_step(s)
    # resume: fresh device blocks 1, 2 (+5 for the 9th token), host 0 -> 1, host 1 -> 2, and only the
    # one uncomputed token is scheduled (nothing recomputed)
    assert out.kv_swap_in == [(0, 1), (1, 2)] and out.kv_swap_out == []
    (nd,) = out.scheduled_new_reqs
    assert nd.req_id == "new" and nd.block_ids == [1, 2, 5] and nd.num_computed_tokens == 8
    assert nd.output_token_ids == [7, 7]
    assert out.num_scheduled_tokens == {"new": 1}
    off = s.kv.offload
    assert (off.num_swapped_out_blocks, off.num_swapped_in_blocks, off.num_swap_preemptions) == (2, 2, 1)
    assert off.num_free_host_blocks == 8  # unpinned after the step
    while s.has_unfinished_requests():
        run_step(s)
    assert s.requests == {} and s.num_preemptions == 1
    assert_no_leaks(s)


def test_host_full_falls_back_to_recompute():
    s = make(blocks=6, host=1, caching=False)  # new needs 2 host blocks
    out = _preempt_new(s)
    assert out.kv_swap_out == [] and "new" not in s.kv.offload.swapped
    out = run_step(s)
    assert out.kv_swap_in == []
    (nd,) = out.scheduled_new_reqs
    assert nd.num_computed_tokens == 0 and out.num_scheduled_tokens == {"new": 9}  # recomputed
    while s.has_unfinished_requests():
        run_step(s)
    assert_no_leaks(s)
    assert s.kv.offload.num_swapped_out_blocks == 0


def test_resume_takes_device_prefix_hits_and_swaps_in_the_rest():
    """With prefix caching, a preempted request's full blocks stay in the device cache too: those still
    there are hits (no copy), only the others come back from the host."""
    s = make(blocks=6, host=8, caching=True)
    out = _preempt_new(s)
    assert out.kv_swap_out == [(3, 0), (4, 1)]
    # new's first full block is also in the host index (shared with later evictions)
    keys = s.requests["new"].block_hashes
    assert [s.kv.offload.lookup(k) for k in keys[:2]] == [0, 1]
    out = run_step(s)
    (nd,) = out.scheduled_new_reqs
    # blocks 3 and 4 are still cached on the device: both are hits, nothing to copy
    assert nd.block_ids == [3, 4, 5] and nd.num_computed_tokens == 8 and out.kv_swap_in == []
    assert out.num_scheduled_tokens == {"new": 1}
    while s.has_unfinished_requests():
        run_step(s)
    assert_no_leaks(s)


def test_resume_swaps_in_partial_block_next_to_device_hits():
    """new is preempted with 11 computed tokens (2 full blocks + a partial one). On resume its full blocks
    are device hits and only the partial block comes back from the host; a request admitted in the same
    step evicts cached blocks to the host."""
    s = make(blocks=7, host=8, caching=True)  # 6 usable
    s.add_request(req("old", list(range(100, 111)), 4, t=0.0))  # 11 tokens: 3 blocks
    s.add_request(req("new", list(range(200, 210)), 4, t=1.0))  # 10 tokens: 3 blocks
    run_step(s)
    assert s.kv.block_ids("old") == [1, 2, 3] and s.kv.block_ids("new") == [4, 5, 6]
    run_step(s)
    out = run_step(s)  # old reaches 13 tokens (a 4th block): new (11 computed) is preempted
    assert out.preempted_req_ids == {"new"}
    assert out.kv_swap_out == [(4, 0), (5, 1), (6, 2)]
    assert s.kv.offload.swapped["new"].num_tokens == 11
    assert s.kv.block_ids("old") == [1, 2, 3, 6]  # new's uncached partial block 6 was first in line
    s.add_request(req("hog", list(range(300, 308)), 1, t=2.0))
    out = run_step(s)  # old's last token; new cannot resume yet (its 2 hits leave no free block)
    assert out.num_scheduled_tokens == {"old": 1} and "old" not in s.requests
    out = run_step(s)
    nd = {n.req_id: n for n in out.scheduled_new_reqs}
    # new: device hits 4, 5 + host 2 (the partial block) -> fresh block 6; 11 computed, 1 token to go
    assert nd["new"].block_ids == [4, 5, 6] and nd["new"].num_computed_tokens == 11
    assert out.kv_swap_in == [(2, 6)]
    # hog's two blocks evict old's cached 3 and 2 to the free host blocks 3 and 4
    assert nd["hog"].block_ids == [3, 2] and out.kv_swap_out == [(3, 3), (2, 4)]
    assert out.num_scheduled_tokens == {"new": 1, "hog": 8}
    while s.has_unfinished_requests():
        run_step(s)
    assert_no_leaks(s)


def test_evicted_prefix_block_goes_to_host_and_hits_back():
    s = make(blocks=4, host=4)  # 3 usable device blocks
    shared = list(range(10, 18))
    s.add_request(req("a", shared + [50], 1))
    out = run_step(s)
    assert s.requests == {} and s.kv.pool.num_cached_blocks == 2  # a's blocks 1, 2 cached; 3 not
    s.add_request(req("b", list(range(60, 71)), 1))  # 3 fresh blocks: evicts 2 then 1
    out = run_step(s)
    assert out.kv_swap_out == [(2, 0), (1, 1)] and out.kv_swap_in == []
    s.add_request(req("c", shared + [80, 81, 82], 1))
    out = run_step(s)
    # device miss, host hit on both shared blocks (host 1 = k0, host 0 = k1) into fresh blocks 1, 2;
    # b's cached blocks 2, 3 are evicted to the free host blocks 2, 3 in the same step: device block 2 is
    # read by a swap-out before the swap-in of host 0 overwrites it (the runner does outs first)
    (nd,) = out.scheduled_new_reqs
    assert nd.block_ids == [1, 2, 3] and nd.num_computed_tokens == 8
    assert out.num_scheduled_tokens == {"c": 3}
    assert out.kv_swap_in == [(1, 1), (0, 2)]
    assert out.kv_swap_out == [(2, 2), (3, 3)]
    off = s.kv.offload
    assert off.num_prefix_hit_tokens == 8 and s.kv.prefix_hits == 8
    assert off.num_swapped_out_blocks == 4 and off.num_swapped_in_blocks == 2
    assert_no_leaks(s)


def test_host_lru_eviction_order():
    s = make(blocks=3, host=2)  # 2 usable device blocks, 2 host blocks
    prompts = {r: list(range(100 * i, 100 * i + 4)) + [1] for i, r in enumerate("pqrs", start=1)}
    for r in "pqrs":  # each request caches one full block, evicting the previous request's one
        s.add_request(req(r, prompts[r], 1))
        run_step(s)
    off = s.kv.offload
    keys = {r: Request(r, prompts[r], SamplingParams()) for r in "pqrs"}
    for r in keys.values():
        s.kv.get_computed_blocks(r)  # fills block_hashes
    # p was evicted to host first, then q; r's eviction (4th request) pushed p out of the host LRU
    where = {r: (s.kv.pool.lookup(keys[r].block_hashes[0]) is not None, off.lookup(keys[r].block_hashes[0]))
             for r in "pqrs"}
    assert where == {"p": (False, None), "q": (False, 1), "r": (False, 0), "s": (True, None)}
    assert_no_leaks(s)


def test_abort_of_swapped_request_frees_host_blocks():
    s = make(blocks=6, host=8, caching=False)
    s.add_request(req("old", list(range(100, 107)), 10, t=0.0))
    s.add_request(req("new", list(range(200, 207)), 10, t=1.0))
    for _ in range(3):
        run_step(s)
    assert "new" in s.kv.offload.swapped
    s.abort_requests(["new"])
    assert s.kv.offload.num_free_host_blocks == 8 and not s.kv.offload.swapped
    s.abort_requests(["old"])
    s.schedule()
    s.update_from_output(SchedulerOutput(), ModelRunnerOutput())
    assert_no_leaks(s)
