"""bench/cpu_account.py: /proc parsing and the window's shares (pure functions; one live snapshot)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from cpu_account import parse_pid_stat, parse_proc_stat, share, snapshot, tree_jiffies  # noqa: E402


def test_proc_stat_and_pid_stat_lines():
    assert parse_proc_stat("cpu  100 10 50 800 20 5 5 7 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n") == (170, 820, 7)
    with pytest.raises(ValueError):
        parse_proc_stat("intr 1 2\n")
    line = "4242 (python (x) y) S 4200 4242 4200 0 -1 4194304 100 0 0 0 31 9 0 0 20 0 3 0 5000 1 1\n"
    assert parse_pid_stat(line) == (4200, 40)


def test_tree_and_shares():
    stats = {1: (0, 1000), 10: (1, 50), 11: (10, 30), 12: (10, 20), 20: (1, 500)}
    assert tree_jiffies(stats, 10) == 100 and tree_jiffies(stats, 99) == 0
    a, b = (1000, 1000, 0, 100), (1150, 1040, 10, 220)  # 200 jiffies: 150 busy (120 ours), 40 idle, 10 steal
    assert share(a, b) == pytest.approx({"ours": 0.6, "others": 0.15, "steal": 0.05, "idle": 0.2})
    assert share(None, b) is None and share(a, a) is None
    live = snapshot()
    assert live is None or (len(live) == 4 and live[3] >= 0)
