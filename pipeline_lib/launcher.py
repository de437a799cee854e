"""Start a job's ranks with torchrun and watch them: a hang becomes ``timeout``, a death by
signal becomes ``crash`` with the signal and rank named, any other failure becomes ``error``.

The job's own process is the torchrun agent (``torch.distributed.run.run``, in process): one
Python start-up and torch import less per job than a ``torchrun`` subprocess, and failures come
back as structured ``ChildFailedError`` records instead of log text. On a workstation the
rendezvous is ``--standalone`` (a free port per job, so jobs run side by side).
"""

from __future__ import annotations

import contextlib
import re
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from pipeline_lib.atomic import read_json

POLL_S = 0.1
_EXCEPTION = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Interrupt)\b.*)$")


@dataclass
class Outcome:
    status: str  # ok, error, crash or timeout
    reason: str
    step: str  # the worker's last progress mark ("" before the first)


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def last_exception(text: str) -> str:
    found = [m.group(1) for line in text.splitlines() if (m := _EXCEPTION.match(line.strip()))]
    return found[-1][:300] if found else "no exception message (see the job log)"


def describe_failure(failures: dict) -> tuple[str, str, str]:
    """(status, cause, detail) from torchrun's per-rank failures. Ranks that the agent itself
    stopped with SIGTERM after the first failure are not the cause, so they come last."""

    def order(item):
        rank, failure = item
        return (failure.exitcode == -signal.SIGTERM, failure.timestamp, rank)

    rank, failure = min(failures.items(), key=order)
    if failure.exitcode < 0:
        return "crash", f"rank {rank} killed by {signal_name(-failure.exitcode)}", ""
    message = failure.message
    if isinstance(message, dict):
        message = message.get("message", "")
    return "error", f"rank {rank} exited with code {failure.exitcode}", last_exception(str(message))


class Watchdog(threading.Thread):
    """Kill every child process when the progress file has not changed for ``timeout_s``."""

    def __init__(self, progress: Path, timeout_s: float):
        super().__init__(daemon=True)
        self.progress, self.timeout_s = progress, timeout_s
        self.fired = False
        self._done = threading.Event()

    def run(self) -> None:
        last_change, last_mtime = time.monotonic(), None
        while not self._done.wait(POLL_S):
            mtime = self.progress.stat().st_mtime_ns if self.progress.exists() else None
            if mtime != last_mtime:
                last_change, last_mtime = time.monotonic(), mtime
            elif time.monotonic() - last_change > self.timeout_s:
                self.fired = True
                for child in psutil.Process().children(recursive=True):
                    with contextlib.suppress(psutil.NoSuchProcess):
                        child.send_signal(signal.SIGKILL)
                last_change = time.monotonic()

    def stop(self) -> None:
        self._done.set()
        self.join()


def launch(world_size: int, worker_args: list[str], work_dir: Path, timeout_s: float) -> Outcome:
    """Run ``python -m pipeline_lib.worker ARGS`` on ``world_size`` ranks under torchrun."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    progress = work_dir / "progress.json"
    progress.unlink(missing_ok=True)
    args = get_args_parser().parse_args(
        [
            "--standalone",
            f"--nproc-per-node={world_size}",
            "-m",
            "pipeline_lib.worker",
            *worker_args,
        ]
    )
    watchdog = Watchdog(progress, timeout_s)
    watchdog.start()
    try:
        run(args)
        status, cause, detail = "ok", "", ""
    except ChildFailedError as exc:
        status, cause, detail = describe_failure(exc.failures)
    finally:
        watchdog.stop()
    step = read_json(progress)["step"] if progress.exists() else ""
    where = f"during {step}" if step else "during start-up"
    if watchdog.fired:
        return Outcome("timeout", f"no progress for {timeout_s:g} s {where}; job killed", step)
    if status == "ok":
        return Outcome(status, "", step)
    return Outcome(status, f"{cause} {where}" + (f": {detail}" if detail else ""), step)
