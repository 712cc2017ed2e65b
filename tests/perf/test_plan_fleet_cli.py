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
