"""The launcher's share of CPU threads per rank (pure; the torchrun path: test_torchrun.py)."""

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
