"""The serving benchmark client against the stub server: counts, ordering, token counts, failures, multi-turn."""
from __future__ import annotations

import json
import math
import socket
import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from stub_server import StubConfig, StubServer  # noqa: E402

from tokenmill.bench.serve import arrival_times, find_goodput, next_probe_rate, parse_rates, run_serve_benchmark
from tokenmill.bench.types import BenchError


def _run(stub: StubServer, workload: str, rates=(math.inf,), **kw):
    kw.setdefault("progress", False)
    return run_serve_benchmark(stub.url, workload, list(rates), **kw)


def test_counts_tokens_and_timings():
    with StubServer(StubConfig()) as stub:
        (res,) = _run(stub, "fixed:50:8", rates=[500.0], num_requests=20)
        bodies = stub.state.bodies
    recs = res.records
    assert len(recs) == 20 and res.summary["completed"] == 20 and res.summary["failed"] == 0
    assert len(bodies) == 21  # one warm-up request, then the 20 measured
    for r in recs:
        assert r.success and r.status == 200
        assert r.output_tokens == 8 and r.usage_completion_tokens == 8 and len(r.itl_s) == 7
        assert r.text == "".join(f"tok{i} " for i in range(8))
        assert 0 < r.ttft_s <= r.e2e_s
        assert r.tpot_s == pytest.approx((r.e2e_s - r.ttft_s) / 7)
        assert r.start_s >= r.scheduled_s - 1e-3  # never sent before its arrival time
    sched = [r.scheduled_s for r in sorted(recs, key=lambda r: r.conv_id)]
    assert sched == sorted(sched) and sched[0] == 0.0
    assert [r.start_s for r in sorted(recs, key=lambda r: r.scheduled_s)] == sorted(r.start_s for r in recs)
    b = bodies[-1]
    assert b["stream"] is True and b["stream_options"] == {"include_usage": True}
    assert b["max_tokens"] == 8 and b["ignore_eos"] is True and b["model"] == "stub-model"
    assert b["messages"][0]["role"] == "user"
    s = res.summary
    assert s["total_output_tokens"] == 160
    assert s["output_throughput"] == pytest.approx(160 / s["duration_s"])
    assert s["ttft_ms"]["p50"] <= s["ttft_ms"]["p90"] <= s["ttft_ms"]["p99"] <= s["ttft_ms"]["max"]
    assert s["slo_attainment"] == 1.0 and s["goodput"] == pytest.approx(s["request_throughput"])


@pytest.mark.parametrize("include_usage, expected", [(True, 12), (False, 6)])
def test_token_count_from_usage_else_chunks(include_usage, expected):
    with StubServer(StubConfig(tokens_per_chunk=2, include_usage=include_usage)) as stub:
        (res,) = _run(stub, "fixed:20:12", num_requests=4, endpoint="completions")
        body = stub.state.bodies[-1]
    assert "prompt" in body and "messages" not in body
    assert all(r.output_tokens == expected for r in res.records)
    assert all(len(r.itl_s) == 5 for r in res.records)


def test_429_counted_as_failures():
    with StubServer(StubConfig(fail_every=3)) as stub:
        (res,) = _run(stub, "fixed:10:4", num_requests=30, slo_ttft_ms=10_000)
    # The stub counts the warm-up as its request 1; requests 3, 6, ..., 30 of its 31 fail.
    s = res.summary
    assert s["failed"] == 10 and s["failed_429"] == 10 and s["completed"] == 20 and s["num_requests"] == 30
    assert s["errors"] == {"HTTP 429": 10}
    assert s["slo_attainment"] == pytest.approx(20 / 30)
    failed = [r for r in res.records if not r.success]
    assert all(r.status == 429 and r.ttft_s is None and not r.meets_slo() for r in failed)


def test_server_errors_never_crash_the_run():
    with StubServer(StubConfig(fail_every=2, fail_status=500)) as stub:
        (res,) = _run(stub, "chat", num_requests=10, warmup=False)
    assert res.summary["failed"] == 5 and res.summary["failed_429"] == 0


def test_multi_turn_resends_history_closed_loop():
    with StubServer(StubConfig(itl_s=0.001)) as stub:
        (res,) = _run(stub, "multi-turn:min_turns=3,max_turns=3,out_len=4", rates=[1000.0], num_requests=4,
                      warmup=False)
        bodies = stub.state.bodies
    assert len(res.records) == 12 and all(r.success for r in res.records)
    by_conv: dict[int, list] = {}
    for r in res.records:
        by_conv.setdefault(r.conv_id, []).append(r)
    for recs in by_conv.values():
        assert [r.turn for r in recs] == [0, 1, 2]
        for prev, nxt in zip(recs, recs[1:]):
            assert nxt.start_s >= prev.start_s + prev.e2e_s  # sent only after the previous turn completed
            assert nxt.prompt_len > prev.prompt_len
    lengths = sorted(len(b["messages"]) for b in bodies)
    assert lengths == [1] * 4 + [3] * 4 + [5] * 4
    third = [b for b in bodies if len(b["messages"]) == 5]
    for b in third:
        roles = [m["role"] for m in b["messages"]]
        assert roles == ["user", "assistant", "user", "assistant", "user"]
        n = b["messages"][1]["content"].count("tok")
        assert b["messages"][1]["content"] == "".join(f"tok{i} " for i in range(n))


def test_per_request_slo_overrides_global(tmp_path):
    lines = [{"prompt": "a b c", "max_tokens": 3, "ttft_ms": 1e-6},  # impossible target
             {"prompt": "d e f", "max_tokens": 3},
             {"prompt": "g h i", "max_tokens": 3, "ttft_ms": 60_000, "tpot_ms": 60_000}]
    path = tmp_path / "w.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines))
    with StubServer() as stub:
        (res,) = _run(stub, str(path), slo_ttft_ms=1e-6, slo_tpot_ms=60_000)
    recs = sorted(res.records, key=lambda r: r.conv_id)
    assert len(recs) == 3 and all(r.success for r in recs)
    assert [r.meets_slo() for r in recs] == [False, False, True]
    assert recs[2].slo_ttft_ms == 60_000 and recs[1].slo_ttft_ms == 1e-6
    assert res.summary["good_requests"] == 1


def test_jsonl_delay_s_sets_arrival(tmp_path):
    path = tmp_path / "w.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": "x y", "max_tokens": 2, "delay_s": d}) for d in (0.2, 0.0, 0.1)))
    with StubServer() as stub:
        (res,) = _run(stub, str(path), rates=[1.0])
    recs = sorted(res.records, key=lambda r: r.conv_id)
    assert [r.scheduled_s for r in recs] == [0.2, 0.0, 0.1]
    assert recs[1].start_s < recs[2].start_s < recs[0].start_s


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_url_is_one_line_error():
    with pytest.raises(BenchError, match="cannot reach server") as ei:
        run_serve_benchmark(f"http://127.0.0.1:{_free_port()}", "chat", [1.0], num_requests=1, progress=False)
    assert "\n" not in str(ei.value)


def test_bad_route_stops_at_warmup():
    with StubServer() as stub:
        with pytest.raises(BenchError, match="did not name a model; pass --model"):
            run_serve_benchmark(stub.url + "/nope", "chat", [1.0], num_requests=1, progress=False)
        with pytest.raises(BenchError, match="test request .* failed: HTTP 404"):
            run_serve_benchmark(stub.url + "/nope", "chat", [1.0], num_requests=1, progress=False, model="m")
        assert stub.state.count == 0


@pytest.mark.parametrize("text", ["", "1,,2", "fast", "0", "-1", "nan", "1;2"])
def test_bad_rate_lists(text):
    with pytest.raises(BenchError, match="bad rate list"):
        parse_rates(text)


def test_rate_list_parses():
    assert parse_rates("1, 2.5,inf") == [1.0, 2.5, math.inf]


def test_arrivals_poisson_and_gamma():
    t = arrival_times(10.0, "poisson", seed=1, num=4000)
    gaps = [b - a for a, b in zip(t, t[1:])]
    assert t[0] == 0.0 and all(g >= 0 for g in gaps)
    assert statistics.mean(gaps) == pytest.approx(0.1, rel=0.06)
    cv_poisson = statistics.pstdev(gaps) / statistics.mean(gaps)
    bursty = arrival_times(10.0, "gamma", burstiness=0.25, seed=1, num=4000)
    gaps_b = [b - a for a, b in zip(bursty, bursty[1:])]
    assert statistics.mean(gaps_b) == pytest.approx(0.1, rel=0.15)
    cv_bursty = statistics.pstdev(gaps_b) / statistics.mean(gaps_b)
    assert cv_poisson == pytest.approx(1.0, abs=0.08) and cv_bursty == pytest.approx(2.0, abs=0.3)
    assert arrival_times(10.0, seed=1, num=50) == t[:50]
    d = arrival_times(20.0, duration_s=3.0, seed=2)
    assert all(x < 3.0 for x in d) and 45 <= len(d) <= 75
    assert arrival_times(math.inf, num=5) == [0.0] * 5
    with pytest.raises(BenchError, match="infinite"):
        arrival_times(math.inf, duration_s=1.0)
    with pytest.raises(BenchError, match="burstiness"):
        arrival_times(1.0, "gamma", burstiness=0.0, num=2)
    with pytest.raises(BenchError, match="arrival"):
        arrival_times(1.0, "uniform", num=2)


def test_goodput_search_sequence():
    # Exponential growth while passing, then bisection between passing and failing rates.
    assert next_probe_rate(1.0, None, 0.1, 100.0, 0.1) == 2.0
    assert next_probe_rate(64.0, None, 0.1, 100.0, 0.1) == 100.0
    assert next_probe_rate(100.0, None, 0.1, 100.0, 0.1) is None
    assert next_probe_rate(None, 1.0, 0.1, 100.0, 0.1) == 0.5
    assert next_probe_rate(None, 0.1, 0.1, 100.0, 0.1) is None
    assert next_probe_rate(4.0, 8.0, 0.1, 100.0, 0.1) == 6.0
    assert next_probe_rate(4.0, 4.3, 0.1, 100.0, 0.1) is None


def test_find_goodput_against_stub():
    with StubServer() as stub:
        gp = find_goodput(stub.url, "fixed:20:4", slo_ttft_ms=60_000, slo_tpot_ms=60_000, start_rate=100.0,
                          max_rate=400.0, num_requests=6, progress=False)
        with pytest.raises(BenchError, match="min_rate"):
            find_goodput(stub.url, "chat", slo_ttft_ms=1.0, slo_tpot_ms=None, start_rate=10.0, max_rate=5.0,
                         num_requests=2, progress=False)
    assert [p.rate for p in gp.probes] == [100.0, 200.0, 400.0]
    assert gp.rate == 400.0 and gp.best is gp.probes[-1]


def test_multi_turn_stops_a_conversation_after_a_failed_turn():
    with StubServer(StubConfig(fail_every=2)) as stub:
        (res,) = _run(stub, "multi-turn:min_turns=3,max_turns=3,out_len=2", num_requests=1, max_concurrency=1,
                      warmup=False)
    recs = sorted(res.records, key=lambda r: r.turn)
    assert [r.success for r in recs] == [True, False, False]
    assert recs[1].status == 429 and recs[2].status == 0 and recs[2].error.startswith("skipped")
    assert res.summary["failed"] == 2 and res.summary["failed_429"] == 1 and stub.state.count == 2
