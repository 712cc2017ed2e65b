"""Multi-LoRA in the scheduler (no torch): at most max_loras distinct adapters among running requests and in any
step, the base model never counted; a held-back adapter runs when one drains; prefix-cache keys include the
adapter id; the LoRA registry's LRU and in-use refusal."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.core.test_scheduler import make
from tests.core.test_scheduler import run_step as _run_step
from tokenmill.config import SchedulerConfig
from tokenmill.core.scheduler import Scheduler
from tokenmill.request import Request
from tokenmill.sampling_params import SamplingParams


def run_step(s: Scheduler):
    """One scripted step; the output remembers each scheduled request's adapter (finished ones leave s.requests)."""
    lora_of = {rid: r.lora_int_id for rid, r in s.requests.items()}
    out = _run_step(s)
    out.lora_of = lora_of
    return out


def lreq(rid, lora, n_prompt=6, max_tokens=3, prompt=None):
    base = 1000 * sum(map(ord, rid))
    ids = prompt if prompt is not None else list(range(base, base + n_prompt))
    return Request(rid, ids, SamplingParams(max_tokens=max_tokens), (2,), lora_int_id=lora)


def _loras_of(s: Scheduler, out) -> set[int]:
    return {out.lora_of[r] for r in out.num_scheduled_tokens if out.lora_of[r]}


def test_max_loras_per_step():
    s = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64), 64, 4, 256, max_loras=2)
    for i, lora in enumerate([1, 2, 3, 0, 1, 3, 0]):
        s.add_request(lreq(f"r{i}", lora))
    out = run_step(s)
    assert _loras_of(s, out) == {1, 2}
    # the base model's requests and those of admitted adapters run; adapter 3 waits
    assert set(out.num_scheduled_tokens) == {"r0", "r1", "r3", "r4", "r6"}
    seen3 = False
    for _ in range(20):
        out = run_step(s)
        assert len(_loras_of(s, out)) <= 2
        assert len({r.lora_int_id for r in s.running if r.lora_int_id}) <= 2
        seen3 |= 3 in _loras_of(s, out)
        if not s.has_unfinished_requests():
            break
    assert seen3 and not s.has_unfinished_requests()
    assert s.lora_requests == {1: 2, 2: 1, 3: 2}
    assert s.lora_generated_tokens == {1: 6, 2: 3, 3: 6}


def test_no_limit_without_lora():
    s = make()
    for i in range(4):
        s.add_request(lreq(f"r{i}", i + 1))
    out = s.schedule()
    assert len({s.requests[r].lora_int_id for r in out.num_scheduled_tokens}) == 4  # max_loras None: no LoRA limit in the scheduler


def test_prefix_cache_key_has_adapter():
    s = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64), 64, 4, 256, max_loras=4)
    prompt = list(range(100, 117))
    s.add_request(lreq("a", 1, prompt=prompt, max_tokens=1))
    while s.has_unfinished_requests():
        run_step(s)
    for rid, lora, hit in [("b", 1, 16), ("c", 2, 0), ("d", 0, 0)]:
        r = lreq(rid, lora, prompt=prompt, max_tokens=1)
        assert s.kv.get_computed_blocks(r)[1] == hit, rid


def test_lora_in_use():
    s = Scheduler(SchedulerConfig(), 64, 4, 256, max_loras=1)
    s.add_request(lreq("a", 5))
    assert s.lora_in_use(5) and not s.lora_in_use(6)
    s.abort_requests(["a"])
    assert not s.lora_in_use(5)


def test_registry_lru_and_in_use():
    from tokenmill.errors import EngineOverloadedError
    from tokenmill.lora.registry import LoRAInUseError, LoRARegistry

    reads = []
    reg = LoRARegistry(2, lambda lid, name, path: reads.append(lid) or f"w{lid}")
    busy: set[int] = set()
    assert reg.add(1, "a", "/a", "w1", busy.__contains__) and not reg.add(1, "a", "/a", "w1", busy.__contains__)
    reg.add(2, "b", "/b", "w2", busy.__contains__)
    reg.ensure_resident(1, busy.__contains__)  # 1 most recent
    reg.add(3, "c", "/c", "w3", busy.__contains__)  # drops 2 (least recently used)
    assert list(reg.resident) == [1, 3]

    class Out:
        lora_loads, lora_unloads = {}, []

    out = Out()
    reg.attach(out)
    assert set(out.lora_loads) == {1, 3} and out.lora_unloads == []  # 2 never reached the runner
    busy.update({1, 3})
    with pytest.raises(EngineOverloadedError):
        reg.ensure_resident(2, busy.__contains__)
    busy.discard(1)
    reg.ensure_resident(2, busy.__contains__)
    assert reads == [2] and reg.num_reloads == 1
    reg.attach(out)
    assert out.lora_unloads == [1] and set(out.lora_loads) == {2}
    with pytest.raises(LoRAInUseError):
        reg.remove(3, busy.__contains__)
    assert reg.remove(2, busy.__contains__) and not reg.remove(2, busy.__contains__)


def test_lora_bookkeeping_imports_without_torch():
    code = ("import sys; sys.modules['torch'] = None; import tokenmill.lora.registry, tokenmill.lora.config, "
            "tokenmill.lora.request, tokenmill.core.scheduler; from tokenmill import LoRARequest; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "ok", out.stderr
