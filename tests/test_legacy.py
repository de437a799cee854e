"""Checkpoints users still write the old ways (configs/legacy.yaml): FSDP1's own state-dict API
(mode / load_mode ``legacy``; ShardedTensors under ``fsdp1_no_mesh``), a full state dict
written with dcp.save (modes ``full_dcp``, ``full_dcp_rank0``), and a model whose state-dict
keys differ from its parameter names (``mlp_renamed``: a renamed key's entry is the parameter
its value is, found by identity, not by the key's spelling or the hook's mapping)."""

from __future__ import annotations

import os
import re
import sys
import textwrap

import pytest
import torch

from pipeline_lib import models
from pipeline_lib.common.layout import Layout
from pipeline_lib.job import checkpoint_io
from pipeline_lib.plan import grid
from pipeline_lib.plan.axes import Variant, layout_conflict
from pipeline_lib.verify.bitwise import compare
from pipeline_lib.verify.live import Anatomy, live_state
from tests import procs
from tests.conftest import REPO
from tests.jobs import run_grid, tensors

RENAMED = [f"blocks.{b}.fc{f}.{p}" for b in (0, 1) for f in (1, 2) for p in ("weight", "bias")]


def test_legacy_is_fsdp1_only_on_the_side_that_uses_it():
    legacy, loads_legacy = Variant(mode="legacy"), Variant(load_mode="legacy")
    for framework in ("fsdp1", "fsdp1_no_mesh", "fsdp1_flat", "fsdp1_hybrid"):
        assert layout_conflict(legacy, "save", 2, framework) is None
        assert layout_conflict(loads_legacy, "load", 2, framework) is None
    reason = layout_conflict(legacy, "save", 2, "fsdp2")
    assert reason == "mode legacy: FSDP.state_dict_type is FSDP1's own API (framework fsdp2)"
    assert "load_mode legacy" in layout_conflict(loads_legacy, "load", 1, "single")
    # The other side is not legacy: any framework.
    assert layout_conflict(loads_legacy, "save", 2, "fsdp2") is None
    # mode legacy loads the legacy way (load_mode same): an FSDP1 loader only.
    assert "mode legacy" in layout_conflict(legacy, "load", 2, "ddp")
    layout = Layout("ddp_2", "ddp", (2,), ("dp",), None)
    assert grid.skip_reason(Variant(mode="legacy", load_mode="sharded"), "load", layout) is None


def test_full_dcp_writes_the_full_state_dict_and_loads_sharded():
    every_rank = checkpoint_io.options(Variant(mode="full_dcp"), False, False, "save")
    assert every_rank.full_state_dict and not every_rank.cpu_offload
    rank0 = checkpoint_io.options(Variant(mode="full_dcp_rank0"), False, False, "save")
    assert rank0.full_state_dict and rank0.cpu_offload
    for mode in ("full_dcp", "full_dcp_rank0"):
        variant = Variant(mode=mode)
        loads = checkpoint_io.options(variant, False, False, "load")
        assert not loads.full_state_dict and not loads.cpu_offload
        assert not variant.writes_full_state and not variant.loads_full  # no torch.save file


def test_renamed_keys_name_the_parameter_their_value_is():
    model = models.get("mlp_renamed").build()
    anatomy = Anatomy.of(model)
    assert {f"blocks.0.fc1.{p}" for p in ("weight", "bias")} <= set(anatomy.entries)
    assert anatomy.name_of("blocks.0.fc1.weight") == "blocks.0.fc1.base_layer.weight"
    assert anatomy.name_of("head.weight") == "head.weight"
    assert set(anatomy.held) == set(RENAMED)
    assert anatomy.param_keys == set(anatomy.entries)
    live = live_state(model, torch.optim.Adam(model.parameters()), None, anatomy, {}, False, False)
    assert live["model.blocks.1.fc2.weight"] is not None
    assert compare(model.blocks[1].fc2.base_layer.weight, live["model.blocks.1.fc2.weight"]).equal


def test_a_load_hook_that_loses_the_mapping_is_silent_but_the_live_state_names_it():
    torch.manual_seed(0)
    saver = models.get("mlp_renamed").build()
    torch.manual_seed(1)
    loader = models.get("mlp_renamed").build(lossy_load=True)
    loader.load_state_dict(saver.state_dict())  # strict, and no error: the loss is silent
    anatomy = Anatomy.of(loader)
    saved, loaded = (
        live_state(m, torch.optim.Adam(m.parameters()), None, anatomy, {}, False, False)
        for m in (saver, loader)
    )
    differ = sorted(n for n in saved if not compare(saved[n], loaded[n]).equal)
    assert differ == sorted(f"model.{name}" for name in RENAMED)


# The model of the broken-on-purpose cell: mlp_renamed whose load hook drops the mapping (a
# user model module, written into the run folder).
LOSSY = """
import torch
from pipeline_lib.models import mlp_renamed

def build():
    return mlp_renamed.build(lossy_load=True)

def make_inputs(batch_size, generator):
    return torch.randn(batch_size, 16, generator=generator)

def fsdp_units(model):
    return list(model.blocks)
"""
LOSSY_MODEL = "lossy_renamed:build"
LAYOUTS = {
    "nm": {"framework": "fsdp1_no_mesh", "mesh": [2]},
    "f2": {"framework": "fsdp2", "mesh": [2]},
}


@pytest.fixture(scope="module")
def legacy_rows(tmp_path_factory):
    """One grid, one launch per layout and side: mlp and the lossy user model, FSDP1 without a
    mesh and FSDP2 both ways and FSDP2 into itself, modes sharded, legacy and full_dcp against
    load modes same, sharded and legacy. {(variant id, model, save, load): row}."""
    folder = tmp_path_factory.mktemp("legacy")
    (folder / "lossy_renamed.py").write_text(textwrap.dedent(LOSSY))
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.setenv("PYTHONPATH", str(REPO))
        rows = run_grid(
            {
                "models": ["mlp", LOSSY_MODEL],
                "layouts": LAYOUTS,
                "pairs": [["nm", "f2"], ["f2", "nm"], ["f2", "f2"]],
                "mode": ["sharded", "legacy", "full_dcp"],
                "load_mode": ["same", "sharded", "legacy"],
                "combine_axes": "product",
            }
        )
        lossy = [t for t in tensors(LOSSY_MODEL, "f2") if t["save_layout"] == "f2"]  # variant ""
        return rows, lossy


@pytest.mark.torchrun
@pytest.mark.parametrize(
    ("variant", "save", "load"),
    [
        ("", "nm", "f2"),  # ShardedTensors saved, loaded as DTensors
        ("", "f2", "nm"),
        ("mode-legacy+load_mode-sharded", "nm", "f2"),  # accelerate's save, get_state_dict's load
        ("load_mode-legacy", "f2", "nm"),  # a DTensor checkpoint loaded the legacy way
        ("mode-full_dcp", "nm", "f2"),
        ("mode-full_dcp", "f2", "nm"),
    ],
)
def test_legacy_and_full_dcp_checkpoints_load_bit_for_bit(legacy_rows, variant, save, load):
    row = legacy_rows[0][variant, "mlp", save, load]
    assert (row["status"], row["reason"]) == ("pass", ""), row["reason"]
    assert row["entries_checked"] > 30 and row["entries_mismatched"] == 0


@pytest.mark.torchrun
def test_legacy_on_fsdp2_is_a_skip(legacy_rows):
    legacy_rows = legacy_rows[0]
    row = legacy_rows["mode-legacy+load_mode-sharded", "mlp", "f2", "nm"]
    assert row["status"] == "skip" and "FSDP1's own API (framework fsdp2)" in row["reason"]
    row = legacy_rows["mode-legacy", "mlp", "nm", "f2"]  # loads the legacy way: FSDP1 only
    assert row["status"] == "skip" and "mode legacy" in row["reason"]
    row = legacy_rows["load_mode-legacy", "mlp", "nm", "f2"]
    assert row["status"] == "skip" and "load_mode legacy" in row["reason"]


@pytest.mark.torchrun
def test_a_load_hook_that_loses_renamed_entries_fails_naming_them(legacy_rows):
    # The loader's hook drops the renamed entries and resets their layers; a strict load sees
    # every key it wants, so only a reference that knows which parameter a renamed key holds
    # can name them (without it the live state had no parameter for the key: KeyError).
    rows, lossy = legacy_rows
    row = rows["", LOSSY_MODEL, "f2", "f2"]
    assert row["status"] == "fail", row["reason"]
    assert row["reason"].startswith("loader vs saver: 8 of "), row["reason"]
    assert "first model.user_model.blocks.0.fc1.bias: bytes differ" in row["reason"]
    differ = {t["entry"] for t in lossy if not t["equal"]}  # the default variant's record
    assert differ == {f"model.user_model.{name}" for name in RENAMED}


# Rank r of 2 under fsdp1_no_mesh: each ShardedTensor of mlp's sharded state dict read as the
# reference reads it (reference.local_piece), every rank's parts placed at their offsets, then
# compared bit for bit with FSDP1's own full state dict (not read through the reference). The
# same with a reading that drops the shard's offsets (broken on purpose): the comparison fails.
SHARDED_TENSOR_PIECES = """
import torch, torch.distributed as dist
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from pipeline_lib import frameworks
from pipeline_lib.models import mlp
from pipeline_lib.verify import reference

def assembled(sharded, full):
    wrong = []
    for name, value in sharded.items():
        if not isinstance(value, ShardedTensor):
            continue
        part = reference.local_piece(value)
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, (part.offsets, part.data))
        whole, seen = torch.zeros_like(full[name]), torch.zeros(full[name].shape, dtype=torch.int)
        for offsets, data in parts:
            box = tuple(slice(o, o + n) for o, n in zip(offsets, data.shape))
            whole[box], seen[box] = data, seen[box] + 1
        exact = torch.equal(whole.view(torch.int32), full[name].view(torch.int32))
        if not (exact and bool((seen == 1).all())):
            wrong.append(name)
    return len([v for v in sharded.values() if isinstance(v, ShardedTensor)]), wrong

def offsets_dropped(value):
    (shard,) = value.local_shards() or [None]
    if shard is None:
        return reference.Part((0,) * value.dim(), torch.empty((0, *value.size()[1:])))
    return reference.Part((0,) * value.dim(), shard.tensor.detach().cpu())

dist.init_process_group("gloo")
torch.manual_seed(0)
model = frameworks.get("fsdp1_no_mesh").parallelize(mlp.build(), None)
sharded = get_model_state_dict(model)
full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
count, wrong = assembled(sharded, full)
reference._sharded_tensor_piece = offsets_dropped
_, broken = assembled(sharded, full)
if dist.get_rank() == 0:
    print(f"SHARDED {count} READ {wrong} BROKEN {len(broken)}", flush=True)
dist.destroy_process_group()
"""


@pytest.mark.torchrun
def test_the_reference_reads_a_sharded_tensors_shard_at_its_offsets(tmp_path):
    script = tmp_path / "pieces.py"
    script.write_text(textwrap.dedent(SHARDED_TENSOR_PIECES))
    proc = procs.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(script)],
        capture_output=True, text=True, timeout=300, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("SHARDED "))
    count, read, broken = re.fullmatch(r"SHARDED (\d+) READ (.*) BROKEN (\d+)", line).groups()
    assert int(count) == 10 and read == "[]", line  # mlp: 10 tensors, every one exact
    assert int(broken) == int(count), line  # without the offsets, every entry is wrong
