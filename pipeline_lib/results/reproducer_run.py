"""What a reproducer script runs: ``main`` and what it reaches, copied into the script by
pipeline_lib.results.reproducer (pipeline_lib.results.inline), so that it runs the pipeline's
own code.

``python repro.py`` runs the cell's save job and load job with the pipeline's driver
(pipeline_lib.job.driver: launches, records and the verdict, records.cell_row) and prints the
cell's status and reason; its ranks run pipeline_lib.job.worker. What a script does in place of
the pipeline's own (the seams, pipeline_lib.results.reproducer.SEAMS):

- a rank is ``python repro.py rank SPEC`` (``rank_program``), started by torchrun's agent in
  the script's process (launcher._run_standalone, every rank a fresh process: no fork server);
- the watchdog's kill (after no progress for ``run.cell_timeout_s``, launcher.Watchdog) stops
  every process of the run (``kill_ranks``), found by the mark ``LAUNCH_ENV`` in its
  environment: torchrun starts each rank in a session of its own, so killing a process group
  would leave a hung rank running. When the run ends, whatever is left of it is killed too;
- the frameworks and models are the cell's, by name (``FRAMEWORKS``, ``MODELS``: the script
  fills them), for the registry's look-up by module name;
- no Slurm, no reuse, no disk estimate, no fault (the fault campaign's table is empty).
"""

from __future__ import annotations

import os
import signal
import sys
import uuid
from pathlib import Path
from types import SimpleNamespace

from pipeline_lib.common.atomic import read_json
from pipeline_lib.job import driver, worker
from pipeline_lib.results.reproducer_cell import Cell
from pipeline_lib.verify.results import LoadRecord

# In the environment of the script's run and of every process it starts (kept when set: a
# caller that marks the run can kill what is left of it, kill_run).
LAUNCH_ENV = "DCP_MATRIX_REPRODUCER_RUN"
# The cell's frameworks and models by name: the script fills them.
FRAMEWORKS: dict = {}
MODELS: dict = {}
# The fault campaign's faults (pipeline_lib.verify.faults.FAULTS): a reproducer injects none.
NO_FAULTS: dict = {}
USAGE = "usage: python repro.py [save | load]"


def main(cell: dict, argv: list[str]) -> None:
    """``[]``: the save job, then the load job, then the verdict; ``save`` or ``load``: one of
    them (a cell across torch releases: each in its own environment); ``rank SPEC``: one rank
    of a job (what torchrun starts)."""
    if argv[:1] == ["rank"]:
        worker.main(argv[1:])
    elif argv in ([], ["save"], ["load"]):
        os.environ.setdefault(LAUNCH_ENV, uuid.uuid4().hex)
        try:
            run_cell(Cell.from_dict(cell), argv[0] if argv else "")
        finally:
            kill_ranks()  # a rank its agent left behind
    else:
        sys.exit(USAGE)


def run_cell(cell: Cell, side: str = "") -> None:
    """The cell's jobs as the pipeline runs them (``side``: only that one), then its status
    and reason from the load record."""
    if side in ("", "save"):
        driver.run_save_job(cell.save_job)
    if side in ("", "load"):
        driver.run_load_job(cell.load_job)
        row = LoadRecord.from_dict(read_json(cell.load_job.items[0].record)).cells[0]
        print(f"STATUS: {row['status']}: {row['reason']}", flush=True)
        print(f"(the cell's status in the run: {cell.status}: {cell.reason})", flush=True)


def rank_program() -> list[str]:
    """Stands for launcher.worker_program: a rank runs this script."""
    return [os.path.abspath(sys.argv[0]), "rank"]


def exec_agent(args, target: str = "") -> dict:
    """Stands for launcher._agent: torchrun's agent for the parsed ``args``, every rank a
    fresh process (no fork server: a reproducer's job is one launch)."""
    from torch.distributed.run import run

    run(args)
    return {}


def kill_ranks() -> None:
    """Stands for launcher.kill_children: SIGKILL every process of this run but this one."""
    if mark := os.environ.get(LAUNCH_ENV):
        kill_run(mark)


def kill_run(mark: str) -> list[int]:
    """SIGKILL every process (not this one) whose environment holds ``LAUNCH_ENV=mark``
    (Linux: read from /proc); the ids it killed."""
    needle = f"{LAUNCH_ENV}={mark}".encode()
    killed = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = Path(entry.path, "environ").read_bytes()
        except OSError:  # gone, or not this user's
            continue
        if needle in environ.split(b"\0"):
            try:
                os.kill(int(entry.name), signal.SIGKILL)
                killed.append(int(entry.name))
            except ProcessLookupError:
                pass
    return killed


def no_allocation(environ: dict | None = None) -> None:
    """Stands for launcher.slurm_allocation: a reproducer runs on this machine only."""
    return None


class NoReuse:
    """Stands for reuse.Store: a reproducer runs every unit (its jobs have no reuse folder)."""

    @classmethod
    def of(cls, spec, read: bool = True) -> None:
        return None


def room_error(spec, folder) -> None:
    """Stands for disk.room_error: a reproducer's jobs are one cell's; no estimate."""
    return None


def framework(name: str):
    """Stands for frameworks.get: one of the cell's frameworks."""
    return FRAMEWORKS[name]


def framework_names() -> list[str]:
    """Stands for frameworks.names: the cell's frameworks."""
    return sorted(FRAMEWORKS)


def model(name: str, model_kwargs: dict | None = None):
    """Stands for models.get: the cell's model (what its module's ``build`` builds)."""
    return MODELS[name]


def model_module(build) -> SimpleNamespace:
    """A built-in model as models.get gives it: its module, of which the jobs call ``build``."""
    return SimpleNamespace(build=build)
