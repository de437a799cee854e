"""Three scenarios of PyTorch's own DCP tests, as cells (configs/seeds.yaml): activation
checkpointing under DDP and FSDP1, blocks compiled one by one under FSDP2 (torchtitan's
``apply_compile``), and extra state that is not a tensor (``mlp_object_state``)."""

from __future__ import annotations

import pytest
import torch

from pipeline_lib import frameworks, models
from pipeline_lib.frameworks import fsdp2_compile, fsdp2_compile_wrapped
from pipeline_lib.frameworks._activation_checkpoint import checkpoint_blocks
from pipeline_lib.job import optimizers
from pipeline_lib.verify import faults
from pipeline_lib.verify.bitwise import compare
from pipeline_lib.verify.live import Anatomy, live_state
from tests.jobs import run_matrix

NEW = {"ddp_activation_checkpoint": ("replicate",), "fsdp1_activation_checkpoint": ("shard",),
       "fsdp2_compile": ("shard",), "fsdp2_compile_wrapped": ("shard",)}  # fmt: skip
NOTES = ("model.input_note._extra_state", "model.output_note._extra_state.label")


def test_new_frameworks_are_registered_without_importing_torch():
    for name, dims in NEW.items():
        assert frameworks.get(name).mesh_dims == dims
    assert "_activation_checkpoint" not in frameworks.names()  # a helper, not a framework
    assert frameworks.get("fsdp1_activation_checkpoint").flat_starts is not None
    assert faults.OBJECT_STATE_FAULTS == {"change_extra_state": "fail"}
    assert not set(faults.OBJECT_STATE_FAULTS) & set(faults.FAULTS)


def built(name: str, seed: int):
    torch.manual_seed(seed)
    return models.get(name).build()


def live(model, anatomy: Anatomy) -> dict:
    optimizer, _ = optimizers.make("adam", model, 0.01)
    return live_state(model, optimizer, None, anatomy, {}, False, False)


def test_checkpointed_blocks_keep_the_unwrapped_names_in_the_live_state():
    model = built("mlp", 0)
    anatomy = Anatomy.of(model)
    wrappers = checkpoint_blocks(model)
    assert len(wrappers) == len(model.blocks) == 2
    # The module tree gains the wrapper's name (the wrapper's own state-dict hooks remove it).
    assert "blocks.0._checkpoint_wrapped_module.fc1.weight" in dict(model.named_parameters())
    plain = live(built("mlp", 0), anatomy)
    assert sorted(live(model, anatomy)) == sorted(plain)


def test_compiled_blocks_are_compiled_in_place_before_sharding(monkeypatch):
    sharded = []
    monkeypatch.setattr(fsdp2_compile, "shard", lambda model, mesh: sharded.append(model) or model)
    model = built("mlp", 0)
    keys = list(model.state_dict())
    assert fsdp2_compile.parallelize(model, None) is model and sharded == [model]
    # nn.Module.compile: the block stays in its parent (no _orig_mod. in any name) and is
    # compiled (inductor runs at the first forward, not here).
    assert all(block._compiled_call_impl is not None for block in model.blocks)
    assert model.head._compiled_call_impl is None
    assert list(model.state_dict()) == keys


def test_blocks_compiled_by_torch_compile_gain_orig_mod_in_the_tree_not_the_live_state():
    model = built("mlp", 0)
    anatomy = Anatomy.of(model)
    compiled = fsdp2_compile_wrapped.compile_blocks(model)
    assert [type(block).__name__ for block in compiled] == ["OptimizedModule"] * 2
    assert list(model.blocks) == compiled
    assert "blocks.0._orig_mod.fc1.weight" in model.state_dict()
    assert sorted(live(model, anatomy)) == sorted(live(built("mlp", 0), anatomy))


def test_object_extra_state_differs_between_seeds_and_a_load_restores_it():
    saver, loader = built("mlp_object_state", 0), built("mlp_object_state", 1)
    inputs, targets = saver.make_batch(0, 4, 0)
    saver.loss_sum(saver(inputs), targets)[0].backward()
    state = saver.state_dict()
    assert isinstance(state["input_note._extra_state"], str)
    assert state["input_note._extra_state"].endswith("/1")  # training changes it
    assert state["output_note._extra_state"] == {
        "label": saver.output_note.label, "forwards": 1, "sample_shape": [8],
    }  # fmt: skip
    anatomy = Anatomy.of(saver)
    saved, missed = live(saver, anatomy), live(loader, anatomy)
    assert all(not compare(saved[name], missed[name]).equal for name in NOTES)
    loader.load_state_dict(state)
    loaded = live(loader, anatomy)
    assert all(compare(saved[name], loaded[name]).equal for name in saved)


def test_change_extra_state_changes_the_first_string_only_under_its_fault():
    model = built("mlp_object_state", 0)
    before = model.state_dict()
    faults.change_extra_state(None, model)
    assert model.state_dict()["input_note._extra_state"] == before["input_note._extra_state"]
    faults.change_extra_state("change_extra_state", model)
    after = model.state_dict()
    assert after["input_note._extra_state"] == "changed-" + before["input_note._extra_state"]
    assert after["output_note._extra_state"] == before["output_note._extra_state"]
    note = model.output_note
    model.input_note = torch.nn.Identity()  # the dict's first string, when no string state
    faults.change_extra_state("change_extra_state", model)
    assert note.label == "changed-" + before["output_note._extra_state"]["label"]


@pytest.mark.torchrun
def test_checkpointed_layouts_and_object_extra_state_load_exactly(in_tmp):
    """One run (2 save and 3 load jobs): activation checkpointing under DDP and FSDP1, each
    loaded into the other and into a plain layout, on the model with non-tensor extra state; the
    change_extra_state fault fails its cell naming the entry (configs/seeds.yaml adds plain ->
    checkpointed and the compiled layouts)."""
    layouts = {
        "single": {"framework": "single", "mesh": [1]},
        "ddp_ac": {"framework": "ddp_activation_checkpoint", "mesh": [2]},
        "fsdp1_ac": {"framework": "fsdp1_activation_checkpoint", "mesh": [2]},
    }
    pairs = [["ddp_ac", "fsdp1_ac"], ["fsdp1_ac", "ddp_ac"], ["fsdp1_ac", "single"],
             ["ddp_ac", "single"]]  # fmt: skip
    raw = {"models": ["mlp_object_state"], "layouts": layouts, "pairs": pairs}
    rows = run_matrix(raw, model="mlp_object_state",
                      load_faults={("ddp_ac", "single"): "change_extra_state"})  # fmt: skip
    for pair in [("ddp_ac", "fsdp1_ac"), ("fsdp1_ac", "ddp_ac"), ("fsdp1_ac", "single")]:
        assert (rows[pair]["status"], rows[pair]["reason"]) == ("pass", ""), pair
        assert rows[pair]["entries_checked"] > 20
    broken = rows["ddp_ac", "single"]
    assert broken["status"] == "fail"
    assert "loader vs saver: 1 of " in broken["reason"]
    assert "first model.input_note._extra_state: value 'init-" in broken["reason"]
