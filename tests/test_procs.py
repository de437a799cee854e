"""The tests' subprocess helper (tests/procs.py): a timeout ends the whole process tree."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil
import pytest

from tests import procs

# Sleeps forever, with a child in its process group and one that left it (a new session, as a
# daemon or a Slurm step does), both holding its output pipes; writes the three pids first.
SLEEPER = """
import os, subprocess, sys, time
sleep = [sys.executable, "-c", "import time; time.sleep(600)"]
child = subprocess.Popen(sleep)
escaped = subprocess.Popen(sleep, start_new_session=True)
with open(sys.argv[1], "w") as f:
    f.write(f"{os.getpid()} {child.pid} {escaped.pid}")
time.sleep(600)
"""


def _gone(pids: list[int], within_s: float = 30) -> list[int]:
    """The pids still running (not zombies) after ``within_s``."""
    deadline = time.monotonic() + within_s
    while True:
        alive = []
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


def _pids(path) -> list[int]:
    deadline = time.monotonic() + 60
    while not (path.exists() and len(path.read_text().split()) == 3):
        assert time.monotonic() < deadline, "the sleeper did not start"
        time.sleep(0.1)
    return [int(pid) for pid in path.read_text().split()]


def test_a_subprocess_past_its_timeout_is_killed_with_all_its_descendants(tmp_path):
    """subprocess.run would kill the sleeper alone, then wait forever for the end of the
    output its children hold open; procs.run returns on time and leaves nothing running."""
    pids = tmp_path / "pids"
    started = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        procs.run([sys.executable, "-c", SLEEPER, str(pids)], timeout=5, capture_output=True)
    assert time.monotonic() - started < 60
    assert _gone(_pids(pids)) == []


def test_the_session_end_sweep_kills_what_a_test_left_below_a_process(tmp_path):
    pids = tmp_path / "pids"
    root = subprocess.Popen([sys.executable, "-c", SLEEPER, str(pids)], start_new_session=True)
    try:
        _, child, escaped = _pids(pids)
        killed = procs.sweep(root.pid)
        assert sorted(int(line.split()[0]) for line in killed) == sorted([child, escaped])
        assert _gone([child, escaped]) == [] and root.poll() is None
    finally:
        procs.kill_tree(root.pid)
        root.wait()


def test_a_subprocess_timeout_must_be_under_the_longest():
    with pytest.raises(AssertionError, match="at most 1200 s"):
        procs.run(["true"], timeout=3600)
