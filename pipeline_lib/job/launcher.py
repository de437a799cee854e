"""Start a job's ranks with torchrun and watch them: a hang becomes ``timeout``, a death by
signal becomes ``crash`` with the signal and rank named, any other failure becomes ``error``.

Two launchers, one outcome (:class:`Outcome`, classified by :func:`describe_failure`):

- **standalone** (a workstation, and a Slurm job on one node): the job's own process is the
  torchrun agent (``torch.distributed.run.run``, in process): one Python start-up and torch
  import less per job than a ``torchrun`` subprocess, and failures come back as structured
  ``ChildFailedError`` records instead of log text. The rendezvous is ``--standalone`` (a free
  port per job, so jobs run side by side).
- **srun** (a Slurm job on several nodes): ``srun --ntasks-per-node=1`` starts one torchrun
  agent per node (``python -m pipeline_lib.job.launcher node-agent``, the same in-process agent)
  with a c10d rendezvous on the allocation's first node, at a port derived from the job id.
  Each agent writes its ``ChildFailedError`` records to ``work_dir/agents-N/``; the launching
  process reads them back, so a crash still names its rank and signal.

``DCP_MATRIX_LAUNCHER`` (``auto``, ``standalone`` or ``srun``) overrides the choice; ``auto``
(the default) takes ``srun`` only inside a Slurm allocation of more than one node.

How an agent starts its ranks (``DCP_MATRIX_RANK_START``):

- ``forkserver`` (the default): torchrun's ``--start-method forkserver`` for a function
  entrypoint. The job starts Python's fork server when it starts (:func:`start_rank_server`;
  a node agent, at its first launch): a single-threaded process that imports torch, DCP and
  the worker once (``PRELOAD``); every rank of every launch of the job is then
  forked from it, in a fraction of a second instead of a Python start-up and a torch import
  each (about 2.5 s of CPU per rank). The server holds no lock of another thread when it forks
  (a rank forked from the agent itself, which runs TCPStore threads, hung in glibc's resolver
  lock: docs/benchmarks.md). The server keeps the environment it started with, so each rank
  takes the job's environment at launch time (:func:`_served_rank`).
- ``exec``: every rank a fresh ``python -m pipeline_lib.job.worker``, as a plain ``torchrun``
  starts it.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import psutil

from pipeline_lib.common.atomic import read_json, write_json
from pipeline_lib.common.json_form import checked_keys

POLL_S = 0.1
_EXCEPTION = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Interrupt)\b.*)$")
LAUNCHER_ENV = "DCP_MATRIX_LAUNCHER"
RANK_START_ENV = "DCP_MATRIX_RANK_START"
RANK_STARTS = ("forkserver", "exec")
SERVED_ENV = "DCP_MATRIX_SERVED_RANK"  # set in a rank forked by the fork server only
# A served rank that raises waits this long before it exits (_served_rank): 10 x torchrun's
# default monitor interval.
SERVED_ERROR_GRACE_S = 1.0
# This process's environment when this module was imported: in the fork server, the
# environment it started with (the ranks it forks inherit it, plus torchrun's variables).
_IMPORT_ENV, _IMPORT_PID = dict(os.environ), os.getpid()
# Rendezvous ports of the srun launcher: below Linux's ephemeral range (32768-60999). Jobs
# whose ids differ by less than RDZV_SLOTS never share a port; each job has RDZV_PER_JOB ports
# for its successive launches (a load job launches again after a crash).
RDZV_BASE, RDZV_SLOTS, RDZV_PER_JOB = 20000, 2500, 4
# After the watchdog's SIGTERM, srun and its agents get this long to stop the ranks.
SRUN_GRACE_S = 15.0
# Each rank marks the end of its part of a launch in work_dir/ENDED_DIR (mark_ended): its
# results written, before it destroys its process group and exits. A launch whose ranks have
# all ended (or one with an error) and that has not finished EXIT_GRACE_S later is killed and
# counts as ended, its results kept: a rank can hang at exit inside torch
# (docs/torch-notes.md). A rank exits within a second or two of its mark, also on a loaded
# machine.
ENDED_DIR = "ended"
EXIT_GRACE_S = 20.0
# A rank that raises inside a load cell writes it down in work_dir/RAISED_DIR (mark_raised)
# and goes on with the job's next cell. Raised on some ranks only (the others were in a
# collective, or went on into one, that the raising rank never joins), the launch stops
# progressing: once the unit in progress has such a mark and EXIT_GRACE_S without progress,
# the watchdog stops the launch, and the unit is ``error`` with the raising rank's reason (not
# a timeout). A unit whose result says otherwise is ``error`` all the same (driver.run_units).
RAISED_DIR = "raised"
_LAUNCHES = itertools.count(1)


@dataclass
class Outcome:
    status: str  # ok, error, crash or timeout
    reason: str
    step: str  # the worker's last progress mark ("" before the first)
    unit: str = ""  # the save item or load cell of that mark


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
    stopped with SIGTERM after the first failure are not the cause, so they come last. Within
    one second, a rank killed by another signal comes before ranks that exited with an error:
    torchrun's timestamps are whole seconds, and a peer that died makes the others raise
    ("Connection closed by peer") within the same second."""

    def order(item):
        rank, failure = item
        return (failure.exitcode == -signal.SIGTERM, failure.timestamp, failure.exitcode > 0, rank)

    rank, failure = min(failures.items(), key=order)
    if failure.exitcode < 0:
        return "crash", f"rank {rank} killed by {signal_name(-failure.exitcode)}", ""
    message = failure.message
    if isinstance(message, dict):
        message = message.get("message", "")
    return "error", f"rank {rank} exited with code {failure.exitcode}", last_exception(str(message))


# The helpers multiprocessing starts for a fork server, by their command lines: the server, and
# the resource tracker beside it.
_FORK_SERVER = "from multiprocessing.forkserver import main"
_HELPERS = (_FORK_SERVER, "from multiprocessing.resource_tracker import main")


def is_fork_server(process: psutil.Process) -> bool:
    """Whether ``process`` runs a ``multiprocessing`` fork server's code (by its command line:
    a rank it forked has the same one)."""
    with contextlib.suppress(psutil.Error):
        return _FORK_SERVER in " ".join(process.cmdline())
    return False


def is_helper(process: psutil.Process, parent: int) -> bool:
    """Whether ``process`` is the fork server or the resource tracker of the process ``parent``:
    one of its direct children with a helper's command line. A rank the server forked has the
    server's command line too, but the server as its parent: it is not a helper."""
    with contextlib.suppress(psutil.Error):
        if process.ppid() == parent:
            return any(helper in " ".join(process.cmdline()) for helper in _HELPERS)
    return False


def kill_children() -> None:
    """SIGKILL every descendant of this process (the ranks, or srun and its agents) but the
    fork server and its resource tracker: the server serves the job's next launch (killed, it
    would be started again, its imports paid again) and reports how its ranks died."""
    me = os.getpid()
    for child in psutil.Process(me).children(recursive=True):
        if not is_helper(child, me):
            with contextlib.suppress(psutil.NoSuchProcess):
                child.send_signal(signal.SIGKILL)


@dataclass(frozen=True)
class EndMark:
    """A rank's end of its part of a launch (``work_dir/ENDED_DIR/rank-<rank>.json``): ok, or
    error and why; the rank's process and when (time.time)."""

    status: str
    reason: str
    pid: int
    at: float

    @classmethod
    def from_dict(cls, data: dict) -> EndMark:
        return cls(**checked_keys(cls, data, every=True))


def mark_ended(work_dir: str | Path, rank: int, status: str, reason: str = "") -> None:
    """Rank ``rank``'s part of the launch is over (``status`` ok, or error and why): every
    result it writes is written. Read by the launcher's watchdog (:class:`ExitWatch`)."""
    mark = EndMark(status, reason, os.getpid(), time.time())
    write_json(Path(work_dir) / ENDED_DIR / f"rank-{rank}.json", asdict(mark))


def read_ends(work_dir: str | Path) -> dict[int, EndMark]:
    """The end marks of the ranks of the current launch: {rank: mark}."""
    ends = {}
    for path in (Path(work_dir) / ENDED_DIR).glob("rank-*.json"):
        with contextlib.suppress(OSError, ValueError):  # a mark being replaced: next poll
            ends[int(path.stem.removeprefix("rank-"))] = EndMark.from_dict(read_json(path))
    return ends


@dataclass(frozen=True)
class RaisedMark:
    """A rank's exception inside a unit (``work_dir/RAISED_DIR``): which rank, which unit, the
    step it was in (``cell <id>``) and the exception as one line."""

    rank: int
    unit: str
    step: str
    reason: str

    @classmethod
    def from_dict(cls, data: dict) -> RaisedMark:
        return cls(**checked_keys(cls, data, every=True))

    def describe(self) -> str:
        return f"rank {self.rank} raised during {self.step}: {self.reason}"


def mark_raised(work_dir: str | Path, rank: int, unit: str, step: str, reason: str) -> None:
    """Rank ``rank`` raised inside ``unit`` (during ``step``) and goes on: see RAISED_DIR."""
    digest = hashlib.sha256(unit.encode()).hexdigest()[:16]
    mark = RaisedMark(rank, unit, step, reason)
    write_json(Path(work_dir) / RAISED_DIR / f"rank-{rank}-{digest}.json", asdict(mark))


def read_raised(work_dir: str | Path) -> dict[str, RaisedMark]:
    """The units in which a rank of the current launch raised: {unit: the lowest rank's mark}."""
    marks = []
    for path in (Path(work_dir) / RAISED_DIR).glob("rank-*.json"):
        with contextlib.suppress(OSError, ValueError, TypeError):  # being written: next read
            marks.append(RaisedMark.from_dict(read_json(path)))
    raised: dict[str, RaisedMark] = {}
    for mark in sorted(marks, key=lambda m: m.rank):
        raised.setdefault(mark.unit, mark)
    return raised


@dataclass
class ExitWatch:
    """The end marks of one launch's ranks: once every rank has ended, or one has ended with
    an error, the launch has ``grace_s`` to finish."""

    work_dir: Path
    world_size: int
    grace_s: float = EXIT_GRACE_S

    def due(self) -> dict[int, EndMark] | None:
        """The marks, when they say the launch should be over; else None."""
        ends = read_ends(self.work_dir)
        if len(ends) >= self.world_size or any(e.status != "ok" for e in ends.values()):
            return ends
        return None


class Watchdog(threading.Thread):
    """Stop the ranks (``kill``, by default SIGKILL to every child process) when the progress
    file has not changed for ``timeout_s``, or has not appeared within ``startup_timeout_s``
    (start-up on a loaded machine can take far longer than a step); ``fired`` says so. With
    ``exits``: once the ranks' end marks say the launch is over, stop them ``exits.grace_s``
    later instead (``hung_at_exit``: the marks then)."""

    def __init__(
        self,
        progress: Path,
        timeout_s: float,
        startup_timeout_s: float,
        kill: Callable[[], None] | None = None,
        exits: ExitWatch | None = None,
    ):
        super().__init__(daemon=True)
        self.progress, self.timeout_s = progress, timeout_s
        self.startup_timeout_s = startup_timeout_s
        self.kill = kill or kill_children
        self.exits = exits
        self.fired, self.fired_after = False, 0.0
        self.hung_at_exit: dict[int, EndMark] | None = None
        self._done = threading.Event()

    def run(self) -> None:
        last_change, last_mtime, ended_at = time.monotonic(), None, None
        while not self._done.wait(POLL_S):
            if self.exits is not None and ended_at is None and self.exits.due() is not None:
                ended_at = time.monotonic()
            if ended_at is not None:  # the ranks' work is over: only their exit is awaited
                if time.monotonic() - ended_at > self.exits.grace_s:
                    self.hung_at_exit = self.exits.due()
                    self.kill()
                    ended_at = time.monotonic()
                continue
            mtime = self.progress.stat().st_mtime_ns if self.progress.exists() else None
            if mtime != last_mtime:
                last_change, last_mtime = time.monotonic(), mtime
                continue
            stalled = time.monotonic() - last_change
            limit = self.timeout_s if mtime is not None else self.startup_timeout_s
            if stalled <= limit and self._raised_and_stalled(stalled):
                limit = self.exits.grace_s
            if stalled > limit:
                self.fired, self.fired_after = True, limit
                self.kill()
                last_change = time.monotonic()

    def _raised_and_stalled(self, stalled: float) -> bool:
        """Whether a rank raised inside the unit in progress and the launch has not progressed
        for the exit grace since (RAISED_DIR)."""
        if self.exits is None or stalled <= self.exits.grace_s:
            return False
        with contextlib.suppress(OSError, ValueError, KeyError):
            unit = read_json(self.progress)["unit"]
            return unit in read_raised(self.exits.work_dir)
        return False

    def stop(self) -> None:
        self._done.set()
        self.join()


# --- where the job runs ---------------------------------------------------------------------
@dataclass
class Allocation:
    """The Slurm allocation this job runs in (``scontrol show job``)."""

    job_id: str
    hosts: list[str]
    cpus_per_task: int


def _scontrol(*args: str) -> str:
    return subprocess.run(
        ["scontrol", *args], capture_output=True, text=True, check=True, timeout=60
    ).stdout


def slurm_allocation(environ: dict | None = None) -> Allocation | None:
    """The allocation of ``SLURM_JOB_ID``, or None outside Slurm. The Snakemake job step
    keeps only SLURM_JOB_ID of the allocation's variables, so the rest comes from scontrol."""
    environ = os.environ if environ is None else environ
    job_id = environ.get("SLURM_JOB_ID")
    if not job_id:
        return None
    fields = dict(
        item.split("=", 1) for item in _scontrol("show", "job", "-o", job_id).split() if "=" in item
    )
    nodelist = environ.get("SLURM_JOB_NODELIST") or fields["NodeList"]
    hosts = _scontrol("show", "hostnames", nodelist).split()
    cpus = fields.get("CPUs/Task", "1")
    return Allocation(job_id, hosts, int(cpus) if cpus.isdigit() else 1)


def choose_launcher(allocation: Allocation | None, environ: dict | None = None) -> str:
    environ = os.environ if environ is None else environ
    mode = environ.get(LAUNCHER_ENV, "auto") or "auto"
    if mode not in ("auto", "standalone", "srun"):
        raise ValueError(f"{LAUNCHER_ENV}={mode!r}: expected auto, standalone or srun")
    if mode == "srun" and allocation is None:
        raise ValueError(f"{LAUNCHER_ENV}=srun needs a Slurm allocation (no SLURM_JOB_ID)")
    if mode == "auto":
        mode = "srun" if allocation is not None and len(allocation.hosts) > 1 else "standalone"
    return mode


def rendezvous_port(job_id: str, launch: int) -> int:
    """A c10d port for launch ``launch`` of job ``job_id``: two jobs running at the same time
    (ids less than RDZV_SLOTS apart) never get the same one."""
    return RDZV_BASE + (int(job_id) % RDZV_SLOTS) * RDZV_PER_JOB + launch % RDZV_PER_JOB


def srun_command(
    allocation: Allocation, world_size: int, worker_args: list[str], agents_dir: Path, launch: int
) -> list[str]:
    """One torchrun agent per node of the allocation, c10d rendezvous on the first node."""
    nodes = len(allocation.hosts)
    if world_size % nodes:
        raise ValueError(f"world size {world_size} does not split evenly over {nodes} nodes")
    endpoint = f"{allocation.hosts[0]}:{rendezvous_port(allocation.job_id, launch)}"
    return [
        "srun",
        f"--nodes={nodes}",
        f"--ntasks={nodes}",
        "--ntasks-per-node=1",
        f"--cpus-per-task={allocation.cpus_per_task}",
        # A step of its own beside the job's (one-node jobs run inside Snakemake's step).
        "--overlap",
        "--kill-on-bad-exit=1",
        sys.executable,
        "-m",
        "pipeline_lib.job.launcher",
        "node-agent",
        "--out-dir",
        str(agents_dir),
        "--",
        f"--nnodes={nodes}",
        f"--nproc-per-node={world_size // nodes}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={endpoint}",
        f"--rdzv-id=dcp-matrix-{allocation.job_id}-{launch}",
        "-m",
        "pipeline_lib.job.worker",
        *worker_args,
    ]


# --- the two launchers: (status, cause, detail) ---------------------------------------------
def threads_per_rank(ranks_on_node: int, environ: dict | None = None) -> int:
    """The job's CPU threads (Snakemake's ``OMP_NUM_THREADS`` for the job, else this process's
    CPUs) shared among the ranks on this node. Snakemake hands every rank the job's whole
    thread count, so 4 ranks on 2 cores ran 8 spinning OpenMP threads: steps 6x slower."""
    environ = os.environ if environ is None else environ
    cpus = len(os.sched_getaffinity(0))
    job_threads = environ.get("OMP_NUM_THREADS", "")
    available = min(cpus, int(job_threads)) if job_threads.isdigit() else cpus
    return max(1, available // ranks_on_node)


def _prepare_torchrun(argv: list[str]):
    """torchrun's parsed ``argv``, with the ranks' thread count set in the environment they
    inherit."""
    from torch.distributed.run import get_args_parser

    args = get_args_parser().parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(threads_per_rank(int(args.nproc_per_node)))
    return args


def rank_start(environ: dict | None = None) -> str:
    """``forkserver`` or ``exec`` (module docstring), from ``DCP_MATRIX_RANK_START``."""
    environ = os.environ if environ is None else environ
    mode = environ.get(RANK_START_ENV, RANK_STARTS[0]) or RANK_STARTS[0]
    if mode not in RANK_STARTS:
        raise ValueError(f"{RANK_START_ENV}={mode!r}: expected {' or '.join(RANK_STARTS)}")
    return mode


def rank_environment(job_env: dict, server_env: dict, current: dict) -> dict:
    """A served rank's environment: the job's at launch time (``job_env``), plus what
    torchrun's agent set for this rank (``current`` where it differs from the server's start
    environment ``server_env``: RANK, WORLD_SIZE, MASTER_PORT, ...)."""
    set_by_agent = {k: v for k, v in current.items() if server_env.get(k) != v}
    return {**job_env, **set_by_agent}


def _served_rank(job_env: dict, target: str, *args: str):
    """A rank forked by the fork server: the job's environment (``rank_environment``), output
    flushed by line (a killed rank's lines are not lost: ``python -u`` for an exec'd one), its
    thread count from ``OMP_NUM_THREADS`` (an exec'd rank's torch reads it at import), then
    ``target`` (``module:function``, the worker's ``main``) called with ``args``.

    A rank that raises waits ``SERVED_ERROR_GRACE_S`` before it exits. For a function
    entrypoint, torchrun's agent reports only the first rank it sees exited
    (torch.multiprocessing's ``ProcessContext.join``; an exec'd rank's agent reports every
    rank): when a peer was killed by a signal, this rank's error ("Connection closed by peer")
    is its consequence, and the peer must be the one reported (a crash, not an error). A rank
    whose error is the cause loses only the grace: its peers wait in a collective until it
    exits."""
    import torch

    if os.getpid() == _IMPORT_PID:  # imported here, not by the server: _IMPORT_ENV is not its
        raise RuntimeError(
            "the fork server did not preload pipeline_lib (not importable from where the job "
            f"started?); run with {RANK_START_ENV}=exec"
        )
    environ = rank_environment(job_env, _IMPORT_ENV, dict(os.environ))
    os.environ.clear()
    os.environ.update(environ)
    os.environ[SERVED_ENV] = "1"  # the rank's record says how it started (env.rank_start)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, ValueError):
            stream.reconfigure(line_buffering=True)
    threads = os.environ.get("OMP_NUM_THREADS", "")
    if threads.isdigit():
        torch.set_num_threads(int(threads))
    module, _, name = target.partition(":")
    function = getattr(importlib.import_module(module), name)
    try:
        return function(list(args))
    except BaseException:
        time.sleep(SERVED_ERROR_GRACE_S)
        raise


# What the fork server imports once for all its ranks: the worker (torch, DCP, DTensor, FSDP:
# 2.8 s), and torch._dynamo, which torch imports lazily during a rank's first build (0.7 s).
PRELOAD = ["pipeline_lib.job.launcher", "pipeline_lib.job.worker", "torch._dynamo"]
WORKER = "pipeline_lib.job.worker:main"


def start_rank_server() -> None:
    """Start the fork server now (``forkserver`` rank start only), so that its imports run
    beside the job's own preparing instead of before its first launch. Idempotent; a bad
    ``DCP_MATRIX_RANK_START`` is left to :func:`launch`, which records it."""
    try:
        if rank_start() != "forkserver":
            return
    except ValueError:
        return
    import multiprocessing
    from multiprocessing import forkserver

    multiprocessing.set_forkserver_preload(PRELOAD)
    forkserver.ensure_running()


def _agent(args, target: str = WORKER) -> dict:
    """torchrun's agent in this process for the parsed ``args``, starting the ranks the way
    ``rank_start`` says; a served rank calls ``target`` (an exec'd one runs ``args``' module).
    Raises ChildFailedError as torchrun does; else {rank: what it returned} ({} if exec'd)."""
    from torch.distributed.run import run

    if rank_start() == "exec":
        run(args)
        return {}
    from torch.distributed.launcher.api import elastic_launch
    from torch.distributed.run import config_from_args

    start_rank_server()
    if args.standalone:  # as torch.distributed.run.run sets it up
        args.rdzv_backend, args.rdzv_endpoint = "c10d", "localhost:0"
        args.rdzv_id = str(uuid.uuid4())
    args.start_method = "forkserver"
    config, _, _ = config_from_args(args)
    launch = elastic_launch(config, entrypoint=_served_rank)
    return launch(dict(os.environ), target, *args.training_script_args)


def worker_program() -> list[str]:
    """What torchrun runs in an exec'd rank, before the job's arguments (a served rank calls
    ``WORKER``)."""
    return ["-m", "pipeline_lib.job.worker"]


def _run_standalone(
    world_size: int, worker_args: list[str], target: str = ""
) -> tuple[str, str, str]:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    argv = ["--standalone", f"--nproc-per-node={world_size}", *worker_program()]
    args = _prepare_torchrun([*argv, *worker_args])
    try:
        _agent(args, target or WORKER)
    except ChildFailedError as exc:
        return describe_failure(exc.failures)
    return "ok", "", ""


def read_agent_failures(agents_dir: Path) -> dict:
    """Every node agent's per-rank failures (global ranks), as ``describe_failure`` takes them."""
    failures = {}
    for path in sorted(agents_dir.glob("node-*.json")):
        for rank, failure in read_json(path).items():
            failures[int(rank)] = SimpleNamespace(**failure)
    return failures


class _SrunLauncher:
    def __init__(self, allocation: Allocation, world_size: int, worker_args: list[str], work_dir):
        self.launch_id = next(_LAUNCHES)
        self.agents_dir = Path(work_dir) / f"agents-{self.launch_id}"
        self.agents_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.agents_dir.glob("node-*.json"):
            stale.unlink()
        self.command = srun_command(
            allocation, world_size, worker_args, self.agents_dir, self.launch_id
        )
        self.proc: subprocess.Popen | None = None

    def kill(self) -> None:
        """srun forwards SIGTERM to the agents, which stop their ranks; SIGKILL if it hangs."""
        if self.proc is None or self.proc.poll() is not None:
            kill_children()
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(SRUN_GRACE_S)
        except subprocess.TimeoutExpired:
            kill_children()

    def run(self) -> tuple[str, str, str]:
        print("launcher: " + " ".join(self.command), file=sys.stderr, flush=True)
        self.proc = subprocess.Popen(self.command)
        returncode = self.proc.wait()
        failures = read_agent_failures(self.agents_dir)
        if failures:
            return describe_failure(failures)
        if returncode == 0:
            return "ok", "", ""
        if returncode < 0:
            return "crash", f"srun killed by {signal_name(-returncode)}", ""
        # srun itself or a node agent failed before any rank did (rendezvous, allocation).
        return "error", f"srun exited with code {returncode}", "see the job log"


def _ended_outcome(ends: dict[int, EndMark], grace_s: float, step: str, unit: str) -> Outcome:
    """The outcome of a launch killed ``grace_s`` after its ranks' end marks (``ends``) said
    it was over: what the marks say (ok; or error, the first failing rank's reason), never a
    timeout or crash. The job's log tells."""
    print(
        f"launcher: the ranks' work was over (end marks of ranks {sorted(ends)}) but the launch "
        f"had not finished {grace_s:g} s later: killed, their results kept (a rank can hang "
        "at exit inside torch: docs/torch-notes.md)",
        file=sys.stderr, flush=True,
    )  # fmt: skip
    failed = sorted((rank, end) for rank, end in ends.items() if end.status != "ok")
    if not failed:
        return Outcome("ok", "", step, unit)
    rank, end = failed[0]
    where = f"during {step}" if step else "during start-up"
    return Outcome("error", f"rank {rank} raised {where}: {end.reason}", step, unit)


def launch(
    world_size: int,
    worker_args: list[str],
    work_dir: Path,
    timeout_s: float,
    startup_timeout_s: float,
    target: str = "",
) -> Outcome:
    """Run ``python -m pipeline_lib.job.worker ARGS`` on ``world_size`` ranks under torchrun
    (``target``: another ``module:function`` a served rank calls, for tests)."""
    progress = work_dir / "progress.json"
    progress.unlink(missing_ok=True)
    for marks in (ENDED_DIR, RAISED_DIR):  # the marks of an earlier launch
        shutil.rmtree(work_dir / marks, ignore_errors=True)
    try:
        allocation = slurm_allocation()
        rank_start()  # a bad DCP_MATRIX_RANK_START fails here, naming the variable
        srun = None
        if choose_launcher(allocation) == "srun":
            srun = _SrunLauncher(allocation, world_size, worker_args, work_dir)
    except (OSError, ValueError, KeyError, subprocess.SubprocessError) as exc:
        return Outcome("error", f"cannot launch: {exc}", "")
    exits = ExitWatch(work_dir, world_size, EXIT_GRACE_S)
    kill = srun.kill if srun else None
    watchdog = Watchdog(progress, timeout_s, startup_timeout_s, kill=kill, exits=exits)
    watchdog.start()
    try:
        if srun:
            status, cause, detail = srun.run()
        else:
            status, cause, detail = _run_standalone(world_size, worker_args, target)
    finally:
        watchdog.stop()
    mark = read_json(progress) if progress.exists() else {"step": "", "unit": ""}
    step, unit = mark["step"], mark["unit"]
    where = f"during {step}" if step else "during start-up"
    if watchdog.hung_at_exit is not None:
        return _ended_outcome(watchdog.hung_at_exit, exits.grace_s, step, unit)
    if watchdog.fired:
        raised = read_raised(work_dir).get(unit) if step else None
        if raised is not None:  # some ranks raised, the others waited for them
            waited = f"the other ranks waited: no progress for {watchdog.fired_after:g} s"
            return Outcome("error", f"{raised.describe()} ({waited}; job killed)", step, unit)
        limit = timeout_s if step else startup_timeout_s
        return Outcome("timeout", f"no progress for {limit:g} s {where}; job killed", step, unit)
    if status == "ok":
        return Outcome(status, "", step, unit)
    return Outcome(status, f"{cause} {where}" + (f": {detail}" if detail else ""), step, unit)


# --- the per-node agent of the srun launcher --------------------------------------------------
def node_agent(out_dir: Path, torchrun_argv: list[str]) -> int:
    """Run torchrun's agent in process on this node; on failure, write its per-rank failures
    to ``out_dir/node-<node>.json`` (read by :func:`read_agent_failures`) and exit 1."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = _prepare_torchrun(torchrun_argv)
    try:
        _agent(args)
    except ChildFailedError as exc:
        node = os.environ.get("SLURM_NODEID") or os.environ.get("SLURM_PROCID", "0")
        failures = {
            str(rank): {"exitcode": f.exitcode, "timestamp": f.timestamp, "message": f.message}
            for rank, f in exc.failures.items()
        }
        write_json(Path(out_dir) / f"node-{node}.json", failures)
        return 1
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline_lib.job.launcher")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("node-agent", help="one node's torchrun agent (started by srun)")
    p.add_argument("--out-dir", required=True, type=Path)
    p.add_argument("torchrun_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    torchrun_args = args.torchrun_args
    if torchrun_args and torchrun_args[0] == "--":
        torchrun_args = torchrun_args[1:]
    sys.exit(node_agent(args.out_dir, torchrun_args))


if __name__ == "__main__":
    # The package's own module, not this __main__ copy: a served rank is handed
    # pipeline_lib.job.launcher._served_rank, the one the fork server preloaded.
    from pipeline_lib.job import launcher

    launcher.main()
