"""Shared fixtures. Tests that launch torchrun are marked ``torchrun``; Snakemake runs ``e2e``."""

from __future__ import annotations

import copy
import os
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent


def pytest_configure(config):
    """Snakemake's Slurm executor plugin runs ``scontrol show config`` whenever Snakemake starts
    (snakemake-executor-plugin-slurm 2.7.1, at import). With Slurm's client installed and no
    controller reachable (``setup.sh --dev`` installs it for tests/test_slurm.py) that waits
    about 10 s, in every one of the suite's Snakemake runs. The tests point SLURM_CONF at a
    configuration without a cluster, so the probe fails at once; the Slurm tests name the
    cluster they bring up (tests/test_slurm.py). A SLURM_CONF already set is kept."""
    if "SLURM_CONF" not in os.environ:
        conf = Path(tempfile.mkdtemp(prefix="dcp-matrix-tests-")) / "slurm.conf"
        conf.touch()  # empty: no cluster (scontrol: "Unable to process configuration file")
        os.environ["SLURM_CONF"] = str(conf)


def pytest_sessionfinish(session, exitstatus):
    """Whatever process the tests left running below this one (a subprocess's descendant that
    outlived it, a rank of a job run in process) is killed, and named, when the session ends:
    nothing a test started outlives the suite (each subprocess a test starts runs under a
    timeout that kills its whole process group: tests/procs.py). The fork server and resource
    tracker of a job run in this process are left alone: they end with it."""
    from pipeline_lib.job.launcher import is_helper
    from tests.procs import sweep

    killed = sweep(os.getpid(), keep=lambda process: is_helper(process, os.getpid()))
    if killed:
        print("\nconftest: killed what the tests left running:", *killed, sep="\n  ")


@pytest.fixture
def default_config() -> dict:
    return yaml.safe_load((REPO / "config.yaml").read_text())


@pytest.fixture
def small_config() -> dict:
    return copy.deepcopy(
        {
            "models": ["mlp"],
            "layouts": {
                "single": {"framework": "single", "mesh": [1]},
                "fsdp2_2": {"framework": "fsdp2", "mesh": [2]},
            },
            "train": {"steps": 2, "resume_steps": 2, "global_batch": 8},
            "run": {"cell_timeout_s": 120},
        }
    )


@pytest.fixture
def in_tmp(tmp_path, monkeypatch) -> Path:
    """Run in a fresh folder (jobs write results/ relative to the working directory)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return tmp_path


PYTHON = sys.executable
