"""bench/fleet_validate.py's calibration-pass rate: given, the highest measured rate, or matched to the measured
requests' prompt tokens per second (no servers: the workload's requests only)."""
from __future__ import annotations

import statistics
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from fleet_validate import calibration_rate  # noqa: E402

from tokenmill.errors import ConfigError  # noqa: E402
from tokenmill.perf.cli import CHAT_TEMPLATE_TOKENS  # noqa: E402
from tokenmill.perf.simulator import requests_from_workload  # noqa: E402


def args(rate):
    return SimpleNamespace(served_calibration_rate=rate, workload="chat", num_requests=40,
                           served_calibration_requests=60, served_calibration_seed=1)


def test_default_given_and_matched_rates():
    assert calibration_rate(args(None), [1.0, 2.0], None) == 2.0
    assert calibration_rate(args("2.5"), [1.0, 2.0], None) == 2.5
    mean = lambda n, seed: statistics.fmean(r.prompt_len for r in requests_from_workload(
        "chat", n, 2.0, seed, chat_overhead=CHAT_TEMPLATE_TOKENS))
    matched = calibration_rate(args("match"), [1.0, 2.0], None)
    assert matched == pytest.approx(2.0 * mean(40, 0) / mean(60, 1))
    assert matched != 2.0


@pytest.mark.parametrize("bad", ["fast", "0", "-1"])
def test_bad_rate_is_a_clear_error(bad):
    with pytest.raises(ConfigError, match="served-calibration-rate"):
        calibration_rate(args(bad), [1.0, 2.0], None)
