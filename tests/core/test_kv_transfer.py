"""Disaggregated prefill / decode in the scheduler (core/kv_transfer.py): the producer holds a prefilled
request's blocks until the connector reports them sent; the consumer waits for its KV (WAITING_FOR_REMOTE_KV),
then runs with the prompt computed, or recomputes it when the pull failed. Scripted runner, no torch."""
from __future__ import annotations

import pytest

from tests.core.test_scheduler import EOS, Clock, run_step
from tokenmill.config import SchedulerConfig
from tokenmill.core.kv_transfer import RemoteDecode, RemotePrefill, parse_kv_transfer_params
from tokenmill.core.outputs import ModelRunnerOutput
from tokenmill.core.policies import SLOPolicy
from tokenmill.core.scheduler import Scheduler
from tokenmill.errors import InvalidRequestError
from tokenmill.request import Request, RequestStatus
from tokenmill.sampling_params import SLO, SamplingParams

PROMPT = list(range(100, 110))  # 10 tokens: blocks of 4 -> 3 blocks


def producer_req(rid="p", tid="T1", prompt=PROMPT):
    return Request(rid, prompt, SamplingParams(max_tokens=1, kv_transfer_params={
        "do_remote_decode": True, "transfer_id": tid}), (EOS,))


def consumer_req(rid="d", tid="T1", first=42, max_tokens=4, prompt=PROMPT, **sp):
    return Request(rid, prompt, SamplingParams(max_tokens=max_tokens, kv_transfer_params={
        "do_remote_prefill": True, "transfer_id": tid, "remote_host": "127.0.0.1", "remote_port": 9,
        "first_token_id": first}, **sp), (EOS,))


def report(s: Scheduler, sent=(), recved=None):
    """A step whose runner only reports transfers."""
    out = s.schedule()
    res = ModelRunnerOutput(kv_sent=list(sent), kv_recved=dict(recved or {}))
    return out, s.update_from_output(out, res)


@pytest.mark.parametrize("params, needle", [
    ("x", "must be an object"),
    ({"do_remote_decode": True}, "transfer_id"),
    ({"transfer_id": "t"}, "exactly one"),
    ({"transfer_id": "t", "do_remote_decode": True, "do_remote_prefill": True}, "exactly one"),
    ({"transfer_id": "t", "do_remote_prefill": True, "remote_host": "h", "remote_port": 0, "first_token_id": 1},
     "remote_port"),
    ({"transfer_id": "t", "do_remote_prefill": True, "remote_host": "h", "remote_port": 5, "first_token_id": -1},
     "first_token_id"),
])
def test_bad_params_name_the_field(params, needle):
    with pytest.raises(InvalidRequestError) as e:
        parse_kv_transfer_params(params)
    assert e.value.param == "kv_transfer_params" and needle in str(e.value)


def test_params_parse():
    assert parse_kv_transfer_params(None) is None
    assert parse_kv_transfer_params({"do_remote_decode": True, "transfer_id": "t"}) == RemoteDecode("t")
    assert parse_kv_transfer_params({"do_remote_prefill": True, "transfer_id": "t", "remote_host": "h",
                                     "remote_port": 5, "first_token_id": 3}) == RemotePrefill("t", "h", 5, 3)


def test_role_is_checked():
    with pytest.raises(InvalidRequestError, match="producer"):
        make().add_request(producer_req())
    with pytest.raises(InvalidRequestError, match="consumer"):
        make(kv_role="producer").add_request(consumer_req())
    with pytest.raises(InvalidRequestError) as e:
        make(kv_role="producer").add_request(Request("p", PROMPT, SamplingParams(
            max_tokens=3, kv_transfer_params={"do_remote_decode": True, "transfer_id": "t"}), (EOS,)))
    assert e.value.param == "max_tokens"
    with pytest.raises(InvalidRequestError) as e:
        make(kv_role="consumer").add_request(consumer_req(logprobs=1))
    assert e.value.param == "logprobs"
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(n=2, kv_transfer_params={"do_remote_decode": True, "transfer_id": "t"})
    assert e.value.param == "n"


def make(kv_role=None, max_seqs=8, budget=32, blocks=64):
    cfg = SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget)
    return Scheduler(cfg, blocks, 4, 256, clock=Clock(), kv_role=kv_role)


def test_producer_holds_blocks_until_sent():
    s = make(kv_role="producer")
    s.add_request(producer_req())
    run_step(s, token=42)  # the whole prompt, then the first token: finished (max_tokens 1)
    assert s.requests == {} and s.kv.num_used_blocks == 3  # held for the consumer
    out, _ = report(s)
    send = out.kv_transfer.send["p"]
    assert send.transfer_id == "T1" and send.token_ids == PROMPT and send.first_token_id == 42
    assert send.block_ids == s.kv.block_ids("p") and len(send.block_ids) == 3
    assert out.kv_transfer.pending and s.has_work()
    out, _ = report(s)  # nothing reported yet: still held, nothing re-listed
    assert out.kv_transfer.send == {} and s.kv.num_used_blocks == 3
    report(s, sent=["p"])
    assert s.kv.num_used_blocks == 0 and s.kv_transfer.num_sent == 1
    assert s.schedule().kv_transfer is None and not s.has_work()


def test_producer_abort_frees_at_once():
    s = make(kv_role="producer")
    s.add_request(producer_req())
    s.schedule()
    s.abort_requests(["p"])
    assert s.kv.num_used_blocks == 0 and s.schedule().kv_transfer is None


def test_consumer_reports_first_token_then_pulls_then_decodes():
    s = make(kv_role="consumer")
    r = consumer_req()
    s.add_request(r)
    assert r.status == RequestStatus.WAITING_FOR_REMOTE_KV and r.output_token_ids == [42]
    out, outs = report(s)
    assert [(o.req_id, o.new_token_ids) for o in outs] == [("d", [42])]
    recv = out.kv_transfer.recv["d"]
    assert (recv.first_block, recv.block_ids, recv.token_ids) == (0, s.kv.block_ids("d"), PROMPT)
    assert out.total_num_scheduled_tokens == 0 and s.kv.num_used_blocks == 3
    assert s.kv.get_computed_blocks(consumer_req("other"))[1] == 0  # not in the prefix cache before it arrives
    out, _ = report(s)
    assert out.kv_transfer.recv == {} and out.kv_transfer.pending
    report(s, recved={"d": True})
    assert s.kv_transfer.ready == [r] and r.num_computed_tokens == 10
    out = run_step(s, token=43)
    new = out.scheduled_new_reqs[0]
    assert (new.num_computed_tokens, new.output_token_ids, out.num_scheduled_tokens) == (10, [42], {"d": 1})
    assert r.output_token_ids == [42, 43] and s.num_prompt_tokens_computed == 0
    assert s.kv.get_computed_blocks(consumer_req("other"))[1] == 8  # cached once arrived
    while s.has_unfinished_requests():
        run_step(s)
    assert s.kv.num_used_blocks == 0 and s.kv_transfer.num_recv_ok == 1


def test_first_token_is_reported_without_waiting_for_a_step():
    """The engine loops take the first token right after adding the request: a decode step of the other requests
    (running here) does not stand between the producer's answer and the client's first token."""
    s = make(kv_role="consumer")
    s.add_request(Request("busy", [1, 2, 3], SamplingParams(max_tokens=50), (EOS,)))
    run_step(s)
    s.add_request(consumer_req())
    outs = s.take_first_token_outputs()
    assert [(o.req_id, o.new_token_ids, o.finish_reason) for o in outs] == [("d", [42], None)]
    assert s.num_generated_tokens == 2 and s.take_first_token_outputs() == []
    out, outs = report(s)
    assert "d" not in [o.req_id for o in outs]  # reported once
    assert "d" in out.kv_transfer.recv


def test_failed_pull_recomputes_the_prompt():
    s = make(kv_role="consumer")
    r = consumer_req()
    s.add_request(r)
    report(s)
    report(s, recved={"d": False})
    out = run_step(s, token=43)
    assert out.scheduled_new_reqs[0].num_computed_tokens == 0 and out.num_scheduled_tokens == {"d": 11}
    assert r.output_token_ids == [42, 43] and s.kv_transfer.num_recv_failed == 1
    while s.has_unfinished_requests():
        run_step(s)
    assert s.kv.num_used_blocks == 0


def test_local_prefix_hits_are_not_pulled():
    s = make(kv_role="both")
    s.add_request(Request("warm", PROMPT, SamplingParams(max_tokens=1), (EOS,)))
    run_step(s)
    s.add_request(consumer_req())
    out, _ = report(s)
    recv = out.kv_transfer.recv["d"]
    assert recv.first_block == 2 and len(recv.block_ids) == 1  # blocks 0, 1 are cached here
    s.add_request(consumer_req("d2", "T2", prompt=PROMPT[:8]))  # wholly cached here: an empty pull
    out, _ = report(s)
    assert out.kv_transfer.recv["d2"].block_ids == [] and out.kv_transfer.recv["d2"].first_block == 2


def test_abort_during_pull_keeps_blocks_until_the_connector_lets_go():
    s = make(kv_role="consumer")
    s.add_request(consumer_req())
    report(s)
    s.abort_requests(["d"])
    assert s.kv.num_used_blocks == 3  # the connector may still write them
    out, _ = report(s)
    assert out.kv_transfer.cancel == ["d"] and s.kv.num_used_blocks == 3
    report(s, recved={"d": False})
    assert s.kv.num_used_blocks == 0 and not s.has_work()


def test_abort_before_the_pull_releases_the_producer():
    s = make(kv_role="consumer", max_seqs=1)
    s.add_request(consumer_req("a", "A"))
    s.add_request(consumer_req("b", "B"))  # no seat: waits
    report(s)
    s.abort_requests(["b"])
    out, _ = report(s)
    rel = out.kv_transfer.recv["b"]
    assert rel.block_ids == [] and rel.transfer_id == "B"  # an empty pull: the producer frees its blocks
    report(s, recved={"a": True, "b": True})
    assert s.kv_transfer.num_recv_ok == 1 and "b" not in s.kv_transfer.recving
    while s.has_unfinished_requests():
        run_step(s)
    s.schedule()  # hands the runner its finished ids
    assert s.kv.num_used_blocks == 0 and not s.has_work()


def test_first_token_eos_finishes_at_once():
    s = make(kv_role="consumer")
    s.add_request(consumer_req(first=EOS))
    _, outs = report(s)
    assert [(o.new_token_ids, o.finish_reason) for o in outs] == [([EOS], "stop")]
    assert s.kv.num_used_blocks == 0 and not s.has_work()


def test_slo_policy_admits_transferred_requests_by_tpot_deadline():
    clock = Clock()
    policy = SLOPolicy.from_config(SchedulerConfig(policy="slo"))
    s = Scheduler(SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=32, policy="slo"), 64, 4, 256,
                  policy=policy, clock=clock, kv_role="consumer")
    s.add_request(consumer_req("loose", "A", slo=SLO(tpot_ms=500)))
    s.add_request(consumer_req("tight", "B", slo=SLO(tpot_ms=20)))
    out, _ = report(s)
    assert list(out.kv_transfer.recv) == ["tight"]  # one seat: the tighter TPOT target is pulled first


@pytest.mark.parametrize("kwargs, needle", [
    ({"kv_role": "producer", "tensor_parallel_size": 2}, "tensor_parallel_size 1"),
    ({"kv_role": "decoder"}, "kv_role"),
    ({"kv_transfer_port": 0}, "kv_transfer_port"),
    ({"kv_transfer_timeout": 0}, "kv_transfer_timeout"),
    ({"kv_connector": "nccl"}, "kv_connector"),
])
def test_config_errors(kwargs, needle):
    from tokenmill.config import EngineConfig
    from tokenmill.errors import ConfigError

    with pytest.raises(ConfigError, match=needle):
        EngineConfig.from_kwargs(**kwargs)
