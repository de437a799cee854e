"""Grid expansion: a pure function of the config (no torch, no torchrun)."""

import math
import subprocess
import sys

import pytest

from pipeline_lib import config, faults, grid
from tests.conftest import REPO


def test_grid_does_not_import_torch():
    # A fresh interpreter: this test process may have imported torch elsewhere.
    code = (
        "import sys; from pipeline_lib import config, grid; from tests.conftest import REPO;"
        "c = config.load(REPO / 'config.yaml'); grid.cells(c); grid.load_spec(c, 'mlp', 'tp_2');"
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_pairs_all_covers_every_ordered_pair(default_config):
    cfg = config.validate(default_config)
    cells = grid.cells(cfg)
    n_layouts, n_models = len(cfg["layouts"]), len(cfg["models"])
    assert len(cells) == n_models * n_layouts**2
    assert len({(c.model, c.save.name, c.load.name) for c in cells}) == len(cells)


def test_job_budget(default_config):
    cfg = config.validate(default_config)
    jobs = len(cfg["models"]) * (len(grid.save_layouts(cfg)) + len(grid.load_layouts(cfg)))
    assert jobs <= 2 * len(cfg["models"]) * len(cfg["layouts"])
    spec = grid.load_spec(cfg, "mlp", "tp_2")
    assert [s["layout"]["name"] for s in spec["sources"]] == list(cfg["layouts"])


def test_pairs_same_and_explicit(small_config):
    small_config["pairs"] = "same"
    cfg = config.validate(small_config)
    assert [(c.save.name, c.load.name) for c in grid.cells(cfg)] == [
        ("single", "single"),
        ("fsdp2_2", "fsdp2_2"),
    ]
    small_config["pairs"] = [["single", "fsdp2_2"], ["single", "fsdp2_2"]]
    cfg = config.validate(small_config)
    assert [(c.save.name, c.load.name) for c in grid.cells(cfg)] == [("single", "fsdp2_2")]
    assert grid.save_layouts(cfg) == ["single"]
    assert (
        grid.load_spec(cfg, "mlp", "fsdp2_2")["sources"][0]["checkpoint"]
        == "results/save/mlp/single/checkpoint"
    )


@pytest.mark.parametrize(
    ("framework", "mesh", "world", "tp"),
    [
        ("fsdp2", [3], 3, 1),
        ("ddp", [8], 8, 1),
        ("fsdp2_tp", [1, 2], 2, 2),
        ("hsdp", [2, 3], 6, 1),
        ("tp", [4], 4, 4),
    ],
)
def test_any_world_size(framework, mesh, world, tp):
    cfg = config.validate(
        {"models": ["mlp"], "layouts": {"l": {"framework": framework, "mesh": mesh}}}
    )
    layout = grid.layouts(cfg)["l"]
    assert (layout.world_size, layout.tp_degree) == (world, tp)
    assert layout.world_size == math.prod(mesh)
    assert grid.save_spec(cfg, "mlp", "l")["layout"]["world_size"] == world


def test_specs_carry_what_the_job_needs(small_config):
    cfg = config.validate(small_config)
    spec = grid.save_spec(cfg, "mlp", "fsdp2_2")
    assert spec["checkpoint"] == "results/save/mlp/fsdp2_2/checkpoint"
    assert spec["layout"]["mesh_dims"] == ("shard",)
    assert spec["train"]["steps"] == 2
    assert spec["config_hash"] == config.config_hash(cfg)


def test_fault_cells_get_their_own_jobs(small_config):
    small_config["faults"] = [{"fault": "all", "model": "mlp", "save": "single", "load": "fsdp2_2"}]
    cfg = config.validate(small_config)
    cells = grid.fault_cells(cfg)
    assert len(cells) == len(faults.FAULTS)
    by_fault = {c.fault: c for c in cells}
    flip = by_fault["flip_byte"]
    assert grid.fault_save_spec(cfg, flip)["fault"] == "flip_byte"
    assert (
        grid.fault_save_spec(cfg, flip)["checkpoint"]
        == f"results/faults/{flip.id}/save/mlp/single/checkpoint"
    )
    load = grid.fault_load_spec(cfg, by_fault["hang_load"])
    assert "fault" not in grid.fault_save_spec(cfg, by_fault["hang_load"])
    assert [s["fault"] for s in load["sources"]] == ["hang_load"]
    assert load["fault"] == {
        "name": "hang_load",
        "expect": "timeout",
        "id": by_fault["hang_load"].id,
    }
    foreign = grid.fault_load_spec(cfg, by_fault["foreign_checkpoint"])
    assert (
        foreign["model"] == "mlp"
        and "/save/mlp_uneven/single/" in foreign["sources"][0]["checkpoint"]
    )
