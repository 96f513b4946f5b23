"""The benchmarks' CPU accounting (bench/cpu.py) reads what processes spent from /proc."""

from __future__ import annotations

import os
import sys
import time

import pytest

from bench.cpu import process_cpu_s, tree_cpu_s

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def _burn(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_a_process_cpu_time_grows_with_the_work_it_does():
    before = process_cpu_s(os.getpid())
    _burn(0.2)
    assert 0.15 <= process_cpu_s(os.getpid()) - before < 1.0


def test_a_tree_counts_live_children_and_the_ones_it_has_reaped():
    before, own_before = tree_cpu_s(os.getpid()), process_cpu_s(os.getpid())
    pid = os.fork()
    if pid == 0:  # the child burns CPU, then exits
        _burn(0.3)
        os._exit(0)
    os.waitpid(pid, 0)  # reaped: its time is now the parent's children's time
    assert tree_cpu_s(os.getpid()) - before >= 0.25
    assert process_cpu_s(os.getpid()) - own_before < 0.25  # the parent itself only waited

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # this child burns CPU, then stays alive until told to go
        os.close(write)
        _burn(0.3)
        os.read(read, 1)
        os._exit(0)
    os.close(read)
    try:
        deadline = time.monotonic() + 10
        while (process_cpu_s(pid) or 0) < 0.25 and time.monotonic() < deadline:
            time.sleep(0.05)
        live = tree_cpu_s(os.getpid()) - before  # the child is alive: counted as a live descendant
        assert live >= 0.25 + 0.25
    finally:
        os.write(write, b"x")
        os.waitpid(pid, 0)


def test_a_missing_process_has_no_cpu_time():
    assert process_cpu_s(2**22 + 12345) is None and tree_cpu_s(2**22 + 12345) is None
