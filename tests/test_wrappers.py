"""Wrappers and options that change the state path: each is a framework, so
a checkpoint saved with it is loaded without it and the other way round by the same grid."""

from __future__ import annotations

from dataclasses import replace

import pytest

from pipeline_lib import frameworks
from pipeline_lib.verify import records
from tests.jobs import run_matrix
from tests.test_records import LAYOUT_A, LOAD_TORCH, SPEC, load_result, save_record


def test_every_wrapper_framework_is_registered_without_importing_torch():
    wrappers = {"compiled", "fsdp2_activation_checkpoint", "fsdp2_no_reshard",
                "fsdp2_cpu_offload", "fsdp2_mixed_precision"}  # fmt: skip
    assert wrappers <= set(frameworks.names())
    assert frameworks.get("fsdp2_mixed_precision").compute_dtype == "bfloat16"
    assert frameworks.get("compiled").max_world_size == 1


def test_mixed_precision_cells_are_judged_with_the_bfloat16_tolerance():
    mixed = replace(LAYOUT_A, framework="fsdp2_mixed_precision")
    save = save_record(layout=mixed, resume_losses=[1.0, 0.5])
    load = load_result(resume_losses=[1.0, 0.5002])  # 4e-4 relative: above 1e-5, below 1e-3
    row = records.cell_row("mlp", save, load, SPEC, LOAD_TORCH)
    assert (row["status"], row["resume_rtol"]) == ("pass", 1e-3)
    plain = records.cell_row("mlp", save_record(resume_losses=[1.0, 0.5]), load, SPEC, LOAD_TORCH)
    assert plain["status"] == "fail" and plain["resume_rtol"] == 1e-5
    assert "above resume_rtol 1e-05" in plain["reason"]
    assert replace(SPEC).verify["resume_rtol_bfloat16"] == 1e-3


@pytest.mark.torchrun
def test_saved_with_a_wrapper_loads_without_it_and_the_other_way(in_tmp):
    layouts = {
        "single": {"framework": "single", "mesh": [1]},
        "ac": {"framework": "fsdp2_activation_checkpoint", "mesh": [2]},
        "compiled": {"framework": "compiled", "mesh": [1]},
        "offload": {"framework": "fsdp2_cpu_offload", "mesh": [2]},
    }
    pairs = [["ac", "single"], ["single", "ac"], ["compiled", "single"], ["single", "compiled"],
             ["offload", "single"]]  # fmt: skip
    raw = {"models": ["transformer"], "layouts": layouts, "pairs": pairs}
    rows = run_matrix(raw, model="transformer")
    for pair in [
        ("ac", "single"),
        ("single", "ac"),
        ("compiled", "single"),
        ("single", "compiled"),
    ]:
        assert (rows[pair]["status"], rows[pair]["reason"]) == ("pass", ""), pair
        assert rows[pair]["entries_checked"] > 20
    offload = rows["offload", "single"]
    assert offload["status"] == "skip"
    assert "CPUOffloadPolicy offloads from an accelerator" in offload["reason"]
