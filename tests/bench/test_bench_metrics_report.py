"""Goodput / attainment math on synthetic records, the results file, table, plots and the CLI."""
from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from stub_server import StubConfig, StubServer  # noqa: E402

from tokenmill.bench.cli import add_bench_args, main
from tokenmill.bench.metrics import apply_slo, latency_stats, summarize
from tokenmill.bench.report import build_results, format_table, plot_results, write_results
from tokenmill.bench.serve import RateResult
from tokenmill.bench.types import RequestRecord


def _rec(i: int, ttft: float, e2e: float, n: int, ok: bool = True, **kw) -> RequestRecord:
    return RequestRecord(conv_id=i, turn=0, prompt_len=10, max_tokens=n, ttft_s=ttft if ok else None,
                         e2e_s=e2e if ok else None, output_tokens=n if ok else 0, success=ok,
                         status=200 if ok else 429, error="" if ok else "HTTP 429: busy",
                         itl_s=[(e2e - ttft) / (n - 1)] * (n - 1) if ok and n > 1 else [], **kw)


def test_goodput_math_on_synthetic_records():
    recs = [
        _rec(0, 0.100, 1.090, 100),  # TTFT 100 ms, TPOT 10 ms: meets both
        _rec(1, 0.300, 1.290, 100),  # TTFT 300 ms: misses TTFT
        _rec(2, 0.100, 2.080, 100),  # TPOT 20 ms: misses TPOT
        _rec(3, 0.050, 0.050, 1),  # one token: no TPOT, meets
        _rec(4, 0.0, 0.0, 0, ok=False),  # failed: counts against attainment
        _rec(5, 0.300, 1.290, 100, slo_ttft_ms=500.0),  # own looser TTFT target: meets
        _rec(6, 0.100, 1.090, 100, slo_tpot_ms=5.0),  # own tighter TPOT target: misses
    ]
    apply_slo(recs, slo_ttft_ms=200.0, slo_tpot_ms=15.0)
    assert recs[0].tpot_s == pytest.approx(0.010) and recs[3].tpot_s is None
    assert [r.meets_slo() for r in recs] == [True, False, False, True, False, True, False]
    s = summarize(recs, duration_s=2.0)
    assert s["num_requests"] == 7 and s["completed"] == 6 and s["failed"] == 1 and s["failed_429"] == 1
    assert s["good_requests"] == 3
    assert s["slo_attainment"] == pytest.approx(3 / 7)
    assert s["goodput"] == pytest.approx(1.5)
    assert s["request_throughput"] == pytest.approx(3.0)
    assert s["total_output_tokens"] == 501 and s["output_throughput"] == pytest.approx(250.5)
    assert s["ttft_ms"]["n"] == 6 and s["ttft_ms"]["p50"] == pytest.approx(100.0)
    assert s["tpot_ms"]["n"] == 5 and s["tpot_ms"]["max"] == pytest.approx(20.0)


def test_no_targets_means_all_successes_are_good():
    recs = [_rec(0, 0.5, 1.0, 3), _rec(1, 0, 0, 0, ok=False)]
    s = summarize(recs, 1.0)
    assert s["slo_attainment"] == 0.5 and s["goodput"] == 1.0


def test_latency_stats_percentiles():
    st = latency_stats([i / 1000 for i in range(1, 101)])  # 1..100 ms
    assert st["mean"] == pytest.approx(50.5) and st["p50"] == pytest.approx(50.5)
    assert st["p90"] == pytest.approx(90.1) and st["p99"] == pytest.approx(99.01) and st["max"] == pytest.approx(100)
    assert latency_stats([])["p50"] is None


def test_results_table_and_plot(tmp_path):
    recs = [_rec(i, 0.01 * (i + 1), 0.5 + 0.01 * i, 20) for i in range(10)] + [_rec(10, 0, 0, 0, ok=False)]
    apply_slo(recs, 50.0, 30.0)
    results = [RateResult(rate=r, summary=summarize(recs, 2.0), records=recs) for r in (1.0, float("inf"))]
    doc = build_results({"workload": "x"}, results)
    path = tmp_path / "sub" / "r.json"
    write_results(str(path), doc)
    loaded = json.loads(path.read_text())
    assert [r["rate"] for r in loaded["results"]] == ["1", "inf"]
    assert len(loaded["results"][0]["requests"]) == 11 and "text" not in loaded["results"][0]["requests"][0]
    assert loaded["results"][0]["summary"]["good_requests"] == 5
    table = format_table(results)
    lines = table.splitlines()
    assert len(lines) == 4 and lines[0].split()[0] == "rate" and lines[3].split()[:3] == ["inf", "10", "1"]
    assert "45.5%" in table  # 5 of 11
    png = tmp_path / "p.png"
    plot_results(results, str(png), slo_ttft_ms=50.0, slo_tpot_ms=30.0)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_end_to_end(tmp_path, capsys):
    out, png = tmp_path / "res.json", tmp_path / "res.png"
    with StubServer(StubConfig(fail_every=7)) as stub:
        rc = main(["serve", "--base-url", stub.url + "/v1", "--workload", "fixed:30:5", "--rate", "200,inf",
                   "--num-requests", "12", "--slo-ttft", "60000", "--slo-tpot", "60000", "--out", str(out),
                   "--plot", str(png), "--no-progress", "--seed", "7"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "TTFT p50" in printed and "HTTP 429" in printed
    doc = json.loads(out.read_text())
    assert doc["config"]["workload"] == "fixed:30:5" and doc["config"]["seed"] == 7
    assert doc["config"]["workload_info"]["params"] == {"in": 30, "out": 5}
    assert [r["rate"] for r in doc["results"]] == ["200", "inf"]
    total = sum(r["summary"]["num_requests"] for r in doc["results"])
    failed = sum(r["summary"]["failed_429"] for r in doc["results"])
    assert total == 24 and failed == 3  # stub requests 7, 14, 21 of 25 (1 warm-up)
    assert png.stat().st_size > 1000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("argv, fragment", [
    (["--workload", "sharegpt"], "unknown workload"),
    (["--rate", "1,x"], "bad rate list"),
    (["--rate", "-2"], "bad rate list"),
    ([], "cannot reach server"),
    (["--find-goodput"], "needs --slo-ttft"),
    (["--burstiness", "0", "--arrival", "gamma"], "burstiness"),
    (["--num-requests", "0"], "number of requests"),
])
def test_cli_bad_input_is_one_line(argv, fragment, capsys):
    rc = main(["serve", "--base-url", f"http://127.0.0.1:{_free_port()}", "--no-progress", *argv])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and fragment in err and "Traceback" not in err


def test_subcommands_and_hook():
    import argparse

    parser = argparse.ArgumentParser(prog="tokenmill")
    sub = parser.add_subparsers(dest="command")
    add_bench_args(sub)
    args = parser.parse_args(["bench", "serve", "--base-url", "http://x:1", "--rate", "2"])
    assert args.command == "bench" and args.bench_command == "serve" and args.rate == "2"
    assert args.func.__name__ == "main_bench"
    for name in ("throughput", "latency"):
        assert parser.parse_args(["bench", name]).bench_command == name
        # a user mistake is one line and exit code 2, before any model loads
        assert main([name, "--model", "/no/such/model"]) == 2
