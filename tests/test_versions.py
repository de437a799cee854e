"""The torch-version axis: save with one PyTorch release, load with another, through real
torchrun jobs in environments the workflow builds itself (reused across runs and tests)."""

from __future__ import annotations

import pandas as pd
import pytest
import yaml

from pipeline_lib.plan import config, grid
from tests.conftest import REPO
from tests.test_snakemake import snakemake

# Built once in the checkout and reused by later runs (git-ignored).
ENV_DIR = REPO / ".torch-envs"
VERSIONS = {"t2_13": "torch==2.13.0", "t2_14": "torch==2.14.1"}


def versions_config(**overrides) -> dict:
    return {
        "models": ["mlp"],
        "layouts": {
            "single": {"framework": "single", "mesh": [1]},
            "fsdp2_2": {"framework": "fsdp2", "mesh": [2]},
        },
        "torch_versions": VERSIONS,
        "run": {"torch_env_dir": str(ENV_DIR)},
        **overrides,
    }


def test_version_pairs_expand_the_grid():
    cfg = config.validate(versions_config())
    cells = grid.cells(cfg)
    assert len(cells) == 4 * 4  # 2 x 2 version pairs x 2 x 2 layout pairs
    (spec,) = grid.load_job_spec(cfg, "results/torch/t2_14", "fsdp2_2").items
    assert [s.id for s in spec.sources] == [
        "t2_13.single",
        "t2_13.fsdp2_2",
        "t2_14.single",
        "t2_14.fsdp2_2",
    ]
    assert spec.sources[0].paths.checkpoint == "results/torch/t2_13/save/mlp/single/checkpoint"
    assert spec.record == "results/torch/t2_14/load/mlp/fsdp2_2.json"
    cfg = config.validate(versions_config(version_pairs=[["t2_13", "t2_14"]]))
    assert {(c.save_version, c.load_version) for c in grid.cells(cfg)} == {("t2_13", "t2_14")}
    assert grid.save_jobs(cfg) == [
        ("results/torch/t2_13", "single"),
        ("results/torch/t2_13", "fsdp2_2"),
    ]


def test_unknown_version_in_pairs_is_refused():
    with pytest.raises(
        config.ConfigError, match=r"version_pairs\.0\.1: unknown torch version 't9'"
    ):
        config.validate(versions_config(version_pairs=[["t2_13", "t9"]]))


@pytest.mark.e2e
def test_cross_version_pairs_in_both_directions(tmp_path):
    cfg = versions_config(version_pairs=[["t2_13", "t2_14"], ["t2_14", "t2_13"]])
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    snakemake(tmp_path)
    matrix = pd.read_parquet(tmp_path / "results" / "matrix.parquet")
    pairs = set(zip(matrix.save_torch_version, matrix.load_torch_version, strict=True))
    assert pairs == {("2.13.0+cpu", "2.14.1"), ("2.14.1", "2.13.0+cpu")}
    assert len(matrix) == 2 * 4
    assert (matrix.status == "pass").all(), matrix[
        ["save_layout", "load_layout", "save_torch_version", "reason"]
    ]
    assert (matrix.entries_checked == 52).all() and (matrix.entries_mismatched == 0).all()
    for version, requirement in VERSIONS.items():
        packages = (ENV_DIR / version / "packages.txt").read_text()
        assert requirement in packages  # e.g. torch==2.13.0+cpu


@pytest.mark.e2e
def test_fsdp1_full_optimizer_state_on_2_14_fails_on_the_state_check(tmp_path):
    """Found on torch 2.14.1 (CPU): FSDP1's full optimizer state dict returns every exp_avg
    as a view that exp_avg_sq overwrites. The saver's reference comes from the live optimizer,
    so the state check names the entries, not only the resume."""
    cfg = versions_config(
        layouts={
            "single": {"framework": "single", "mesh": [1]},
            "fsdp1_2": {"framework": "fsdp1", "mesh": [2]},
        },
        pairs=[["fsdp1_2", "single"]],
        mode=["full"],
        torch_versions={"t2_14": VERSIONS["t2_14"]},
    )
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    snakemake(tmp_path)
    (row,) = pd.read_parquet(tmp_path / "results" / "matrix.parquet").itertuples()
    assert row.status == "fail"
    assert row.reason.startswith(
        "state dict vs live: 20 of 52 entries differ; first optim.state.blocks.0.fc1.bias.exp_avg:"
        " shares storage with optim.state.blocks.0.fc1.bias.exp_avg_sq"
    ), row.reason
    tensors = pd.read_parquet(tmp_path / "results" / "tensors.parquet")
    wrong = tensors[tensors.state_equal.eq(False)]
    assert set(wrong.kind) == {"optim.exp_avg", "optim.exp_avg_sq"} and len(wrong) == 20
    exp_avg = wrong[wrong.kind == "optim.exp_avg"]
    assert exp_avg.note.str.contains("bytes differ").all() and len(exp_avg) == 10
