"""The scheduler passes over a waiting request whose grammar is not ready, and admits it once it is."""
from __future__ import annotations

from tokenmill.config import SchedulerConfig
from tokenmill.core.scheduler import Scheduler
from tokenmill.request import Request
from tokenmill.sampling_params import SamplingParams


def test_not_ready_request_waits_without_blocking_others():
    s = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64), 64, 4, 256)
    ready = {"a": False, "b": True}
    s.is_ready = lambda r: ready[r.request_id]
    s.add_request(Request("a", [10, 11, 12], SamplingParams(max_tokens=4), (2,)))
    s.add_request(Request("b", [20, 21], SamplingParams(max_tokens=4), (2,)))
    out = s.schedule()
    assert out.num_scheduled_tokens == {"b": 2}
    assert [r.request_id for r in s.waiting] == ["a"] and s.requests["a"].num_computed_tokens == 0
    ready["a"] = True
    out = s.schedule()
    assert out.num_scheduled_tokens == {"a": 3}  # (b sampled nothing: no runner in this test)


def test_scheduler_output_with_a_grammar_bitmask_pickles():
    import pickle

    import numpy as np

    from tokenmill.core.outputs import SchedulerOutput

    out = SchedulerOutput(num_scheduled_tokens={"a": 3}, grammar_bitmask=np.arange(6, dtype=np.int32).reshape(2, 3),
                          grammar_rows={"a": 0}, forced_token_ids={"a": [5, 6]})
    back = pickle.loads(pickle.dumps(out))
    assert (back.grammar_bitmask == out.grammar_bitmask).all() and back.grammar_rows == {"a": 0}
    assert back.forced_token_ids == {"a": [5, 6]}
