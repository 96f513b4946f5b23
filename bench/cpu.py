"""CPU seconds spent by processes, read from /proc (Linux): the benchmarks' CPU accounting.

A ratio against a baseline says how fast; the CPU seconds say where the time goes and what the
machine allows: work that needs C CPU-seconds cannot finish in less than C / cores of wall time,
however well it overlaps. None where /proc is not there.
"""

from __future__ import annotations

import os
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2:].split()  # fields from the 3rd (state) on; the name may hold spaces


def process_cpu_s(pid: int, *, reaped_children: bool = False) -> float | None:
    """User + system CPU seconds of a process, and of its children it has waited for if asked."""
    f = _stat(pid)
    if f is None:
        return None
    ticks = int(f[11]) + int(f[12]) + ((int(f[13]) + int(f[14])) if reaped_children else 0)
    return ticks / _TICK


def tree_cpu_s(root: int) -> float | None:
    """CPU seconds of a process tree: the root, the children it has reaped, and the live descendants
    (a PostgreSQL postmaster reaps its backends as connections close, so none is lost)."""
    total = process_cpu_s(root, reaped_children=True)
    if total is None:
        return None
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            f = _stat(int(entry.name))
            if f is not None:
                children.setdefault(int(f[1]), []).append(int(entry.name))
    todo = list(children.get(root, ()))
    while todo:
        pid = todo.pop()
        total += process_cpu_s(pid) or 0.0
        todo += children.get(pid, ())
    return total


def spent(before: dict, after: dict) -> dict:
    """CPU seconds per key between two readings (None where either is unknown)."""
    return {k: (None if before[k] is None or after[k] is None else round(after[k] - before[k], 3)) for k in before}
