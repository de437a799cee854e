"""The launcher's share of CPU threads per rank, its rank start and a served rank's environment
(pure; the torchrun path, both rank starts: test_torchrun.py)."""

from __future__ import annotations

import pytest

from pipeline_lib import launcher


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
from pipeline_lib import launcher
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
    import subprocess
    import sys

    from tests.conftest import REPO

    proc = subprocess.run(
        [sys.executable, "-c", FORKED], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.splitlines()[-1])
    assert out["same_command"]  # why a command line alone cannot tell the server from a rank
    assert out["rank_exitcode"] == -9, out  # SIGKILL; None: the rank was left running
    assert out["helpers"] == 2 and out["helpers_alive"] == [True, True], out
