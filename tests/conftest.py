"""Shared fixtures. Tests that launch torchrun are marked ``torchrun``; Snakemake runs ``e2e``."""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent


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
