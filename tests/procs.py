"""The tests' subprocesses: each in a process group of its own, ended whole when it times out.

``subprocess.run(..., timeout=...)`` kills only the process it started: a torchrun agent, the
ranks or a Snakemake job below it live on (reparented to init), and the test itself can wait
forever for the end of an output pipe they hold open. ``run`` takes the same arguments, needs a
timeout, and on any way out before the process ended (its timeout, pytest-timeout's, Ctrl-C)
kills the whole group and every descendant it can still find, then re-raises.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys

import psutil

# No subprocess of a test may take longer than this (the suite runs in about 40 min on CI).
LONGEST_S = 1200


def kill_tree(pid: int) -> list[int]:
    """SIGKILL process ``pid``'s process group (it leads one: ``start_new_session``) and every
    descendant of it, also one that left the group. The pids killed."""
    try:
        tree = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    for process in tree:
        with contextlib.suppress(psutil.Error):
            process.kill()
    return [p.pid for p in tree]


def run(
    args,
    *,
    timeout: float,
    input=None,
    check: bool = False,
    capture_output: bool = False,
    **kwargs,
) -> subprocess.CompletedProcess:
    """``subprocess.run(args, timeout=timeout, ...)`` in a new session; a timeout (or any
    exception while waiting: pytest-timeout's, Ctrl-C) kills the process's whole tree, shows
    the end of its output on stderr, and propagates."""
    assert 0 < timeout <= LONGEST_S, f"timeout {timeout} s: at most {LONGEST_S} s"
    if capture_output:
        kwargs["stdout"] = kwargs["stderr"] = subprocess.PIPE
    if input is not None:
        kwargs["stdin"] = subprocess.PIPE
    with subprocess.Popen(args, start_new_session=True, **kwargs) as proc:
        try:
            stdout, stderr = proc.communicate(input, timeout=timeout)
        except BaseException:
            killed = kill_tree(proc.pid)
            out = ""
            with contextlib.suppress(subprocess.TimeoutExpired, ValueError, OSError):
                out = "\n".join(str(o)[-3000:] for o in proc.communicate(timeout=30) if o)
            print(f"tests.procs: {args!r} did not end within {timeout} s or was interrupted: "
                  f"killed {killed}; its output's end:\n{out}", file=sys.stderr)  # fmt: skip
            raise
    if check and proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, args, stdout, stderr)
    return subprocess.CompletedProcess(args, proc.returncode, stdout, stderr)


def sweep(root: int, keep=lambda process: False) -> list[str]:
    """SIGKILL every process below process ``root`` that is still running (not ``root``, nor
    one ``keep`` accepts): what tests left behind. Each one killed, as ``pid command line``."""
    killed = []
    for process in psutil.Process(root).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if process.status() == psutil.STATUS_ZOMBIE or keep(process):
                continue
            command = " ".join(process.cmdline())[:200]
            process.kill()
            killed.append(f"{process.pid} {command}")
    return killed
