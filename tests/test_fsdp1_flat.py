"""FSDP1 with use_orig_params=False (``fsdp1_flat``, a wrapper that changes the state path): its checkpoints load bit
for bit under the other layouts and the other way round, its live state (read from the
FlatParameters' shards, pipeline_lib.verify.live) is independent of the state-dict API, and a unit
that mixes frozen and trainable parameters is a skip.

Found on torch 2.13.0 CPU (docs/findings.md, kept as data, so these cells ``fail``): FSDP1's
sharded optimizer state dict gives every original parameter of one FlatParameter the same
``step`` tensor (shared storage the model does not tie). It lists a param group's parameters in
FlatParameter order (the root unit's first), where the other layouts list them in the model's
order: check 2 compares a loader's names as a set (compare.ParamNames), so that passes."""

from __future__ import annotations

import re
import sys
import textwrap

import pytest

from pipeline_lib import frameworks
from pipeline_lib.common.errors import Incompatible
from pipeline_lib.job import training
from tests import procs
from tests.conftest import REPO
from tests.jobs import run_matrix, tensors

LAYOUTS = {
    "single": {"framework": "single", "mesh": [1]},
    "flat": {"framework": "fsdp1_flat", "mesh": [2]},
    "fsdp2_2": {"framework": "fsdp2", "mesh": [2]},
}
# The one storage note each `step` entry of a flat parameter gets (state: the saver's state
# dict; load: the loader's), with nothing after it: its bytes are right.
SHARED_STEP = re.compile(
    r"(state|load): shares storage with optim\.state\.\S+\.step, which the model does not tie"
)


def test_fsdp1_flat_is_registered_without_importing_torch():
    flat = frameworks.get("fsdp1_flat")
    assert flat.mesh_dims == ("shard",) and flat.flat_members is not None
    assert flat.flat_starts is None  # its parameters are FlatParameters, not views


def test_param_groups_by_name_are_a_skip_under_fsdp1_flat():
    # Measured before this skip: the recipe's second group was empty under fsdp1_flat, and a
    # load into it failed (DSD: "There are param groups that have zero parameters").
    with pytest.raises(Incompatible, match="adamw_param_groups groups parameters by name"):
        training.check_param_groups(frameworks.get("fsdp1_flat"), "adamw_param_groups")
    training.check_param_groups(frameworks.get("fsdp1"), "adamw_param_groups")
    training.check_param_groups(frameworks.get("fsdp1_flat"), "adamw")


def only_the_known_findings(entry: dict) -> bool:
    """A differing entry of an fsdp1_flat cell is one of the two findings, bytes equal."""
    parts = entry["note"].split("; ")
    if entry["entry"].endswith(".step"):
        return all(SHARED_STEP.fullmatch(part) for part in parts)
    return False


@pytest.mark.torchrun
def test_saved_under_fsdp1_flat_loads_bit_for_bit_and_the_other_way(in_tmp):
    pairs = [["flat", "single"], ["flat", "fsdp2_2"], ["single", "flat"], ["fsdp2_2", "flat"]]
    rows = run_matrix({"models": ["mlp"], "layouts": LAYOUTS, "pairs": pairs})
    for save, load in pairs:
        row = rows[save, load]
        assert row["status"] == "fail" and row["entries_checked"] == 52, (save, load)
        assert row["resume_max_rel_diff"] <= row["resume_rtol"]
        entries = [t for t in tensors("mlp", load) if t["save_layout"] == save]
        differ = [t for t in entries if not t["equal"]]
        assert all(map(only_the_known_findings, differ)), (save, load, differ)
        # The 10 steps (one per parameter), nothing else; the param group's names in another
        # order are the same names.
        assert len(differ) == 10 and len(entries) == 52
        (names,) = [t for t in entries if t["entry"] == "optim.param_groups.0.params"]
        assert names["equal"], names
        bytes_checked = [
            t for t in entries if t["kind"] in ("param", "optim.exp_avg", "optim.exp_avg_sq")
        ]
        assert len(bytes_checked) == 30 and all(t["equal"] for t in bytes_checked)


@pytest.mark.torchrun
def test_a_wrong_state_dict_of_an_fsdp1_flat_saver_fails_check_0(in_tmp):
    # The state dict returns two entries under each other's names on both sides: only a live
    # state read without the state-dict API (check 0) can see it.
    layouts = {"flat": LAYOUTS["flat"], "single": LAYOUTS["single"]}
    raw = {"models": ["mlp"], "layouts": layouts, "pairs": [["flat", "single"]]}
    row = run_matrix(raw, save_faults={"flat": "swap_entries"})["flat", "single"]
    assert row["status"] == "fail"
    assert row["reason"].startswith(
        "state dict vs live: 12 of 52 entries differ; first model.blocks.0.fc1.bias: bytes differ"
    ), row["reason"]
    swapped = {t["entry"]: t for t in tensors("mlp", "single")}
    for name in ("model.blocks.0.fc1.bias", "model.blocks.1.fc1.bias"):
        assert not swapped[name]["state_equal"] and "bytes differ" in swapped[name]["note"]


MIXED = """
import os, torch, torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from pipeline_lib.common.errors import Incompatible
from pipeline_lib.frameworks import get

class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)) for _ in "ab")
    def fsdp_units(self):
        return list(self.blocks)

os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="0", RANK="0", WORLD_SIZE="1")
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
mesh = init_device_mesh("cpu", (1,))
model = Model()
model.blocks[0][0].requires_grad_(False)  # one unit: a frozen and a trainable Linear
try:
    get("fsdp1_flat").parallelize(model, mesh)
except Incompatible as exc:
    print("SKIP", exc)
"""


def test_a_unit_mixing_frozen_and_trainable_parameters_is_a_skip():
    proc = procs.run(
        [sys.executable, "-c", textwrap.dedent(MIXED)],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == (
        "SKIP FSDP1 use_orig_params=False: ValueError: blocks.0 has both parameters with "
        "requires_grad=True and False. FSDP does not support wrapping such modules when "
        "use_orig_params=False. If possible, wrap the frozen parameters with FSDP separately.\n"
    ), proc.stdout + proc.stderr[-3000:]
