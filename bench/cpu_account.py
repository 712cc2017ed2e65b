"""Where the machine's CPU time went during a window (Linux /proc): this process and its descendants (the servers,
router and client a benchmark started) against everything else on the machine, and the hypervisor's steal.

A served instance's steps can run slower in one window than in the calibration passes around it; this says
whether other work on the machine (or the VM's host) took the cores meanwhile, or the benchmark's own processes.

    a = snapshot(); ...; share(a, snapshot())  ->  {"ours": 0.9, "others": 0.05, "steal": 0.0, "idle": 0.05}
(fractions of all cores' time over the window).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

# /proc/stat's cpu line: user nice system idle iowait irq softirq steal ...
_BUSY, _IDLE, _STEAL = (0, 1, 2, 5, 6), (3, 4), 7


def parse_proc_stat(text: str) -> tuple[int, int, int]:
    """(busy, idle, steal) jiffies of all CPUs from /proc/stat's text."""
    for line in text.splitlines():
        if line.startswith("cpu "):
            v = [int(x) for x in line.split()[1:]]
            v += [0] * (8 - len(v))
            return sum(v[i] for i in _BUSY), sum(v[i] for i in _IDLE), v[_STEAL]
    raise ValueError("no cpu line in /proc/stat")


def parse_pid_stat(text: str) -> tuple[int, int]:
    """(parent pid, utime + stime jiffies) from a /proc/PID/stat line (the command name may hold spaces and ')')."""
    rest = text[text.rindex(")") + 2:].split()
    return int(rest[1]), int(rest[11]) + int(rest[12])


def tree_jiffies(stats: dict[int, tuple[int, int]], root: int) -> int:
    """CPU jiffies of `root` and its descendants, from {pid: (parent pid, jiffies)}."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += stats.get(pid, (0, 0))[1]
        todo += children.get(pid, [])
    return total


def snapshot(root: Optional[int] = None) -> Optional[tuple[int, int, int, int]]:
    """(busy, idle, steal, this tree's) jiffies now; None where /proc is not readable."""
    try:
        busy, idle, steal = parse_proc_stat(Path("/proc/stat").read_text())
    except (OSError, ValueError):
        return None
    stats = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stats[int(d.name)] = parse_pid_stat((d / "stat").read_text())
            except (OSError, ValueError, IndexError):
                continue  # exited meanwhile
    return busy, idle, steal, tree_jiffies(stats, root or os.getpid())


def share(a: Optional[tuple], b: Optional[tuple]) -> Optional[dict[str, float]]:
    """The window between two snapshots as fractions of all cores' time: ours (this tree), others (the rest of
    the busy time), steal, idle. None without both snapshots."""
    if a is None or b is None:
        return None
    busy, idle, steal, ours = (y - x for x, y in zip(a, b))
    total = busy + idle + steal
    if total <= 0:
        return None
    return {"ours": ours / total, "others": max(0, busy - ours) / total, "steal": steal / total, "idle": idle / total}
