"""`tokenmill plan --instances N`: fleet splits with a saved calibration (no weights loaded), and its errors."""
from __future__ import annotations

import json

from tests.perf.test_plan_cli import calibration, parse  # noqa: F401 - the fixture


def test_fleet_plan_at_a_rate(calibration, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "plan.json"
    args = parse(["--calibration", calibration, "--workload", "long-prefill", "--slo-ttft", "3000",
                  "--slo-tpot", "80", "--rate", "1", "--num-requests", "20", "--instances", "3",
                  "--transfer-ms-per-block", "0.5", "--out", str(out)])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "fleet of 3 instances" in text and "0.500 ms per block" in text
    for label in ("colocated x3", "1P + 2D", "2P + 1D"):
        assert label in text
    plan = json.loads(out.read_text())["fleet"]
    assert [r["prefill_instances"] for r in plan["splits"]] == [0, 1, 2]
    assert plan["best"] in {"colocated x3", "1P + 2D", "2P + 1D"}


def test_fleet_plan_errors(calibration, capsys):  # noqa: F811
    for argv, msg in ((["--instances", "0"], "--instances must be at least 1"),
                      (["--prefill-instances", "1"], "--prefill-instances needs --instances > 1"),
                      (["--instances", "2", "--prefill-instances", "2", "--rate", "1"], "--prefill-instances must be"),
                      (["--instances", "2"], "needs --slo-ttft")):
        args = parse(["--calibration", calibration, "--num-requests", "5", *argv])
        assert args.func(args) == 2
        assert msg in capsys.readouterr().err, argv


def test_fleet_plan_per_type(calibration, capsys):  # noqa: F811
    args = parse(["--calibration", calibration, "--workload", "fixed:200:8", "--slo-ttft", "3000", "--slo-tpot", "100",
                  "--num-requests", "12", "--instances", "3", "--fleet-method", "per-type"])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "one instance alone: colocated" in text and "2P + 1D" in text and "best:" in text


def test_fleet_plan_served_path_latencies(calibration, tmp_path, capsys):  # noqa: F811
    """The served path's fixed latencies (what bench/fleet_validate.py fits from step traces) reach the simulated
    fleet: a disaggregated split's TTFT grows by about what they add, and they are recorded in --out."""
    def plan(*extra: str) -> dict:
        out = tmp_path / "plan.json"
        args = parse(["--calibration", calibration, "--workload", "fixed:200:8", "--slo-ttft", "3000",
                      "--slo-tpot", "100", "--rate", "0.5", "--num-requests", "12", "--instances", "2",
                      "--prefill-instances", "1", "--out", str(out), *extra])
        assert args.func(args) == 0
        return json.loads(out.read_text())["fleet"]

    base = plan()
    slow = plan("--ingress-ms", "40", "--return-ms", "60", "--hop-ms-per-request", "5", "--step-gap-ms", "1",
                "--decode-step-gap-ms", "1")
    assert slow["ingress_s"] == 0.04 and slow["return_s"] == 0.06 and base["return_s"] == 0.0
    added = slow["splits"][0]["ttft_ms"]["p50"] - base["splits"][0]["ttft_ms"]["p50"]
    assert 90 <= added <= 200, added  # 40 + 60 ms of fixed latency, a step boundary or a gap more at most
    args = parse(["--calibration", calibration, "--num-requests", "5", "--instances", "2", "--rate", "1",
                  "--return-ms", "-1"])
    assert args.func(args) == 2 and "--return-ms must be >= 0" in capsys.readouterr().err
