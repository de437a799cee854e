"""Snakemake end to end: config -> jobs -> matrix.parquet / tensors.parquet, plus lint."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests import procs
from tests.conftest import REPO

BIN = Path(sys.executable).parent


# Two 2-rank jobs at a time on a 2-core machine: a small job spends most of its time in its
# fork server's imports, on one core (the fault campaign: 212 s against 284 s with --cores 2,
# 2026-12-03). The same jobs and records; it shows jobs running side by side too.
CORES = 4


def snakemake(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = procs.run(
        [str(BIN / "snakemake"), "-s", str(REPO / "Snakefile"), "-d", str(workdir),
         "--cores", str(CORES), "--configfile", str(workdir / "config.yaml"), *args],
        capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    if check:
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


@pytest.mark.e2e
def test_small_matrix_end_to_end(tmp_path):
    cfg = {
        "models": ["mlp"],
        "layouts": {
            "single": {"framework": "single", "mesh": [1]},
            "fsdp2_2": {"framework": "fsdp2", "mesh": [2]},
            "tp_2": {"framework": "tp", "mesh": [2]},
        },
        "pairs": "all",
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    snakemake(tmp_path)
    matrix = pd.read_parquet(tmp_path / "results" / "matrix.parquet")
    assert len(matrix) == 9
    assert set(zip(matrix.save_layout, matrix.load_layout, strict=True)) == {
        (s, d) for s in cfg["layouts"] for d in cfg["layouts"]
    }
    assert (matrix.status == "pass").all(), matrix[["save_layout", "load_layout", "reason"]]
    assert matrix.git_commit.notna().all() and matrix.config_hash.nunique() == 1
    assert (matrix.torch_version.str.startswith("2.")).all() and set(matrix.backend) == {"gloo"}
    tensors = pd.read_parquet(tmp_path / "results" / "tensors.parquet")
    assert len(tensors) == 9 * matrix.entries_checked.iloc[0]
    assert tensors.equal.all()
    assert {
        "param",
        "optim.exp_avg",
        "optim.exp_avg_sq",
        "optim.step",
        "optim.param_groups",
    } <= set(tensors.kind)

    # A second run has nothing to do and leaves the table as it was.
    again = snakemake(tmp_path)
    assert "Nothing to be done" in again.stdout + again.stderr
    pd.testing.assert_frame_equal(matrix, pd.read_parquet(tmp_path / "results" / "matrix.parquet"))

    # A run killed during a load job (before it wrote its record, so before the aggregate): the
    # next run redoes only that job and the aggregate, and the table has the same verdicts.
    (tmp_path / "results" / "load" / "mlp" / "tp_2.json").unlink()
    (tmp_path / "results" / "matrix.parquet").unlink()
    rerun = snakemake(tmp_path)
    assert "load_checkpoints        1" in rerun.stdout + rerun.stderr
    assert "save_checkpoints" not in rerun.stdout + rerun.stderr
    keys = ["model", "save_layout", "load_layout", "status", "reason", "entries_checked"]
    after = pd.read_parquet(tmp_path / "results" / "matrix.parquet")
    pd.testing.assert_frame_equal(matrix[keys], after[keys])


def test_bad_config_is_refused_before_any_job(tmp_path):
    cfg = {"models": ["mlp"], "layouts": {"bad": {"framework": "fsdp3", "mesh": [2]}}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    proc = snakemake(tmp_path, "-n", check=False)
    assert proc.returncode != 0
    assert "layouts.bad.framework: unknown framework 'fsdp3'" in proc.stdout + proc.stderr
    assert not (tmp_path / "results").exists()


def test_default_config_dry_run_plans_the_budgeted_jobs(tmp_path):
    (tmp_path / "config.yaml").write_text((REPO / "config.yaml").read_text())
    proc = snakemake(tmp_path, "-n", "--quiet", "rules")
    out = proc.stdout + proc.stderr
    assert "save_checkpoints        8" in out and "load_checkpoints        8" in out


def test_a_matrix_beside_a_fault_campaign_of_other_models_plans_both(tmp_path):
    """The {model} wildcard covers the fault cells' models (and the model a foreign_checkpoint
    cell saves), not only ``models``: the DAG of such a config could not be built."""
    cfg = {
        "models": ["mlp_uneven"],
        "layouts": {
            "ddp_2": {"framework": "ddp", "mesh": [2]},
            "fsdp2_2": {"framework": "fsdp2", "mesh": [2]},
        },
        "pairs": "same",
        "faults": [
            {"fault": "stale_param", "model": "tied_embedding", "save": "ddp_2", "load": "fsdp2_2"},
            {"fault": "foreign_checkpoint", "model": "mlp", "save": "ddp_2", "load": "fsdp2_2"},
        ],
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    proc = snakemake(tmp_path, "-n", "--quiet", "rules")
    out = proc.stdout + proc.stderr
    assert re.search(r"save_fault_checkpoint\s+2\n", out), out
    assert re.search(r"save_checkpoints\s+2\n", out), out


def planned_jobs(out: str) -> list[dict]:
    """The jobs of a dry run (``-n -p``): rule, outputs, wildcards and shell command each."""
    jobs = []
    for block in re.split(r"^\[.*\]\n", out, flags=re.M)[1:]:
        rule = re.search(r"^(?:local)?rule (\w+):", block, flags=re.M)
        outputs = re.search(r"^    output: (.*)$", block, flags=re.M)
        wildcards = re.search(r"^    wildcards: (.*)$", block, flags=re.M)
        jobs.append({
            "rule": rule.group(1) if rule else None,
            "outputs": outputs.group(1).split(", ") if outputs else [],
            "wildcards": dict(w.split("=", 1) for w in wildcards.group(1).split(", "))
            if wildcards else {},
            "shell": block,
        })  # fmt: skip
    return jobs


@pytest.mark.parametrize("torch_versions", [{}, {"t213": "torch==2.13.0"}], ids=["own", "env"])
def test_the_matrix_rules_write_the_grids_paths_with_one_segment_wildcards(
    tmp_path, torch_versions
):
    """The rules write their outputs themselves (the pipeline's own torch under results/, a
    torch_versions environment's jobs in the rules' *_in_torch_env copies): each job's outputs
    are the records its grid job writes (grid.save_outputs, load_outputs), every wildcard is one
    path segment, and the job is told its version root."""
    from pipeline_lib.plan import config, grid

    cfg = {"models": ["mlp"], "mode": ["sharded", "full"], "torch_versions": torch_versions,
           "layouts": {"single": {"framework": "single", "mesh": [1]},
                       "ddp_2": {"framework": "ddp", "mesh": [2]}}}  # fmt: skip
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    jobs = planned_jobs(snakemake(tmp_path, "-n", "-p").stdout)
    valid = config.validate(cfg)
    suffix = "_in_torch_env" if torch_versions else ""
    matrix = [j for j in jobs if j["rule"] and j["rule"].endswith(f"_checkpoints{suffix}")]
    assert len(matrix) == 4, [j["rule"] for j in jobs]
    for job in matrix:
        layout, version = job["wildcards"]["layout"], job["wildcards"].get("version")
        assert set(job["wildcards"]) == ({"layout", "version"} if torch_versions else {"layout"})
        assert not any("/" in value for value in job["wildcards"].values())
        root = grid.version_root(version)
        outputs = grid.save_outputs if job["rule"].startswith("save") else grid.load_outputs
        assert job["outputs"] == outputs(valid, root, layout)
        assert f"--version-root {root} --layout {layout}" in job["shell"]


def test_setting_a_baseline_reruns_no_job(tmp_path):
    """A baseline changes the gate and the report, not a cell: the jobs' params and the rows'
    config hash stay the same, so Snakemake re-runs nothing of a finished matrix."""
    from pipeline_lib.plan.config import config_hash, validate
    from pipeline_lib.plan.snakemake_view import Plan

    cfg = {"models": ["mlp"], "layouts": {"single": {"framework": "single", "mesh": [1]}}}
    with_baseline = {**cfg, "baseline": str(REPO / "expectations" / "torch-2.13.0.yaml")}
    plain, gated = Plan(cfg, str(REPO)), Plan(with_baseline, str(REPO))
    assert plain.grid_json == gated.grid_json
    assert config_hash(validate(cfg)) == config_hash(validate(with_baseline))


def test_snakemake_lint_is_clean(tmp_path):
    (tmp_path / "config.yaml").write_text((REPO / "config.yaml").read_text())
    proc = snakemake(tmp_path, "--lint", check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_snakefmt_and_ruff_are_clean():
    for command in (
        ["snakefmt", "--check", "Snakefile", "workflow"],
        ["ruff", "check", "."],
        ["ruff", "format", "--check", "."],
    ):
        proc = procs.run(
            [str(BIN / command[0]), *command[1:]], cwd=REPO, capture_output=True, text=True,
            timeout=300,
        )  # fmt: skip
        assert proc.returncode == 0, f"{command}: {proc.stdout}{proc.stderr}"
