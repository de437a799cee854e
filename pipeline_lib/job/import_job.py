"""The import job of an existing checkpoint under a watchdog, as a matrix job's ranks run under
one (pipeline_lib.job.launcher.Watchdog). Torch-free.

The checkpoint folder is untrusted input, and so is what a user's naming or model does with it:
a read can block (a FIFO among the files), or a naming can loop. So the job
(``python -m pipeline_lib import-checkpoint --grid … --name …``, ``run``) does not read: it runs
the import (``pipeline_lib.job.existing.import_checkpoint``) in a child process
(``import-checkpoint --spec … --progress …``), which writes progress marks (``Marks``). A child
without a mark for ``run.cell_timeout_s`` (``run.startup_timeout_s`` before its first one,
which it writes once its imports are done) is killed, and the job writes the import's record
itself: ``timeout`` (``no progress for 300 s during reading the entries; import killed``),
``crash`` for a child killed by a signal, ``error`` for one that exited with an error. A
record is written either way; the job exits 0.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipeline_lib.common import timestamps
from pipeline_lib.common.atomic import read_json, write_json
from pipeline_lib.common.errors import printable
from pipeline_lib.plan.specs import ExistingSpec
from pipeline_lib.verify.results import ImportRecord

# A child's marks are written at most this often (the same step repeated: reading entries).
MARK_EVERY_S = 0.2


class Marks:
    """The child's progress marks (``step``: what it is doing), in ``path`` (the watchdog
    reads its modification time), at most every MARK_EVERY_S unless the step changes."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        self.step, self.at = "", 0.0

    def __call__(self, step: str) -> None:
        now = time.monotonic()
        if self.path is None or (step == self.step and now - self.at < MARK_EVERY_S):
            return
        self.step, self.at = step, now
        write_json(self.path, {"step": step, "at": time.time()})


def base_record(spec: ExistingSpec, status: str, reason: str = "", **facts) -> ImportRecord:
    """The import record of ``spec`` with ``status``, ``reason`` and ``facts`` (what the import
    found), and what every import record holds, whatever the import's outcome."""
    from pipeline_lib.job.driver import torch_version
    from pipeline_lib.plan.grid import existing_layout

    return ImportRecord(
        status=status,
        reason=reason,
        model=spec.model,
        layout=existing_layout(spec.name),
        checkpoint=spec.path,
        reference=spec.reference,
        config_hash=spec.config_hash,
        created_at=timestamps.now(),
        torch_version=torch_version(),
        source_folder=str(Path(spec.path).resolve()),
        **facts,
    )


def run(
    spec: ExistingSpec, timeout_s: float, startup_timeout_s: float, reuse_units: bool = True
) -> None:
    """The import of ``spec`` in a child process under the watchdog; its record is the child's,
    or when the child did not finish, one that says why. ``reuse_units`` false: the child
    imports even when its inputs did not change (pipeline_lib.job.reuse)."""
    from pipeline_lib.job.launcher import Watchdog, signal_name

    with tempfile.TemporaryDirectory(prefix="dcp-matrix-import-") as work:
        progress = Path(work) / "progress.json"
        command = [sys.executable, "-m", "pipeline_lib", "import-checkpoint", "--spec",
                   json.dumps(spec.to_dict()), "--progress", str(progress)]  # fmt: skip
        if not reuse_units:
            command.append("--no-reuse")
        child = subprocess.Popen(command)
        watchdog = Watchdog(progress, timeout_s, startup_timeout_s)
        watchdog.start()
        try:
            returncode = child.wait()
        finally:
            watchdog.stop()
        step = read_json(progress)["step"] if progress.exists() else ""
    where = f"during {step}" if step else "during start-up"
    if watchdog.fired:
        limit = timeout_s if step else startup_timeout_s
        status, reason = "timeout", f"no progress for {limit:g} s {where}; import killed"
    elif returncode < 0:
        status, reason = "crash", f"import killed by {signal_name(-returncode)} {where}"
    elif returncode > 0:
        status, reason = "error", f"import exited with code {returncode} {where} (see its log)"
    else:
        return  # the child wrote the record
    record = base_record(spec, status, printable(reason))
    write_json(spec.record, record.to_dict())
    print(f"dcp-matrix: import of {spec.name}: {status}: {record.reason}", file=sys.stderr)
