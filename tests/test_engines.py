"""Axis ``engine``: torch-checkpointing's CheckpointManager as a second checkpoint library
(pipeline_lib/job/engines.py). Unit tests of its skip rules, check 1's reader of its files and
its fault; the formats of the two engines read each by the other (why cross-engine cells are
``skip``); and ONE run of real jobs: a single-rank save loaded into three layouts, a save whose
file a fault changed, and a 2-rank save that fails inside the library on CPU."""

from __future__ import annotations

import ast
import importlib.util
import time
from pathlib import Path

import pytest
import torch

from pipeline_lib.plan.axes import Variant, conflict
from pipeline_lib.verify import engine_files, faults
from tests.jobs import run_grid, run_matrix

needs_library = pytest.mark.skipif(
    importlib.util.find_spec("torch_checkpointing") is None,
    reason="the optional extra torch-checkpointing is not installed "
    "(bash scripts/setup.sh --torch-checkpointing)",
)
TC = "torch_checkpointing"


def test_engine_dcp_is_the_default_and_the_default_matrix_never_imports_the_library():
    """The library is imported only inside engines.py's functions, and engines.py only inside
    functions (checkpoint_io's branches for engine torch_checkpointing): importing any module
    of the package never imports it."""
    assert Variant().engine == "dcp"
    assert Variant().id == ""  # every existing variant keeps its id and folder
    at_top = []
    for path in Path("pipeline_lib").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in tree.body:  # module level only: a function's imports run when it runs
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [f"{node.module}.{a.name}" for a in node.names]
            at_top += [
                f"{path}: {n}" for n in names if "torch_checkpointing" in n or "engines" in n
            ]
    assert at_top == []


@pytest.mark.parametrize(
    ("axis", "value"),
    [("mode", "full"), ("format", "safetensors"), ("async_save", "thread"),
     ("load_mode", "full"), ("load_process", "saver"), ("save_sequence", "load_last")],
)  # fmt: skip
def test_engine_torch_checkpointing_takes_the_dcp_axes_defaults_only(axis, value):
    default = {"mode": "sharded", "format": "dcp", "async_save": "sync", "load_mode": "same",
               "load_process": "fresh", "save_sequence": "once"}[axis]  # fmt: skip
    assert conflict(Variant(engine=TC, **{axis: value})) == (
        f"engine {TC} is tested with {axis} {default} only ({axis} {value})"
    )
    assert conflict(Variant(**{axis: value})) != conflict(Variant(engine=TC, **{axis: value}))


def test_engine_torch_checkpointing_runs_with_the_other_axes():
    for kw in ({}, {"optimizer": "adam_lr_warmup"}, {"param_dtype": "bfloat16"},
               {"load_init": "meta"}, {"frozen_params": "saved"}):  # fmt: skip
        assert conflict(Variant(engine=TC, **kw)) is None, kw


def test_combine_axes_pairwise_with_engine_torch_checkpointing_is_refused_in_one_line(
    small_config,
):
    from pipeline_lib.plan import config
    from pipeline_lib.plan.schema import ConfigError

    with pytest.raises(ConfigError, match=r"engine: combine_axes pairwise covers engine dcp only"):
        config.validate({**small_config, "engine": ["dcp", TC], "combine_axes": "pairwise"})
    assert config.validate({**small_config, "engine": [TC]})["engine"] == [TC]


def write_items(folder, items: dict[str, dict], ranks=(0,)) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for item, state in items.items():
        for rank in ranks:
            torch.save(state, folder / f"{item}_{rank}.pt")
    (folder / "metadata.pkl").write_bytes(b"never unpickled by check 1")


def test_check_1_reads_every_item_file_of_a_single_rank_save_with_dcp_names(tmp_path):
    w = torch.arange(6.0).reshape(2, 3)
    optim = {"state": {"0.weight": {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 0.1}]}
    write_items(tmp_path, {"model": {"0.weight": w}, "optim": optim, "scheduler": {"k": 1}})
    read = dict(engine_files.entries(str(tmp_path)))
    assert sorted(read) == ["model.0.weight", "optim.param_groups.0.lr",
                            "optim.state.0.weight.step", "scheduler.k"]  # fmt: skip
    assert torch.equal(read["model.0.weight"], w) and read["scheduler.k"] == 1
    halves = [dict(engine_files.entries(str(tmp_path), (i, 2))) for i in range(2)]
    assert sorted([*halves[0], *halves[1]]) == sorted(read)


def test_check_1_refuses_a_multi_rank_save_and_a_folder_without_item_files(tmp_path):
    write_items(tmp_path / "two", {"model": {"w": torch.ones(2)}}, ranks=(0, 1))
    with pytest.raises(ValueError, match=r"items \['model'\] of .* written by several ranks"):
        list(engine_files.entries(str(tmp_path / "two")))
    (tmp_path / "none").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no <item>_<rank>\.pt file"):
        list(engine_files.entries(str(tmp_path / "none")))


def test_fault_change_engine_value_changes_one_element_and_names_it(tmp_path):
    state = {"b": torch.zeros(3), "a": torch.zeros(2, 2)}
    write_items(tmp_path, {"model": state})
    said = faults.apply_to_checkpoint("change_engine_value", tmp_path)
    assert said == "changed model.a[0] in model_0.pt"
    after = torch.load(tmp_path / "model_0.pt", weights_only=True)
    assert after["a"].flatten().tolist() == [1.0, 0.0, 0.0, 0.0] and not after["b"].any()
    assert "change_engine_value" not in faults.FAULTS  # not in the campaign: DCP cells


@needs_library
def test_neither_engine_reads_the_others_checkpoint(tmp_path):
    """Why the grid has no cross-engine cell (axes.CROSS_ENGINE): torch-checkpointing writes metadata.pkl and
    model_0.pt, no .metadata, and dcp.load finds no metadata in it; DCP writes .metadata and
    .distcp files, and the library's load looks for model_0.pt. (Its synchronous saver: the
    files are the asynchronous one's, without a writer process.)"""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import CheckpointException
    from torch_checkpointing import CheckpointManager

    from pipeline_lib.job import engines

    manager = CheckpointManager(engines.config())
    state = {"model": {"w": torch.arange(4.0)}, "optim": {"m": torch.ones(2)}}

    def empty():
        return {"model": {"w": torch.zeros(4)}, "optim": {"m": torch.zeros(2)}}

    try:
        manager.save(str(tmp_path / "tc"), state)
        files = sorted(p.name for p in (tmp_path / "tc").iterdir())
        assert files == ["metadata.pkl", "model_0.pt", "optim_0.pt"]
        dcp.save(state, checkpoint_id=tmp_path / "dcp", no_dist=True)
        with pytest.raises(FileNotFoundError, match=r"Missing file .*dcp/model_0\.pt"):
            manager.load(str(tmp_path / "dcp"), into=empty())
        back = manager.load(str(tmp_path / "tc"), into=empty())
        assert torch.equal(back["model"]["w"], torch.arange(4.0))  # the library reads its own
    finally:
        manager.close()
    with pytest.raises(CheckpointException, match="metadata"):
        dcp.load(empty(), checkpoint_id=tmp_path / "tc", no_dist=True)


LAYOUTS = {
    "single": {"framework": "single", "mesh": [1]},
    "single_changed": {"framework": "single", "mesh": [1]},
    "fsdp2_2": {"framework": "fsdp2", "mesh": [2]},
    "tp_2": {"framework": "tp", "mesh": [2]},
}


@needs_library
@pytest.mark.torchrun
def test_engine_cells_single_rank_save_into_two_layouts_a_changed_file_and_a_2_rank_save(in_tmp):
    """engine torch_checkpointing, one run of five launches (3 saves, 2 loads): saved under
    single, loaded into fsdp2_2 and tp_2 by the library's DefaultResharder, every entry exact
    and the resume within resume_rtol; a save whose model_0.pt a fault changed after the save
    fails the cell, naming the entry in check 1 (files vs saver) and check 2 (loader vs saver);
    a 2-rank save on CPU fails inside the library, its error the cell's reason. (Single into
    single, ddp_2 and fsdp2_tp: configs/engines.yaml.)"""
    passing = [("single", "fsdp2_2"), ("single", "tp_2")]
    pairs = [*passing, ("single_changed", "tp_2"), ("fsdp2_2", "tp_2")]
    raw = {"models": ["mlp"], "layouts": LAYOUTS, "pairs": [list(p) for p in pairs],
           "engine": [TC], "run": {"cell_timeout_s": 120}}  # fmt: skip
    rows = run_matrix(raw, save_faults={"single_changed": "change_engine_value"})
    for pair in passing:
        assert (rows[pair]["status"], rows[pair]["reason"]) == ("pass", ""), pair
        assert rows[pair]["engine"] == TC and rows[pair]["entries_checked"] == 52, pair
    changed = rows["single_changed", "tp_2"]
    assert changed["status"] == "fail"
    entry = "first model.blocks.0.fc1.bias: bytes differ (max_abs_diff 1)"
    assert changed["reason"].startswith(
        f"files vs saver: 1 of 52 entries differ; {entry}; loader vs saver: 1 of 52 entries "
        f"differ; {entry}"
    ), changed["reason"]
    multi = rows["fsdp2_2", "tp_2"]
    assert multi["status"] == "error"
    assert "Torch not compiled with CUDA enabled" in multi["reason"], multi["reason"]


@needs_library
@pytest.mark.torchrun
def test_a_scheduler_item_saved_by_one_rank_fails_a_2_rank_load_on_rank_1_alone(in_tmp):
    """adam_lr_warmup: the LR scheduler is an item without a resharder, stored per rank; a
    single-rank save has no scheduler_1.pt, so a 2-rank load raises on rank 1 alone while rank
    0 loads and goes on (finding torch-checkpointing-rank-item-into-more-ranks). The cell is
    ``error`` naming rank 1 and the missing file, within the exit grace of the raise, not a
    timeout of its cell_timeout_s (300 s)."""
    raw = {"models": ["mlp"], "layouts": {k: LAYOUTS[k] for k in ("single", "fsdp2_2")},
           "pairs": [["single", "fsdp2_2"]], "optimizer": ["adam_lr_warmup"], "engine": [TC],
           "run": {"cell_timeout_s": 300}}  # fmt: skip
    started = time.monotonic()
    (row,) = run_grid(raw).values()
    assert row["status"] == "error", row["reason"]
    assert row["reason"].startswith(
        "load: rank 1 raised during cell single: FileNotFoundError: Missing file "
    ), row["reason"]
    assert "/scheduler_1.pt for checkpoint item 'scheduler'" in row["reason"], row["reason"]
    waited = "(the other ranks waited: no progress for 20 s; job killed)"
    assert row["reason"].endswith(waited), row["reason"]
    assert time.monotonic() - started < 250  # the grace, not the cell's timeout
