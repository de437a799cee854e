"""The launcher's share of CPU threads per rank, its rank start, a served rank's environment,
the watchdog's kill and its exit grace (pure, but for one torchrun launch of a rank that never
exits; the torchrun path, both rank starts: test_torchrun.py)."""

from __future__ import annotations

import sys
import time

import pytest

from pipeline_lib.common.atomic import write_json
from pipeline_lib.job import launcher
from tests import procs


@pytest.mark.parametrize(
    ("cpus", "job_threads", "ranks", "expected"),
    [
        (2, "2", 4, 1),  # Snakemake's 2 threads for a 4-rank job on 2 cores
        (2, "2", 2, 1),
        (16, "16", 2, 8),
        (16, "4", 1, 4),  # never more than the job was given
        (4, "", 2, 2),  # outside Snakemake: this process's CPUs
        (4, "many", 1, 4),
    ],
)
def test_threads_are_shared_among_the_ranks(monkeypatch, cpus, job_threads, ranks, expected):
    monkeypatch.setattr(launcher.os, "sched_getaffinity", lambda _: set(range(cpus)))
    environ = {"OMP_NUM_THREADS": job_threads} if job_threads else {}
    assert launcher.threads_per_rank(ranks, environ) == expected


def test_ranks_are_served_unless_told_to_exec():
    assert launcher.rank_start({}) == "forkserver"
    assert launcher.rank_start({launcher.RANK_START_ENV: "exec"}) == "exec"
    with pytest.raises(
        ValueError, match="DCP_MATRIX_RANK_START='fork': expected forkserver or exec"
    ):
        launcher.rank_start({launcher.RANK_START_ENV: "fork"})


def test_a_served_rank_has_the_jobs_environment_and_the_agents_variables():
    server = {"PATH": "/bin", "CHANGED": "at server start", "GONE": "1", "SAME": "s"}
    current = {**server, "RANK": "1", "MASTER_PORT": "29500"}  # torchrun's _wrap set these
    job = {"PATH": "/bin", "CHANGED": "at launch", "SAME": "s", "NEW": "n"}
    assert launcher.rank_environment(job, server, current) == {
        **job, "RANK": "1", "MASTER_PORT": "29500",
    }  # fmt: skip


def test_a_rank_the_server_did_not_preload_refuses_to_run():
    # This process imported the launcher itself: its import environment is not a server's.
    with pytest.raises(RuntimeError, match="fork server did not preload pipeline_lib"):
        launcher._served_rank({}, "tests.jobs:probe")


# A job's fork server and a rank it forked (the rank has the server's command line), then the
# watchdog's kill: the rank must die, the server and its resource tracker must not.
FORKED = """
import json, multiprocessing, time, psutil
from pipeline_lib.job import launcher
rank = multiprocessing.get_context("forkserver").Process(target=time.sleep, args=(600,),
                                                          daemon=True)
rank.start()
helpers = psutil.Process().children()
same_command = launcher.is_fork_server(psutil.Process(rank.pid))
launcher.kill_children()
rank.join(10)
print(json.dumps({"rank_exitcode": rank.exitcode, "same_command": same_command,
                  "helpers": len(helpers), "helpers_alive": [h.is_running() for h in helpers]}))
"""


def test_the_watchdogs_kill_reaches_a_rank_the_fork_server_forked():
    import json
    import sys

    from tests.conftest import REPO

    proc = procs.run(
        [sys.executable, "-c", FORKED], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.splitlines()[-1])
    assert out["same_command"]  # why a command line alone cannot tell the server from a rank
    assert out["rank_exitcode"] == -9, out  # SIGKILL; None: the rank was left running
    assert out["helpers"] == 2 and out["helpers_alive"] == [True, True], out


def _watch(tmp_path, world_size: int, grace_s: float) -> tuple[launcher.Watchdog, list]:
    """A watchdog on ``tmp_path``'s marks whose kill only counts (no progress timeout)."""
    kills: list[float] = []
    exits = launcher.ExitWatch(tmp_path, world_size, grace_s)
    dog = launcher.Watchdog(tmp_path / "progress.json", 600, 600, kills.append, exits)
    dog.kill = lambda: kills.append(time.monotonic())
    dog.start()
    return dog, kills


def test_a_launch_whose_ranks_ended_is_stopped_after_the_exit_grace(tmp_path):
    """Every rank's end mark: the ranks still running ``grace_s`` later are killed and the
    launch counts as ended (ok); one rank's mark alone waits for the others."""
    dog, kills = _watch(tmp_path, world_size=2, grace_s=0.5)
    launcher.mark_ended(tmp_path, 0, "ok")
    time.sleep(1.5)
    assert kills == [] and dog.hung_at_exit is None  # rank 1 still works: no exit grace yet
    marked = time.monotonic()  # before the mark: the grace counts from when it is seen
    launcher.mark_ended(tmp_path, 1, "ok")
    while not kills and time.monotonic() - marked < 30:
        time.sleep(0.05)
    dog.stop()
    assert kills and kills[0] - marked >= 0.5 and not dog.fired
    assert sorted(dog.hung_at_exit) == [0, 1]
    outcome = launcher._ended_outcome(dog.hung_at_exit, 0.5, "cell b", "b.d")
    assert outcome == launcher.Outcome("ok", "", "cell b", "b.d")


def test_a_rank_that_raised_and_hangs_is_an_error_with_its_reason(tmp_path, capsys):
    dog, kills = _watch(tmp_path, world_size=2, grace_s=0.2)
    launcher.mark_ended(tmp_path, 1, "error", "RuntimeError: boom")
    marked = time.monotonic()
    while not kills and time.monotonic() - marked < 30:
        time.sleep(0.05)
    dog.stop()
    assert kills and not dog.fired
    outcome = launcher._ended_outcome(dog.hung_at_exit, 0.2, "train", "mlp.ddp_2")
    assert (outcome.status, outcome.reason) == (
        "error",
        "rank 1 raised during train: RuntimeError: boom",
    )
    assert "had not finished 0.2 s later: killed, their results kept" in capsys.readouterr().err


# A launch of two served ranks that end their part (their end marks), rank 1 then never
# exits, as a rank in torch's process group destructor (docs/torch-notes.md).
HUNG_AT_EXIT = """
import json, sys, time, psutil
from pathlib import Path
from pipeline_lib.job import launcher
launcher.EXIT_GRACE_S = 3.0
work = Path(sys.argv[1])
started = time.monotonic()
outcome = launcher.launch(2, [str(work)], work, 300, 300, target="tests.jobs:ends_then_hangs")
left = [p.pid for p in psutil.Process().children(recursive=True)
        if not launcher.is_helper(p, psutil.Process().pid)]
print(json.dumps({"outcome": [outcome.status, outcome.reason], "s": time.monotonic() - started,
                  "left": left}))
"""


@pytest.mark.torchrun
def test_a_rank_that_hangs_after_its_end_mark_does_not_hang_the_job(tmp_path):
    """Real served ranks under torchrun's agent: the launch ends about EXIT_GRACE_S after the
    marks, ok (not a timeout: what the results say stands), no rank left, the log tells."""
    import json

    from tests.conftest import REPO
    from tests.procs import run

    command = [sys.executable, "-c", HUNG_AT_EXIT, str(tmp_path)]
    proc = run(command, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.splitlines()[-1])
    assert out["outcome"] == ["ok", ""] and out["left"] == [], out
    assert 3.0 < out["s"] < 120, out
    assert "launcher: the ranks' work was over (end marks of ranks [0, 1])" in proc.stderr


def test_a_rank_that_raised_in_the_unit_in_progress_stops_the_launch_after_the_grace(tmp_path):
    """A raised mark for the unit in progress and no progress for the exit grace: the watchdog
    fires (long before its timeout of 600 s); a mark for another unit does not. The lowest
    raising rank's mark is the unit's."""
    launcher.mark_raised(tmp_path, 1, "u0", "cell z", "KeyError: 'other'")
    write_json(tmp_path / "progress.json", {"step": "cell a", "unit": "u1", "at": 0})
    dog, kills = _watch(tmp_path, world_size=2, grace_s=0.5)
    time.sleep(1.5)
    assert kills == [] and not dog.fired  # u0 is not in progress
    launcher.mark_raised(tmp_path, 3, "u1", "cell a", "ValueError: later")
    launcher.mark_raised(tmp_path, 1, "u1", "cell a", "ValueError: boom")
    marked = time.monotonic()
    while not kills and time.monotonic() - marked < 30:
        time.sleep(0.05)
    dog.stop()
    assert kills and dog.fired and dog.fired_after == 0.5
    raised = launcher.read_raised(tmp_path)
    assert raised["u1"].describe() == "rank 1 raised during cell a: ValueError: boom"
    assert raised["u0"].rank == 1 and set(raised) == {"u0", "u1"}


# A launch of two served ranks in load cell u1: rank 1 raises there (its raised mark), rank 0
# waits for ever, as for a collective rank 1 never joins.
RAISED_ON_ONE_RANK = """
import json, sys, time
from pathlib import Path
from pipeline_lib.job import launcher
launcher.EXIT_GRACE_S = 3.0
work = Path(sys.argv[1])
started = time.monotonic()
outcome = launcher.launch(2, [str(work)], work, 300, 300, target="tests.jobs:raises_on_one_rank")
print(json.dumps({"outcome": [outcome.status, outcome.reason, outcome.unit],
                  "s": time.monotonic() - started}))
"""


@pytest.mark.torchrun
def test_a_cell_that_raised_on_one_rank_is_an_error_with_its_reason_not_a_timeout(tmp_path):
    """Real served ranks under torchrun's agent: the launch ends about EXIT_GRACE_S after the
    raise (its cell timeout is 300 s), the unit ``error`` naming the rank and its exception."""
    import json

    from tests.conftest import REPO
    from tests.procs import run

    command = [sys.executable, "-c", RAISED_ON_ONE_RANK, str(tmp_path)]
    proc = run(command, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.splitlines()[-1])
    assert out["outcome"] == [
        "error",
        "rank 1 raised during cell a: ValueError: only on rank 1 (the other ranks waited: no "
        "progress for 3 s; job killed)",
        "u1",
    ], out
    assert 3.0 < out["s"] < 120, out


def test_a_unit_rank_0_passed_while_another_rank_raised_in_it_is_an_error(tmp_path, monkeypatch):
    """driver.run_units: rank 0's result says pass, a raised mark of rank 1 says otherwise:
    the unit is error with rank 1's reason; a unit nobody raised in keeps its result, and one
    whose own result is already error keeps that."""
    from types import SimpleNamespace

    from pipeline_lib.job import driver
    from pipeline_lib.verify.results import LoadResult

    def launched(spec, work, attempt, clock):
        for unit, status in (("u1", "pass"), ("u2", "pass"), ("u3", "error")):
            result = LoadResult(status=status, reason=status)
            write_json(work / "results" / f"{unit}.json", result.to_dict())
        launcher.mark_raised(work, 1, "u1", "cell a", "ValueError: on rank 1 only")
        launcher.mark_raised(work, 1, "u3", "cell c", "ValueError: not this one")
        return launcher.Outcome("ok", "", "cell c", "u3")

    monkeypatch.setattr(driver, "_run_worker", launched)
    spec = SimpleNamespace(kind="load", narrowed=lambda units: None)
    results, launches = driver.run_units(spec, tmp_path, ["u1", "u2", "u3"])
    assert launches == 1
    assert (results["u1"].status, results["u1"].reason) == (
        "error", "rank 1 raised during cell a: ValueError: on rank 1 only"
    )  # fmt: skip
    assert (results["u2"].status, results["u3"].reason) == ("pass", "error")
