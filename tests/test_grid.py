"""Grid expansion: a pure function of the config (no torch, no torchrun)."""

import math
import sys

import pytest

from pipeline_lib.plan import config, grid
from pipeline_lib.plan.specs import FaultTag
from pipeline_lib.verify import faults
from tests import procs
from tests.conftest import REPO


def test_grid_does_not_import_torch():
    # A fresh interpreter: this test process may have imported torch elsewhere.
    code = (
        "import sys; from pipeline_lib.plan import config, grid; from tests.conftest import REPO;"
        "c = config.load(REPO / 'config.yaml'); grid.cells(c); grid.load_spec(c, 'mlp', 'tp_2');"
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    procs.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=120)


def test_pairs_all_covers_every_ordered_pair(default_config):
    cfg = config.validate(default_config)
    cells = grid.cells(cfg)
    n_layouts, n_models = len(cfg["layouts"]), len(cfg["models"])
    assert len(cells) == n_models * n_layouts**2
    assert len({(c.model, c.save.name, c.load.name) for c in cells}) == len(cells)


def test_job_budget(default_config):
    cfg = config.validate(default_config)
    # One launch per layout and side, whatever the models and axes.
    assert len(grid.save_jobs(cfg)) + len(grid.load_jobs(cfg)) == 2 * len(cfg["layouts"])
    job = grid.load_job_spec(cfg, "results", "tp_2")
    assert [item.model for item in job.items] == cfg["models"]
    assert [item.id for item in job.items] == ["0", "1", "2", "3"]
    assert job.layout.world_size == 2 and job.work_dir == "results/work/load/tp_2"
    for item in job.items:
        assert [s.layout.name for s in item.sources] == list(cfg["layouts"])
        assert item.record == f"results/load/{item.model}/tp_2.json"
    records = grid.save_outputs(cfg, "results", "tp_2")
    assert records == [f"results/save/{m}/tp_2.json" for m in cfg["models"]]
    assert len(grid.load_inputs(cfg, "results", "tp_2")) == 4 * len(cfg["layouts"])


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
        grid.load_spec(cfg, "mlp", "fsdp2_2").sources[0].paths.checkpoint
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
    assert grid.save_spec(cfg, "mlp", "l").layout.world_size == world


def test_specs_carry_what_the_job_needs(small_config):
    cfg = config.validate(small_config)
    spec = grid.save_spec(cfg, "mlp", "fsdp2_2")
    assert spec.paths.checkpoint == "results/save/mlp/fsdp2_2/checkpoint"
    assert spec.layout.mesh_dims == ("shard",)
    assert spec.train["steps"] == 2
    assert spec.config_hash == config.config_hash(cfg)


def test_fault_cells_get_their_own_jobs(small_config):
    small_config["faults"] = [{"fault": "all", "model": "mlp", "save": "single", "load": "fsdp2_2"}]
    cfg = config.validate(small_config)
    cells = grid.fault_cells(cfg)
    assert len(cells) == len(faults.campaign(cfg["verify"]))  # no fault that breaks a seal
    by_fault = {c.fault: c for c in cells}
    flip = by_fault["flip_byte"]
    (save,) = grid.fault_save_spec(cfg, flip).items
    assert save.fault == "flip_byte"
    assert save.paths.checkpoint == f"results/faults/{flip.id}/save/mlp/single/checkpoint"
    (load,) = grid.fault_load_spec(cfg, by_fault["hang_load"]).items
    assert grid.fault_save_spec(cfg, by_fault["hang_load"]).items[0].fault is None
    assert [s.fault for s in load.sources] == ["hang_load"]
    assert load.fault_tag == FaultTag("hang_load", "timeout", by_fault["hang_load"].id)
    (foreign,) = grid.fault_load_spec(cfg, by_fault["foreign_checkpoint"]).items
    (source,) = foreign.sources
    assert foreign.model == "mlp" and "/save/mlp_uneven/single/" in source.paths.checkpoint
    assert source.paths == grid.checkpoint_paths("mlp_uneven", "single", by_fault[
        "foreign_checkpoint"].root)  # fmt: skip


def test_unit_id_names_a_save_item_or_a_load_cell(small_config):
    # The worker's result files and the driver's pending units agree on these names.
    from pipeline_lib.plan.specs import unit_id

    spec = grid.load_job_spec(config.validate(small_config), grid.RESULTS, "single")
    units = [unit_id(i.id, s.id) for i in spec.items for s in i.sources]
    assert units == ["0.single", "0.fsdp2_2"] == spec.units()
    assert spec.narrowed({"0.fsdp2_2"}).units() == ["0.fsdp2_2"]
    assert spec.narrowed(set()).items == ()
